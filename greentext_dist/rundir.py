"""The output directory belongs to one run at a time.

`OUT/.lock` names the run that holds it (host, pid, SLURM job, command, start time). A second run is
refused with that information. A lock whose pid is dead on this host, or that belongs to this same
SLURM job (a requeued job restarting on another node), is stale and taken over. `--resume never`
into a folder that already holds checkpoints is refused unless `--overwrite` says to replace them; even then the
previous run is moved into OUT/overwritten/<time>/ (a rename: instant, never a copy), not deleted, and an input of this
run that lies inside what would move is refused before anything moves.
"""

from __future__ import annotations

import json
import logging
import os
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


def claim(out: Path, resume: str, overwrite: bool, inputs: dict[str, str] | None = None) -> Path:
    """Create OUT if needed, check it is writable, apply the resume/overwrite rule and take the lock. `inputs`: flag ->
    path of what this run reads (model, data, tokenizer, ...), none of which --overwrite may move away."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file, not a folder", f"pass a folder path (e.g. --output-dir {out.with_suffix('')}-run)")
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
        _resume_rule(out, resume, overwrite, inputs or {})
    except UserError:
        release(out)
        raise
    return lock


# What a run writes at the top of OUT, and what --overwrite moves aside (config.toml is rewritten, never moved:
# `--config OUT/config.toml` is how a run is repeated).
RUN_FILES = ("checkpoints", "final", "metrics.jsonl", "samples.jsonl", "report.md", "loss.png", "hellaswag.json", "tensorboard", "wandb",
             "wandb_run_id")
OVERWRITTEN = "overwritten"


def _resume_rule(out: Path, resume: str, overwrite: bool, inputs: dict[str, str]) -> None:
    ckpts = out / "checkpoints"
    has = ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir())
    if resume == "never" and has:
        if not overwrite:
            raise UserError(f"--resume never, but {ckpts} already holds checkpoints",
                            "choose a new --output-dir, resume with --resume auto, or add --overwrite to move them into "
                            f"{out / OVERWRITTEN} and start over")
        set_aside(out, [out / name for name in RUN_FILES], inputs, "the previous run's checkpoints, final/ and logs")


def inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def check_not_inside(paths: list[Path], inputs: dict[str, str], why: str) -> None:
    """Refuse before anything moves when this run reads from what would move: following our own fix messages
    (`--model-path OUT/checkpoints/step-N` with `--overwrite`) must never take the run's input away."""
    for flag, value in inputs.items():
        given = Path(value).expanduser()
        if not given.exists():
            continue  # a hub id, or a path that is checked (and named) where it is read
        for p in paths:
            if p.exists() and inside(given, p):
                raise UserError(f"{flag} {value} lies inside {p}, which {why} would move away",
                                f"start the new run in another folder (--output-dir NEW) and keep {flag} {value}; or copy it out of "
                                f"{p} first")


def set_aside(out: Path, paths: list[Path], inputs: dict[str, str], what: str) -> Path | None:
    """Move `paths` (inside OUT) into OUT/overwritten/<time>/, keeping their layout: nothing is deleted, and a rename
    costs no time or space. Returns the folder, or None if there was nothing to move."""
    paths = [p for p in paths if p.exists()]
    if not paths:
        return None
    check_not_inside(paths, inputs, "--overwrite")
    dest = out / OVERWRITTEN / time.strftime("%Y-%m-%dT%H-%M-%S")
    n = 1
    while dest.exists():
        dest, n = dest.with_name(f"{dest.name.split('.')[0]}.{n}"), n + 1
    for p in paths:
        target = dest / p.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, target)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    log.warning(f"--overwrite: moved {what} ({size / 2**30:.2f} GiB) to {dest}; delete it when you no longer need it")
    return dest


def release(out: Path) -> None:
    lock = out / LOCK
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass
