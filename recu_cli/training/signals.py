"""Ctrl-C during training: finish the step (or reach the sync point), then stop cleanly."""

from __future__ import annotations

import os
import time


class StopOnSigint:
    """First Ctrl-C: finish the current step, then stop cleanly with a resume point.
    Second Ctrl-C: stop at once (files already written stay intact: they are atomic)."""

    REPEAT_S = 1.0  # under torchrun a terminal's Ctrl-C arrives twice (direct + forwarded)

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        self._first = 0.0
        self._torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1

    def __enter__(self) -> StopOnSigint:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if self._torchrun and time.monotonic() - self._first < self.REPEAT_S:
                return
            raise KeyboardInterrupt
        self.requested = True
        self._first = time.monotonic()

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the training process: it stops at a step (or, under
    torchrun, a sync point) that every rank reaches, which dead loaders would not allow."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
