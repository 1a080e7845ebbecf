"""The output directory belongs to one run at a time.

`OUT/.lock` names the run that holds it (host, pid, SLURM job, command, start time). A second run is
refused with that information. A lock whose pid is dead on this host, or that belongs to this same
SLURM job (a requeued job restarting on another node), is stale and taken over. `--resume never`
into a folder that already holds checkpoints is refused unless `--overwrite` says to replace them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from greentext_dist.errors import UserError

log = logging.getLogger(__name__)
LOCK = ".lock"


def alive(pid: int) -> bool:
    """Is process `pid` of this host running?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(info: dict) -> str | None:
    """Why a lock no longer holds, or None if its run may still be alive."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and info.get("slurm_job") == job:
        return f"it belongs to this SLURM job ({job}), restarted"
    if info.get("host") == socket.gethostname() and not alive(int(info.get("pid", 0))):
        return f"pid {info.get('pid')} is no longer running"
    return None


def _make_writable_dir(folder: Path) -> None:
    """Create `folder` if needed and write a file in it; an OSError says why it cannot be written."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()


def writable_file(path: str, flag: str) -> None:
    """Check before the work that the result file `path` (given by `flag`) can be written, creating its folder, so
    that a long evaluation never ends in an error that loses its result."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{flag} {path} is a folder", f"pass a file path, e.g. {flag} {p / 'results.json'}")
    try:
        _make_writable_dir(p.parent)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written: {p.parent} is not a writable folder ({e.strerror})",
                        "pick a path in a folder you can write to") from None


def claim(out: Path, resume: str, overwrite: bool) -> Path:
    """Create OUT if needed, check it is writable, apply the resume/overwrite rule and take the lock."""
    try:
        _make_writable_dir(out)
    except OSError as e:
        raise UserError(f"--output-dir {out} is not writable ({e.strerror})", "pick a folder you can write to, or fix its permissions") from None
    lock = out / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                info = json.loads(lock.read_text())
            except (OSError, ValueError):
                info = {}
            why = _stale(info) if info else "it is unreadable"
            if why is None:
                raise UserError(
                    f"--output-dir {out} is in use by pid {info.get('pid')} on {info.get('host')} since {info.get('started')} "
                    f"({info.get('command', '?')})",
                    f"wait for that run, use another --output-dir, or if it is dead on another host delete {lock}",
                ) from None
            log.warning(f"taking over the stale lock {lock}: {why}")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise UserError(f"could not take the lock {lock}", "make sure no other run writes to this --output-dir")
    try:
        _resume_rule(out, resume, overwrite)
    except UserError:
        release(out)
        raise
    return lock


def _resume_rule(out: Path, resume: str, overwrite: bool) -> None:
    ckpts = out / "checkpoints"
    has = ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir())
    if resume == "never" and has:
        if not overwrite:
            raise UserError(f"--resume never, but {ckpts} already holds checkpoints",
                            "resume with --resume auto, choose a new --output-dir, or add --overwrite to delete them")
        log.warning(f"--overwrite: deleting the previous run's checkpoints, final/ and logs in {out}")
        for name in ("checkpoints", "final"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("metrics.jsonl", "samples.jsonl", "report.md", "loss.png"):
            (out / name).unlink(missing_ok=True)


def release(out: Path) -> None:
    lock = out / LOCK
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass
