"""Files that are whole or not there: a manifest (size and sha256 of every file) written last and checked before
anything is trusted, fsynced writes, and text replaced atomically. Checkpoints (checkpoint.py) and the copies derived
from them (an engine's converted state) use the same rules."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _in_parallel(fn, items: list) -> list:
    """fn over items on a few threads: hashing and fsync release the GIL, and a checkpoint is several files (shards,
    per-rank optimizer states) of up to gigabytes, which rank 0 would otherwise read one after another while every
    other rank waits."""
    from concurrent.futures import ThreadPoolExecutor

    if len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(8, len(items), os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, items))


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_manifest(folder: Path) -> None:
    """manifest.json: size and sha256 of every file. Files are made readable as the umask allows (some writers
    create 0600 files), so a group can read a shared checkpoint or final model."""
    for p in folder.rglob("*"):
        if p.is_file():
            os.chmod(p, 0o666 & ~_UMASK)
    def entry(p: Path) -> dict:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        return {"bytes": p.stat().st_size, "sha256": _sha256(p)}

    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]
    files = {str(p.relative_to(folder)): e for p, e in zip(paths, _in_parallel(entry, paths))}
    for d in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        _fsync_dir(d)
    atomic_write_text(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def verify(folder: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return "no valid manifest (the save did not finish)"
    for rel, meta in files.items():  # sizes first: a truncated file is found without reading anything
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != meta["bytes"]:
            return f"{rel} has {p.stat().st_size} bytes, expected {meta['bytes']}"
    sums = _in_parallel(_sha256, [folder / rel for rel in files])
    return next((f"{rel} does not match its checksum" for (rel, meta), got in zip(files.items(), sums) if got != meta["sha256"]), None)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def derived(dest: Path, make, warn) -> Path:
    """`dest`, a folder made from other files by `make(folder)` and cached: made in a temporary folder beside it,
    given a manifest, then renamed into place, so a run killed halfway leaves nothing a later run trusts (the next
    call removes the leftover). A copy that fails its manifest is made again (`warn` says so): it can always be."""
    if dest.is_dir():
        problem = verify(dest)
        if problem is None:
            return dest
        warn(f"{dest} is damaged ({problem}): making it again from the checkpoint")
        shutil.rmtree(dest)
    for old in dest.parent.glob(f".{dest.name}-tmp-*"):
        shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-tmp-", dir=dest.parent))
    try:
        make(tmp)
        write_manifest(tmp)
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
