"""Fault injection for the tests, from the outside: nothing in greentext_dist reads a test switch.

In-process runs use `install(monkeypatch, ...)`. Launched runs get the same faults through tests/plugin/,
a `sitecustomize` that Python imports at start-up when the test puts that folder on PYTHONPATH (with
`launch_env(...)`); it patches the same functions before train.py imports them.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

PLUGIN = Path(__file__).resolve().parent / "plugin"
ENV = "GREENTEXT_FAULTS"  # read by tests/plugin/sitecustomize.py only


def patches(nan_steps=(), disk_full: bool = False, crash_in_save: bool = False, save_error_on_rank: int | None = None,
            source_changed_on_rank: int | None = None, free_disk: int | None = None) -> list[tuple[object, str, object]]:
    """(module, attribute, replacement) for each fault.

    nan_steps: optimizer steps (1-based) whose training loss is multiplied by NaN (validation untouched).
    disk_full: every save fails with ENOSPC after the ranks wrote their files.
    crash_in_save: the process dies (exit 17) after a save's files are written, before it is published.
    save_error_on_rank: that rank fails a save with a RuntimeError (not an OSError) while the others succeed.
    source_changed_on_rank: that rank sees the local source with another fingerprint, as if the file had been
    edited between the ranks' looks at it.
    free_disk: the filesystem of the output folder reports this many bytes free (nothing is filled)."""
    import torch

    from greentext_dist import checkpoint, loss, optim, store

    out = []
    if nan_steps:
        current = {"step": 0}
        real_lr_at, real_loss = optim.lr_at, loss.token_loss_sum

        def lr_at(step, cfg, max_steps):  # called once at the start of every optimizer step, with its 0-based index
            current["step"] = step + 1
            return real_lr_at(step, cfg, max_steps)

        def token_loss_sum(logits, targets, vocab=None):
            value = real_loss(logits, targets, vocab)
            return value * float("nan") if torch.is_grad_enabled() and current["step"] in set(nan_steps) else value

        out += [(optim, "lr_at", lr_at), (loss, "token_loss_sum", token_loss_sum)]
    if disk_full:
        def rng_state():  # the last file every rank writes in a save
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.safetensors")

        out.append((checkpoint, "rng_state", rng_state))
    if save_error_on_rank is not None:
        real_rng_state = checkpoint.rng_state

        def rng_state():
            if int(os.environ.get("RANK", "0")) == save_error_on_rank:
                raise RuntimeError("injected failure on one rank")
            return real_rng_state()

        out.append((checkpoint, "rng_state", rng_state))
    if free_disk is not None:
        out.append((checkpoint, "free_bytes", lambda path: free_disk))
    if source_changed_on_rank is not None and int(os.environ.get("RANK", "0")) == source_changed_on_rank:
        real_fingerprint = store.local_fingerprint

        def local_fingerprint(name):
            return [[*f[:2], f[2] + 1, *f[3:]] for f in real_fingerprint(name)]  # a newer mtime

        out.append((store, "local_fingerprint", local_fingerprint))
    if crash_in_save:
        real_collectively = checkpoint._collectively

        def _collectively(fn, env, tmp, step):
            real_collectively(fn, env, tmp, step)
            if fn.__name__ == "written_by_all_ranks":
                os._exit(17)

        out.append((checkpoint, "_collectively", _collectively))
    return out


def install(monkeypatch, **faults) -> None:
    """In-process: patch the package's modules and the names train.py imported from them."""
    from greentext_dist import train

    for module, name, fn in patches(**faults):
        monkeypatch.setattr(module, name, fn)
        if hasattr(train, name):
            monkeypatch.setattr(train, name, fn)


def launch_env(**faults) -> dict:
    """Environment for a launched run (torchrun, python) with these faults."""
    path = os.pathsep.join([str(PLUGIN), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path, ENV: json.dumps(faults)}
