"""Checkpoints: OUT/checkpoints/step-N/ is a loadable HF GPT-2 directory with the resumable state in train_state/.

A save is written to a hidden temporary folder, fsynced, given a manifest (sizes + sha256),
then renamed into place; `latest` moves only after the rename. A crash mid-save leaves the
previous checkpoints untouched, and a folder without a valid manifest is never resumed from.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from greentext_dist.dist import barrier
from greentext_dist.errors import UserError
from greentext_dist.lora import ADAPTER
from greentext_dist.files import MANIFEST, _fsync_dir, atomic_write_text, verify, write_manifest  # noqa: F401 (also read from here)

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAIN_STATE = "train_state"


# The tokenizer, config and manifest files of every checkpoint (tokenizer.json is 3.6 MB).
HF_EXTRA_BYTES = 3_600_000


def checkpoint_bytes(backend: str, precision: str, n_params: int) -> tuple[int, int]:
    """(one step checkpoint on disk, all ranks' files; its stock HF weights alone), from the engine's own numbers
    (EngineSpec.checkpoint_bytes: per parameter, as measured on each engine's files, tiny on CPU, and XL on an H200)."""
    from greentext_dist.engines import ENGINES

    weights, state = ENGINES[backend].checkpoint_bytes(precision, n_params)
    return weights + state + HF_EXTRA_BYTES, weights + HF_EXTRA_BYTES


# A shared cluster file system under load, per rank 0's save (write, fsync, then read back for the checksums): the
# start's guess at a save's time, until the first save is measured.
WRITE_BYTES_PER_S = 250e6


def save_seconds(n_bytes: int) -> float:
    return 2 * n_bytes / WRITE_BYTES_PER_S  # written once, read once for the manifest's sha256


def folder_bytes(folder: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file()) if folder.is_dir() else 0


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds `path`, or will: its nearest existing parent's."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def find_resumable(root: Path) -> Path | None:
    """Newest intact checkpoint. A damaged newer one is reported and moved out of the rotation (kept as damaged-step-N,
    never deleted); with checkpoints present but none intact, the run stops: starting over would throw the run away."""
    dirs = step_dirs(root)
    damaged = []
    for step, path in reversed(dirs):
        problem = verify(path)
        if problem is None:
            break
        damaged.append((path, problem))
    else:
        path = None
    if damaged and path is None:
        what = "; ".join(f"{p.name}: {problem}" for p, problem in damaged)
        raise UserError(f"no usable checkpoint in {root} ({what})",
                        "restore the damaged files (from a backup, or the disk or node that wrote them) and rerun the same command; "
                        "or start over in a new folder (--output-dir NEW), or here with --resume never --overwrite (which moves "
                        f"them into {root.parent / 'overwritten'}, nothing is deleted)")
    for p, problem in damaged:
        kept = p.with_name(f"damaged-{p.name}")
        n = 1
        while kept.exists():
            kept, n = p.with_name(f"damaged-{p.name}.{n}"), n + 1
        os.replace(p, kept)
        log.warning(f"checkpoint {p.name} is unusable ({problem}): resuming from {path.name} instead. The damaged one is kept as "
                    f"{kept} (outside the rotation); restore it and rename it back to resume from it, or delete it when you no longer need it")
    return path


def resolve_resume(resume: str, root: Path) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        return find_resumable(root)
    path = Path(resume)
    if STEP_DIR.match(path.name) is None and (path / "checkpoints").is_dir():
        found = find_resumable(path / "checkpoints")  # a run folder was given
        if found is None:
            raise UserError(f"--resume {resume} holds no checkpoint", "pass a checkpoints/step-N folder, or --resume never")
        return found
    if not path.is_dir():
        raise UserError(f"--resume {resume} does not exist", "pass OUT/checkpoints/step-N, auto or never")
    if not (path / TRAIN_STATE / "trainer.json").is_file():
        raise UserError(f"--resume {resume} holds no training state (an exported model, not a checkpoint)",
                        f"resume from OUT/checkpoints/step-N, or start a new run from these weights: --output-dir NEW --model-path {resume}")
    problem = verify(path)
    if problem:
        raise UserError(f"checkpoint {resume} is unusable: {problem}", "restore the damaged file, or resume from an older step-N folder")
    return path


def save_checkpoint(engine, root: Path, step: int, trainer_state: dict, tokenizer, keep_last: int, max_shard_size: str) -> Path:
    """Collective: every rank calls it. Returns the final folder."""
    env = engine.env
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / TRAIN_STATE).mkdir(parents=True)
    barrier()

    def written_by_all_ranks() -> None:
        engine.export_hf(tmp, max_shard_size)
        engine.save_state(tmp / TRAIN_STATE)
        torch.save(rng_state(), tmp / TRAIN_STATE / f"rng-rank{env.rank}.pt")

    _collectively(written_by_all_ranks, env, tmp, step)

    def finish_on_rank0() -> None:
        if not env.is_main:
            return
        tokenizer.save_pretrained(tmp)
        (tmp / TRAIN_STATE / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
        write_manifest(tmp)
        _replace_dir(tmp, final)  # a re-save of the same step (e.g. after resume) replaces it whole
        atomic_write_text(root / "latest", final.name + "\n")
        others = [d for _, d in step_dirs(root) if d != final]  # by step number; never the one just written
        for old in others[:max(0, len(others) - (keep_last - 1))]:
            # Renamed first, so a kill mid-delete never leaves a half-deleted folder that looks like a checkpoint.
            gone = root / f".rot-{old.name}"
            os.replace(old, gone)
            shutil.rmtree(gone, ignore_errors=True)

    _collectively(finish_on_rank0, env, tmp, step)
    return final


def save_best(engine, root: Path, step: int, val_loss: float, tokenizer, max_shard_size: str) -> Path:
    """Collective: the weights (stock HF, no training state) with the lowest validation loss so far, in
    root/best, outside the step-N rotation. Replaced atomically: a kill never leaves a half-written best."""
    env = engine.env
    dest, tmp, old = root / "best", root / ".tmp-best", root / ".del-best"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    _collectively(lambda: engine.export_hf(tmp, max_shard_size), env, tmp, step)

    def publish_on_rank0() -> None:
        if not env.is_main:
            return
        tokenizer.save_pretrained(tmp)
        (tmp / "best.json").write_text(json.dumps({"step": step, "val_loss": val_loss}))
        write_manifest(tmp)
        _replace_dir(tmp, dest, old)

    _collectively(publish_on_rank0, env, tmp, step)
    return dest


def _replace_dir(new: Path, dest: Path, old: Path | None = None) -> None:
    """Put the complete folder `new` at `dest`. The folder it replaces is renamed away first and deleted only after
    the new one is in place, so a kill at any moment leaves a complete copy under `dest`, `new` or `old`
    (remove_partial_saves puts it back)."""
    old = old or dest.with_name(f".del-{dest.name}")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    _fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)


def _collectively(fn, env, tmp: Path, step: int) -> None:
    """Run one phase of a save on every rank and agree on the outcome, so a full disk on one rank stops all of
    them (none left waiting in a barrier) and leaves no half-written folder behind."""
    from greentext_dist.dist import all_reduce_sum

    error = None
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - any failure on one rank must reach the others, not leave them in the all-reduce
        error = e
    failed = all_reduce_sum(torch.tensor([1.0 if error else 0.0], device=env.device)).item() > 0
    if failed:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = tmp.parent / "latest"
        previous = latest.read_text().strip() if latest.exists() else None
        where = getattr(error, "filename", None) or str(tmp)
        why = (getattr(error, "strerror", None) or f"{type(error).__name__}: {error}") if error else "another rank failed to write its part"
        if error is None:
            fix = "see the failing rank's error above, then rerun the same command to resume"
        elif isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free disk space (or point --output-dir at a larger disk) and rerun the same command to resume"
        elif isinstance(error, OSError):
            fix = f"check that {tmp.parent} can be written (permissions, a mounted disk) and rerun the same command to resume"
        else:
            fix = "rerun the same command to resume; if the same error comes back, please report it with this message"
        raise UserError(
            f"saving checkpoint step-{step} failed: {why} ({where}); the partial save was removed"
            + (f" and {previous} is intact" if previous else ""), fix)
    barrier()


def remove_partial_saves(root: Path) -> None:
    """Clear what a killed run left half-done (the lock says no one else is writing). A folder is deleted only when a
    complete copy of it exists: a save killed between its renames (see _replace_dir) is finished instead."""
    if not root.is_dir():
        return
    for name in [p.name for _, p in step_dirs(root)] + [m.group(1) for p in root.iterdir() if (m := re.match(r"^\.(?:tmp|del)-(step-\d+)$", p.name))]:
        _recover(root, name, root / f".tmp-{name}", root / f".del-{name}")
    _recover(root, "best", root / ".tmp-best", root / ".del-best")
    for name in ("final", ADAPTER):  # OUT/final and OUT/adapter, beside the checkpoints
        _recover(root.parent, name, root.parent / f".tmp-{name}", root.parent / f".del-{name}")
    for p in root.glob(".rot-step-*"):  # a rotation that was interrupted: that checkpoint was being deleted anyway
        shutil.rmtree(p, ignore_errors=True)


def _recover(root: Path, name: str, tmp: Path, old: Path) -> None:
    dest = root / name
    if not dest.exists():
        # Killed between the renames of _replace_dir: the new copy if it is complete, else the one it was replacing.
        for candidate in (tmp, old):
            if candidate.is_dir() and verify(candidate) is None:
                log.warning(f"{dest}: finishing a save that was interrupted after it was complete ({candidate.name})")
                os.replace(candidate, dest)
                break
    for p in (tmp, old):
        if p.is_dir():
            if p == tmp:
                log.warning(f"removing {p}: a save that did not finish")
            shutil.rmtree(p, ignore_errors=True)


def _link_or_copy(src, dst) -> None:
    """A hard link (no second copy of gigabytes of weights), or a copy where the file system has none."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def publish_final(ckpt: Path, dest: Path, extra: dict[str, str] | None = None) -> None:
    """OUT/final: the HF files of a checkpoint (hard links where possible), without training state, plus `extra`
    files (name -> text, e.g. the model card)."""
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in ckpt.iterdir():
        if p.is_file() and p.name not in (MANIFEST, "best.json"):
            _link_or_copy(p, tmp / p.name)
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    write_manifest(tmp)
    _replace_dir(tmp, dest)


def publish_adapter(ckpt: Path, dest: Path) -> None:
    """OUT/adapter: a LoRA checkpoint's adapter (PEFT's files, hard links where possible), replaced as OUT/final is."""
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt / ADAPTER, tmp, copy_function=_link_or_copy)
    write_manifest(tmp)
    _replace_dir(tmp, dest)


def read_trainer_state(ckpt: Path) -> dict:
    return json.loads((ckpt / TRAIN_STATE / "trainer.json").read_text())


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def load_rng_state(ckpt: Path, rank: int) -> bool:
    path = ckpt / TRAIN_STATE / f"rng-rank{rank}.pt"
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True
