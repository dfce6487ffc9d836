"""Prepare batches in a background thread, a few ahead, on a CUDA stream of their own.

Decoding and resizing a batch on the GPU takes host time (one call per image group) and
device time; in a thread with its own stream both overlap the training step instead of
adding to it. The consumer's stream waits for each batch's event, and the batch's tensors
are marked as used on the consumer's stream (record_stream), so the caching allocator
never hands their memory to the producer while a step still reads them. On the CPU the
thread only overlaps host work (torch ops release the GIL).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)


class Prefetcher:
    """Iterates `make(item)` for the items of `source`, `depth` ahead, in a thread."""

    def __init__(
        self, source: Iterable, make: Callable[[Any], Any], device: torch.device, depth: int = 3
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.done = False
        self.thread = threading.Thread(
            target=self._produce, args=(iter(source), make), daemon=True, name="recu-prefetch"
        )
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, source: Iterator, make: Callable[[Any], Any]) -> None:
        try:
            stream = None
            if self.cuda:
                torch.cuda.set_device(self.device)
                stream = torch.cuda.Stream(self.device)
            on_stream = contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)
            with torch.no_grad(), on_stream:
                for item in source:
                    if self.stop.is_set():
                        return
                    out = make(item)
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not self._put((out, event)):
                        return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_Failed(e))
            return
        self._put(_END)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self.done:
            raise StopIteration
        got = self._get()
        if got is _END:
            self.done = True
            raise StopIteration
        if isinstance(got, _Failed):
            self.done = True
            raise got.error
        out, event = got
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in _tensors(out):
                if t.is_cuda:
                    t.record_stream(current)
        return out

    def _get(self) -> Any:
        """The next result; an error if the thread ended without leaving one."""
        while True:
            try:
                return self.queue.get(timeout=1.0)
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    return _Failed(RuntimeError("the prefetch thread ended without a result"))

    def close(self) -> None:
        """Stop the thread (it ends after the batch it is making) and wait for it."""
        self.stop.set()
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self.queue.get(timeout=0.05)
        self.done = True
