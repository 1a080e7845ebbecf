"""Graceful stop: SIGTERM, SIGUSR1 (SLURM's warning before the time limit) and SIGINT ask the run to
finish the current optimizer step, save a checkpoint and exit 0. A second SIGINT stops at once; the
previous checkpoint is intact because saves are atomic."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

# SIGUSR1 does not exist on Windows: there, SIGTERM and SIGINT still stop gracefully.
NAMES = {getattr(signal, name): name for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name)}


class GracefulStop:
    def __init__(self):
        self.signum: int | None = None
        self.group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            # A CPU (gloo) group for the stop vote, so asking never waits on the GPU stream.
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.previous = {s: signal.signal(s, self._handle) for s in NAMES}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def vote(self, *flags: bool) -> tuple[bool, ...]:
        """Collective on the CPU group, one all-reduce for every flag: each is true on every rank if it is true on any
        (never waits on the GPU). The first flag is always "a signal arrived", so asking costs nothing extra."""
        t = torch.tensor([1 if self.signum else 0, *(1 if f else 0 for f in flags)], dtype=torch.int32)
        if self.group is not None:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return tuple(bool(v) for v in t.tolist())

    @property
    def name(self) -> str:
        return NAMES.get(self.signum, "a signal on another rank")

    def __enter__(self) -> "GracefulStop":
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
