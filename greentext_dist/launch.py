"""What every way of starting training does first (early): answer `--help`, a mistyped flag or a bad setting in well
under a second, before torch, transformers and the engines load; and `greentext-train --nproc N ...` (or
`python -m greentext_dist.train --nproc N ...`): start N ranks on this machine and stop them the way the README promises.

torchrun starts its workers in sessions of their own, so Ctrl-C reaches only torchrun; it forwards the signal, kills the
workers 30 s later (its shutdown timeout) whether or not their checkpoint is written, and then exits 1 with a
`SignalException` traceback even when every rank saved and exited 0. Here, a signal (Ctrl-C, SIGTERM, SIGUSR1) is
forwarded once to every rank, which finishes its step, saves and exits 0; this launcher waits as long as that takes and
exits 0 too. A second Ctrl-C is forwarded as well and stops the ranks at once (exit 130). One node only: for several,
use torchrun or srun as slurm/train.sbatch does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from greentext_dist.errors import UserError

# After a rank fails, the others get this long to fail the same way (an error all ranks agree on ends them together)
# before they are killed: a rank whose peer died would otherwise wait in a collective for the 30-minute timeout.
GRACE_S = 20.0


def split_nproc(argv: list[str]) -> tuple[int | None, list[str]]:
    """(N of --nproc N / --nproc=N, the other arguments)."""
    rest, n = [], None
    it = iter(argv)
    for a in it:
        if a == "--nproc" or a.startswith("--nproc="):
            value = a.partition("=")[2] if "=" in a else next(it, "")
            if not value.isdigit() or int(value) < 1:
                raise UserError(f"--nproc {value or '(missing)'} is not a number of ranks", "pass --nproc N with N >= 1, e.g. --nproc 2")
            n = int(value)
        else:
            rest.append(a)
    if n is not None and "RANK" in os.environ and "GREENTEXT_LAUNCHED" not in os.environ:
        raise UserError("--nproc starts the ranks itself, but this process is already one rank of a launcher (RANK is set)",
                        "drop --nproc (the launcher sets the number of ranks), or run greentext-train --nproc N without a launcher")
    return n, rest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, argv: list[str]) -> int:
    """Run train.py ARGV as `nproc` ranks; return the exit code for the whole job."""
    port = str(_free_port())
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "GREENTEXT_LAUNCHED": "1"}
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        # Sessions of their own, as torchrun does: a terminal's Ctrl-C reaches this launcher only, which forwards it once.
        # train.py as a file (it finds its package beside itself): works from any folder, installed or not.
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).with_name("train.py")), *argv], env=env, start_new_session=True))

    signals = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None]
    received = []

    def forward(signum, _frame) -> None:
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in signals}
    first = None  # (rank, exit code) of the first rank seen to fail
    try:
        while any(p.poll() is None for p in procs):
            if first is None:
                first = next(((r, p.returncode) for r, p in enumerate(procs) if p.returncode not in (None, 0)), None)
                failed_at = time.monotonic()
            elif time.monotonic() - failed_at > GRACE_S:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [p.wait() for p in procs]
    first = first or next(((r, c) for r, c in enumerate(codes) if c != 0), None)
    if first is None:
        return 0
    rank, code = first
    if code < 0:
        sys.stderr.write(f"error: rank {rank} was killed by signal {-code}. Fix: see the first error above (out of memory is a common "
                         "cause); rerun the same command to resume from the last checkpoint\n")
        return 1
    return code


def early(argv: list[str]) -> None:
    """Parse the command line before the heavy imports: exit here for --help (0), a bad setting (2, one line) or a
    `--nproc N` launch (the job's code); return when this process should train."""
    from greentext_dist.config import parse_args_with_sources

    try:
        n, rest = split_nproc(argv)
        parse_args_with_sources(rest)
    except UserError as e:
        from greentext_dist.ui import fail

        fail(str(e))
        sys.stderr.flush()
        os._exit(2)
    if n is not None:
        sys.stdout.flush()
        os._exit(launch(n, rest))


def interrupt_early() -> None:
    """Ctrl-C during the imports and set-up: one line, no traceback (the graceful handler takes over in the loop)."""
    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("error: interrupted outside the training steps; checkpoints on disk "
                                                            "are intact. Fix: rerun the same command to resume\n"), os._exit(130)))
