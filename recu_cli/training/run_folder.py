"""One run = one folder, owned by one process: config.json, train.log, summary.csv,
packed last/best checkpoints and resume.pt, each written atomically, and the lock.

In the spirit of timm's CheckpointSaver: the loop says what happened (an epoch ended with
this model and this top-1, a resume point is due with this payload), the folder decides
what to write and whether the epoch is the best. It knows files, not training: it takes
plain values (a model, its spec and conversion config, metadata, the resume payload) and
changes nothing of the run's state, so it can be used and tested on its own.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shlex
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from recu_cli.atomic import append_text, torch_save, write_bytes
from recu_cli.console import echo_err
from recu_cli.errors import RecuError
from recu_cli.training.config import TrainConfig
from recu_cli.training.distributed import DistInfo, broadcast_object
from recu_cli.training.runlock import LOCK_NAME, RunLock
from recu_cli.training.state import Position

if TYPE_CHECKING:
    from torch import nn

    from recu_cli.convert_config import ConvertConfig
    from recu_cli.spec import ModelSpec

SUMMARY_FIELDS = [
    "epoch", "stage", "lr", "tau", "train_loss", "val_top1", "val_top5", "val_loss", "dead_share",
    "flip_rate", "flip_rate_tail", "flip_rate_core", "seconds", "img_per_s", "skipped_images",
    "sign_gap", "val_top1_live",
]  # fmt: skip
# files a fresh run writes before its first resume point (removed when its start fails)
START_FILES = ("config.json", "train.log", "summary.csv", LOCK_NAME)
# what a start killed before its first resume point leaves (the lock is always first)
LEFTOVERS = (LOCK_NAME, "config.json", "train.log")
NAME_MAX = 255  # bytes in one folder name (Linux, macOS, Windows)


class RunFolder:
    """A run's folder; only the main process writes, and only while it holds the lock."""

    def __init__(
        self,
        path: Path,
        info: DistInfo,
        quiet: bool = False,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self.info = info
        self.quiet = quiet
        self.echo = echo or echo_err
        self.lock: RunLock | None = None

    @classmethod
    def create(
        cls, output: str | Path, experiment: str | None, model: str, info: DistInfo, **kw: Any
    ) -> tuple[RunFolder, bool]:
        """The run folder of a new run (output/experiment, or output/<time>-<model>),
        created here (True) or already there (False): absent, empty, or a recu run's
        (`claim_folder`)."""
        if experiment is not None:
            check_experiment_name(experiment)
            name = experiment
        else:
            model = re.sub(r"[^\w.+-]", "_", model)  # tv:resnet18, hub names: one folder
            name = f"{datetime.now():%Y%m%d-%H%M%S}-{model}"
        path = Path(output) / name
        created = False
        if info.is_main:
            claim_folder(path)
            created = not path.exists()
            try:
                path.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise RecuError(
                    f"cannot create run folder {path}: a file is in the way; pick another "
                    "--output or --experiment"
                ) from None
            except OSError as e:
                raise RecuError(
                    f"cannot create run folder {path} ({e.strerror}); pick a writable --output"
                ) from None
        return cls(Path(broadcast_object(str(path), info)), info, **kw), created

    def open(self, resuming: bool) -> None:
        """Take the folder: lock it, clear what a killed writer left, refuse a second run."""
        if not self.info.is_main:
            return
        self.lock = RunLock(self.path).acquire()
        for stale in self.path.glob("*.tmp"):  # from a killed writer; ours now
            stale.unlink(missing_ok=True)
        if not resuming and self.resume_path.exists():
            raise RecuError(
                f"{self.path} already holds a run; continue it with --resume {self.path}"
            )

    def close(self) -> None:
        """Release the run folder (the process's exit would too)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def discard(self) -> None:
        """Remove a folder this process created and that holds no resume point yet."""
        if self.resume_path.exists():
            return
        for f in self.path.iterdir():
            if f.name in START_FILES or f.name.endswith(".tmp"):
                f.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # something else is in it: keep it
            self.path.rmdir()

    @property
    def resume_path(self) -> Path:
        return self.path / "resume.pt"

    # ---------------------------------------------------------------- train.log
    def log(self, msg: str, echo: bool = True) -> None:
        """A line on stderr (unless quiet or echo=False) and in train.log."""
        if not self.info.is_main:
            return
        if echo and not self.quiet:
            self.echo(msg)
        if self.lock is not None and self.lock.held:  # only the folder's owner writes
            append_text(self.path / "train.log", f"{datetime.now():%Y-%m-%d %H:%M:%S} {msg}\n")

    def log_start(self, resuming: bool) -> None:
        verb = "resume" if resuming else "start"
        self.log(
            f"{verb}: recu {_version()}, pid {os.getpid()}: recu {shlex.join(sys.argv[1:])}",
            echo=False,
        )

    def log_end(self, e: BaseException) -> None:
        """The last line of train.log says how the process ended (when it can be written:
        after a full disk the error being raised matters more than the line)."""
        with contextlib.suppress(OSError, RecuError):
            self._log_end(e)

    def _log_end(self, e: BaseException) -> None:
        if isinstance(e, RecuError) and e.exit_code == 130:  # a Ctrl-C that saved
            self.log(f"interrupted: {e}", echo=False)
        elif isinstance(e, KeyboardInterrupt):
            self.log("interrupted (second Ctrl-C): stopped at once", echo=False)
        elif isinstance(e, RecuError):
            self.log(f"error: {e}", echo=False)
        elif isinstance(e, Exception):
            self.log(f"error: {type(e).__name__}: {str(e)[:300]}", echo=False)

    # ---------------------------------------------------------------- files
    def write_config(
        self, settings: dict[str, Any], spec: ModelSpec, data_path: dict[str, str] | None = None
    ) -> None:
        """config.json: the run's settings (what --resume reads back), its model, and which
        data path it took and why."""
        if self.info.is_main:
            payload = {"train": settings, "model": spec.to_dict(), "recu_version": _version()}
            if data_path is not None:
                payload["data_path"] = data_path
            write_bytes(self.path / "config.json", json.dumps(payload, indent=2).encode())

    def write_summary(self, history: list[dict[str, Any]]) -> None:
        if not self.info.is_main:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for r in history:
            old = {"skipped_images": 0}  # rows of runs started before the column existed
            writer.writerow({k: _fmt(r.get(k, old.get(k, ""))) for k in SUMMARY_FIELDS})
        write_bytes(self.path / "summary.csv", buf.getvalue().encode())

    def save_resume(self, payload: dict[str, Any]) -> None:
        """resume.pt, atomically (torch.save of tensors and plain values only)."""
        if self.info.is_main:
            torch_save(payload, self.resume_path)

    def keep_epoch(
        self,
        top1: float,
        best_top1: float,
        model: nn.Module,
        spec: ModelSpec,
        convert: ConvertConfig,
        *,
        stats: list[dict[str, Any]],
        training: dict[str, Any] | None = None,
        history: list[dict[str, Any]] | None = None,
        half: bool = False,
        keep_latent: bool = False,
    ) -> bool:
        """last.safetensors of a binary model (training form), and best.safetensors too when
        its `top1` beats `best_top1` (the best of every earlier epoch): then True. The rest
        is what `pack.save` stores; only the main process writes, every process decides."""
        is_best = top1 > best_top1
        if self.info.is_main:
            from recu_cli.pack import save

            for name in ("last", "best") if is_best else ("last",):
                save(
                    self.path / f"{name}.safetensors", model, spec, convert, stats=stats,
                    half=half, keep_latent=keep_latent, training=training, history=history,
                )  # fmt: skip
        return is_best

    def checkpoint(self, name: str) -> str | None:
        """A packed checkpoint's path, or None when the run ended in stage 1."""
        path = self.path / f"{name}.safetensors"
        return str(path) if path.is_file() else None


def check_experiment_name(name: str) -> None:
    """--experiment names one folder inside --output: never a path that leaves it."""
    why = None
    if name in ("", ".", ".."):
        why = "is empty" if not name else f"is '{name}'"
    elif any(sep in name for sep in ("/", "\\", os.sep, os.altsep) if sep):
        why = "holds a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        why = "holds a control character"
    elif name != name.strip():
        why = "starts or ends with a space"
    elif len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        why = f"is longer than {NAME_MAX} bytes"
    if why is not None:
        raise RecuError(
            f"--experiment {name[:80]!r} {why}; it names one run folder inside --output: "
            "give a plain folder name such as 'resnet20-paper' (and the parent folder with -o)"
        )


def claim_folder(path: Path) -> None:
    """Refuse to start a run in a folder that is not recu's, before writing anything.

    A fresh run takes a folder that is absent or empty, or one holding a recu run (its
    `.lock`, created before any other file, and resume.pt: `open` then says "in use" or
    "--resume"), or the leftovers of a start killed before its first resume point: its
    `.lock` and nothing but regular files named config.json and train.log, and `*.tmp`.
    Anything else belongs to someone else and is left as it is."""
    try:
        entries = list(path.iterdir())
    except OSError:
        return  # absent, or a file in the way: mkdir says which
    names = {e.name for e in entries}
    if not entries or {LOCK_NAME, "resume.pt"} <= names:
        return
    foreign = [e.name for e in entries if not _leftover(e)]
    if LOCK_NAME in names and not foreign:
        return
    shown = sorted(foreign or names)
    listed = ", ".join(shown[:3]) + (", ..." if len(shown) > 3 else "")
    raise RecuError(
        f"{path} already exists and is not a recu run folder (it holds {listed}); "
        "give another --experiment, or --resume a run folder recu wrote"
    )


def _leftover(entry: Path) -> bool:
    """A regular file (not a link) that a killed start writes."""
    is_file = entry.is_file() and not entry.is_symlink()
    return is_file and (entry.name in LEFTOVERS or entry.name.endswith(".tmp"))


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def _version() -> str:
    from recu_cli import __version__

    return __version__


def load_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.json"
    if path.is_file() and not (run_dir / "resume.pt").is_file():
        raise RecuError(
            f"{run_dir} was stopped before its first resume point (written when training "
            "starts), so there is nothing to continue; start it again with the same "
            f"command (its settings are in {path})"
        )
    if not (run_dir / "resume.pt").is_file() or not path.is_file():
        raise RecuError(
            f"{run_dir} is not a resumable run (needs config.json and resume.pt); "
            "give the run folder printed at the start of training"
        )
    try:
        payload = json.loads(path.read_text())
        # runs from before --data-path trained on PIL workers: they continue there exactly
        settings = {"data_path": "pil", **payload["train"]}
        return TrainConfig.from_dict(settings, source=str(path))
    except (ValueError, KeyError, TypeError) as e:
        raise RecuError(f"{path} is damaged ({e}); start a new run") from e


def check_world_size(run_dir: Path, saved: int | None, current: int) -> None:
    """Steps per epoch, the schedule's length and each rank's shard depend on it."""
    if saved is not None and saved != current:
        how = f"torchrun --nproc_per_node {saved} -m recu_cli" if saved > 1 else "recu"
        raise RecuError(
            f"{run_dir} was trained by {saved} process(es), this resume has "
            f"{current}: resume with the same number ({how} binarize --resume {run_dir})"
        )


def damaged(path: Path, e: Exception) -> RecuError:
    return RecuError(
        f"cannot resume from {path} ({type(e).__name__}); the file is damaged or from "
        "another run: start a new run"
    )


def read_position(run_dir: Path, world_size: int | None = None) -> Position:
    """Where a run's resume point is (memory-mapped: reads only the small part); with
    world_size, also refuse a resume point written by another number of processes."""
    path = run_dir / "resume.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        position = Position(**state["position"])
        saved = state.get("world_size")
    except Exception as e:  # noqa: BLE001 - any damage means the same thing to the user
        raise damaged(path, e) from e
    if world_size is not None:
        check_world_size(run_dir, int(saved) if saved is not None else None, world_size)
    return position
