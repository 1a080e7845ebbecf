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
        self.pending = None  # the vote cast at the end of the previous step: (its work, its tensor)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # The vote is a CPU tensor, so asking never waits on the GPU stream: on a GPU the default group has a gloo
            # backend beside NCCL (dist.backend_for). A group created some other way gets its own gloo group.
            self.group = dist.group.WORLD if "gloo" in dist.get_backend_config() else dist.new_group(backend="gloo")
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
        left = None if self.step_s is None else (max(0.0, self.step_s - (time.monotonic() - self.started)) + self.lag * self.step_s
                                                 + (self.save_s or 0.0))
        when = f" (about {duration(left)}{'' if self.save_s is not None else ' and the save'})" if left is not None else ""
        text = f"{NAMES.get(signum, signum)} received: stopping after step {self.step + self.lag} finishes{when}, with a checkpoint"
        if signum == signal.SIGINT:
            text += "; Ctrl-C again to stop now (checkpoints on disk stay intact)"
        if "TORCHELASTIC_RUN_ID" in os.environ:
            text += (". Under torchrun: it kills the ranks when its --shutdown-timeout (30 s by default) runs out after its "
                     "own signal, saved or not (greentext-train --nproc N waits for the save)")
        return text

    @property
    def lag(self) -> int:
        """Steps between a signal and the step the run stops after: 0 on one rank, 1 on several (see vote)."""
        return 0 if self.group is None else 1

    def vote(self, *flags: bool) -> tuple[bool, ...]:
        """The ranks' agreement, once a step, on "a signal arrived" (always the first flag) and on `flags` (each true on
        every rank if it is true on any). On one rank: these flags, now. On several: the answer is the vote cast at the
        end of the previous step, whose all-reduce ran in gloo's background thread during this step, and this step's
        flags go into a vote cast now. Every rank acts on the same answer, one step late, and no step waits for a
        chain of network hops (a blocking gloo all-reduce across 256 ranks costs milliseconds; 2 ranks on a CPU:
        1.6-1.9 ms a step, scripts/bench_vote.py). Every vote must carry the same number of flags."""
        t = torch.tensor([1 if self.signum else 0, *(1 if f else 0 for f in flags)], dtype=torch.int32)
        if self.group is None:
            return tuple(bool(v) for v in t.tolist())
        previous = self.pending
        self.pending = (dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True), t)
        if previous is None:
            return (False,) * len(t)  # the first step: nothing agreed yet
        previous[0].wait()
        return tuple(bool(v) for v in previous[1].tolist())

    def drain(self) -> bool:
        """Wait for the vote in flight; True if it carried a signal. Every rank calls it at the same point (after a
        save, and when the loop ends), so no collective is left behind."""
        if self.pending is None:
            return False
        work, t = self.pending
        self.pending = None
        work.wait()
        return bool(t[0])

    @property
    def name(self) -> str:
        return NAMES.get(self.signum, "a signal on another rank")

    def __enter__(self) -> "GracefulStop":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.drain()  # (after an error a peer may never cast its part: no wait then)
        for s, handler in self.previous.items():
            signal.signal(s, handler)
