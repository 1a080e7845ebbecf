"""The Hugging Face hub: is it reachable (asked once, quickly, so offline nodes never sit in retry loops), and
model or tokenizer repos as local folders in the HF cache, downloaded once per job rather than once per rank."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from greentext_dist.errors import UserError, first_line

# What we read from a GPT-2 repo: never its pickled .bin, TF, Flax or ONNX files.
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json")


@functools.cache
def hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
        return False
    except OSError:
        return True


def is_local(name: str) -> bool:
    return os.path.exists(os.path.expanduser(name))


def missing(folder: str, files) -> str | None:
    """What a downloaded folder lacks of what we need from it (None: complete)."""
    import json

    d = Path(folder)
    if "config.json" in files and not (d / "config.json").is_file():
        return "no config.json: it is not a transformers model"
    if "*.safetensors" in files:
        index = d / "model.safetensors.index.json"
        shards = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else set()
        if not any(d.glob("*.safetensors")):
            return "no .safetensors weights (only pickled ones, which are never loaded here)"
        if absent := sorted(s for s in shards if not (d / s).is_file()):
            return f"no {absent[0]}, a shard its index lists"
    if "config.json" not in files and "tokenizer.json" in files and not ((d / "tokenizer.json").is_file() or (d / "vocab.json").is_file()):
        return "no tokenizer files (tokenizer.json or vocab.json + merges.txt)"
    return None


def download(name: str, files=MODEL_FILES + TOKENIZER_FILES, revision: str | None = None, what: str = "model", instead: str = "") -> str:
    """The folder in the HF cache that holds `files` of hub repo `name` at `revision` (default: its newest commit),
    downloaded if missing. Offline, the cache alone answers. A pinned commit already in the cache costs no request.
    `instead`: how the caller takes a local folder, for the error's fix (default: pass DIR instead of NAME)."""
    from huggingface_hub import snapshot_download

    patterns = list(files)
    if name.count("/") > 1 or name.startswith((".", "/", "~")):
        raise UserError(f"{what} {name} does not exist", "check the path, or pass a hub id like gpt2 or ORG/NAME")
    if revision:  # every rank but the first: the commit rank 0 downloaded, normally already in this cache
        try:
            folder = snapshot_download(name, revision=revision, allow_patterns=patterns, local_files_only=True)
            if missing(folder, patterns) is None:
                return folder
        except Exception:  # noqa: BLE001 - not in this node's cache: download exactly that commit below
            pass
    try:
        folder = snapshot_download(name, revision=revision, allow_patterns=patterns, local_files_only=hub_offline())
    except Exception as e:  # noqa: BLE001 - not found, gated, network, not cached offline: all one line for the user
        if hub_offline():
            raise UserError(f"{what} '{name}' is not cached and the Hugging Face hub is unreachable",
                            f"download it where the hub is reachable (hf download {name}) into the same cache (HF_HOME), "
                            f"or into a folder (--local-dir DIR) and {instead or f'pass DIR instead of {name}'}") from None
        raise UserError(f"cannot download {what} '{name}' from the Hugging Face hub ({type(e).__name__}: {first_line(e, 160)})",
                        "check the id (and hf auth login for gated or private repos), or pass a local directory") from None
    if problem := missing(folder, patterns):
        raise UserError(f"hub repo '{name}' has {problem}", f"pass a GPT-2 {what} repo, or a local directory converted to safetensors "
                        "(save_pretrained(DIR, safe_serialization=True))")
    return folder


def shared_download(name: str, files=MODEL_FILES + TOKENIZER_FILES, what: str = "model", instead: str = "") -> str:
    """`name` as a local folder: a local path as it is; a hub repo downloaded by rank 0, which looks up its commit
    once for the job, and then taken at that commit by every other rank from its cache (or downloaded where its
    node's cache lacks it). Collective when a process group is up: every rank calls it. Hundreds of ranks asking
    the hub at once get rate-limited, and could each see a different commit."""
    from greentext_dist.dist import everywhere, gather, on_main

    local = gather(is_local(name))  # one answer for every rank: a folder on one node's disk only would split them
    if any(local) and not all(local):
        there = [r for r, ok in enumerate(local) if ok]
        raise UserError(f"{what} {name} exists on rank(s) {', '.join(map(str, there[:8]))} but not on the others (a node-local folder?)",
                        "put it on a file system every node mounts, or pass its hub id")
    if local[0]:
        return os.path.expanduser(name)
    commit = Path(on_main(download, name, files, what=what, instead=instead)).name  # snapshot folders are named by commit
    # Every rank takes that commit; a rank whose download fails stops every rank with its line, none is left waiting.
    return everywhere(download, name, files, revision=commit, what=what, instead=instead)
