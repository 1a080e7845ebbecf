"""Graceful stop: SIGTERM, SIGUSR1 (SLURM's warning before the time limit) and SIGINT ask the run to
finish the current optimizer step, save a checkpoint and exit 0. The signal is acknowledged at once, with about how long
the stop will take. A second SIGINT stops at once; the previous checkpoint is intact because saves are atomic."""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

from greentext_dist.perf import duration

# SIGUSR1 does not exist on Windows: there, SIGTERM and SIGINT still stop gracefully.
NAMES = {getattr(signal, name): name for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name)}


class GracefulStop:
    """`announce`: say at once that the signal arrived (one rank per node does, so a job's log has a line per node)."""

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self.step, self.started, self.step_s, self.save_s = 0, time.monotonic(), None, None
        self.group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            # A CPU (gloo) group for the stop vote, so asking never waits on the GPU stream.
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.previous = {s: signal.signal(s, self._handle) for s in NAMES}

    def at_step(self, step: int, step_s: float | None, save_s: float | None) -> None:
        """The loop starts optimizer step `step`; a step takes about `step_s`, a save `save_s` (None: not known yet)."""
        self.step, self.started, self.step_s, self.save_s = step, time.monotonic(), step_s, save_s

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        first, self.signum = self.signum is None, signum
        if first and self.announce:
            # os.write, not print or logging: a handler may run in the middle of either.
            os.write(2, (self.acknowledgement(signum) + "\n").encode())

    def acknowledgement(self, signum: int) -> str:
        left = None if self.step_s is None else max(0.0, self.step_s - (time.monotonic() - self.started)) + (self.save_s or 0.0)
        when = f" (about {duration(left)}{'' if self.save_s is not None else ' and the save'})" if left is not None else ""
        text = f"{NAMES.get(signum, signum)} received: stopping after step {self.step} finishes{when}, with a checkpoint"
        if signum == signal.SIGINT:
            text += "; Ctrl-C again to stop now (checkpoints on disk stay intact)"
        if "TORCHELASTIC_RUN_ID" in os.environ:
            text += (". Under torchrun: it kills the ranks when its --shutdown-timeout (30 s by default) runs out after its "
                     "own signal, saved or not (greentext-train --nproc N waits for the save)")
        return text

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
