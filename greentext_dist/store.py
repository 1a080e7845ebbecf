"""The token store: a source tokenised once into flat, memory-mapped arrays (the nanoGPT/Megatron layout) that every
later run, requeue, rank and node reads by index.

    CACHE/<source>-<key>/tokens.bin   every post's tokens + <|endoftext|>, back to back (uint16 for GPT-2's 50,257)
                         offsets.bin  int64, n_posts + 1: post i is tokens[offsets[i]:offsets[i + 1]]
                         hashes.bin   uint64 per post, the hash behind the validation split (data.is_val_post), so any
                                      --val-fraction is a mask over it, not a new tokenisation
                         meta.json    counts, file sizes and checksums, and the key; written last

The key is what determines the content: the source's fingerprint (local: file names, sizes, mtimes and a hash of each
file's head and tail; hub: the revision), the text mapping (--text-field), the tokenizer (a hash of its vocabulary,
merges and rules) and FORMAT. A store is built in a private temporary folder, under a lock, and renamed into place, so
two ranks or jobs preparing the same store never see each other's half-written files.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from greentext_dist.errors import UserError, first_line
from greentext_dist.sources import KNOWN_DATA_FILES, estimate_posts, local_files, post_hash

log = logging.getLogger(__name__)

# Bump FORMAT when the layout or the meaning of a file changes: old stores are then never read.
# 2: special-token text in posts is ordinary text; 3: "\r\n" and "\r" read as "\n", a leading BOM dropped.
FORMAT = 3
FILES = ("tokens.bin", "offsets.bin", "hashes.bin")
BATCH = 1000  # posts per tokenizer call (the Rust tokenizer spreads a batch over every core)
SAMPLE = 1 << 16  # bytes hashed from each end of a local file for its fingerprint (cheap for a folder of many files)


def default_cache_dir() -> Path:
    """$GREENTEXT_CACHE, else $XDG_CACHE_HOME/greentext_dist/tokens, else ~/.cache/greentext_dist/tokens."""
    if env := os.environ.get("GREENTEXT_CACHE"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "greentext_dist" / "tokens"


# ---------------------------------------------------------------- keys


def local_fingerprint(name: str) -> list:
    """Names, sizes, mtimes and a hash of each file's first and last 64 KiB: O(files), not O(bytes)."""
    root = Path(os.path.expanduser(name))
    out = []
    for f in local_files(name):
        st = f.stat()
        h = hashlib.blake2b(digest_size=16)
        with open(f, "rb") as fh:
            h.update(fh.read(SAMPLE))
            if st.st_size > SAMPLE:
                fh.seek(max(SAMPLE, st.st_size - SAMPLE))
                h.update(fh.read(SAMPLE))
        out.append([str(f.relative_to(root)) if root.is_dir() else f.name, st.st_size, st.st_mtime_ns, h.hexdigest()])
    return out


def hub_revision(name: str) -> str:
    from huggingface_hub import HfApi

    return HfApi().dataset_info(name).sha


def tokenizer_fingerprint(tok) -> str:
    """What decides the ids `encode` gives: the model (vocabulary, merges), normalizer, pre-tokenizer and added tokens,
    not how a file spells the rest. The hub's `gpt2` tokenizer.json and the bundled GPT-2 files differ only in a
    post-processor, a decoder and a flag of the special token, none of which touch ordinary-text encoding; a store
    prepared with one is found with the other (an offline node without the HF cache falls back to the bundled files)."""
    backend = getattr(tok, "backend_tokenizer", None)
    h = hashlib.blake2b(digest_size=16)
    if backend is None:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    else:
        for part in (backend.model, backend.normalizer, backend.pre_tokenizer):  # each serialises itself as JSON, fast
            h.update(part.__getstate__() if part is not None else b"null")
        added = sorted((i, t.content, True) if t.special else (i, t.content, False, t.normalized, t.lstrip, t.rstrip, t.single_word)
                       for i, t in backend.get_added_tokens_decoder().items())
        h.update(json.dumps(added).encode())
    h.update(f"|eos={tok.eos_token_id}".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Key:
    """What a store's content depends on. `source` is the name as given; `origin` is its fingerprint."""

    source: str
    origin: str  # json of the local fingerprint, or "hub:<revision>"
    text: str  # how a record becomes a post: "post:<field or auto>" or "mix:<field or auto>"
    tokenizer: str

    def digest(self) -> str:
        parts = json.dumps([self.origin, self.text, self.tokenizer, FORMAT])
        return hashlib.blake2b(parts.encode(), digest_size=8).hexdigest()

    def folder(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.source.rstrip("/")).name or self.source)[:40]
        return f"{slug}-{self.digest()}"


def hub_commit(name: str) -> str | None:
    """A hub dataset's current commit; None for a local source, or while the hub is unreachable."""
    from greentext_dist.hub import hub_offline, is_local

    if is_local(name) or hub_offline():
        return None
    try:
        return hub_revision(name)
    except Exception as e:  # noqa: BLE001 - not found, gated, network: all one line for the user
        raise UserError(f"cannot look up dataset '{name}' on the Hugging Face hub ({e.__class__.__name__}: {first_line(e, 120)})",
                        "check the id (and huggingface-cli login for gated datasets), or pass a local file or folder") from None


def source_key(name: str, text: str, tokenizer_fp: str, revision: str | None = None) -> Key | None:
    """The key of `name` now; None for a hub dataset while the hub is unreachable (see `find_offline`). `revision`:
    the hub commit, when already looked up (training asks once, on rank 0, for every rank)."""
    from greentext_dist.hub import is_local

    if is_local(name):
        return Key(name, json.dumps(local_fingerprint(name)), text, tokenizer_fp)
    revision = revision or hub_commit(name)
    return Key(name, f"hub:{revision}", text, tokenizer_fp) if revision else None


# ---------------------------------------------------------------- reading


class Store:
    """One prepared source, memory-mapped: nothing is read until a row asks for it."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta
        self.n_posts, self.n_tokens = meta["posts"], meta["tokens"]
        self.tokens = mapped(path / "tokens.bin", meta["dtype"], self.n_tokens)
        self.offsets = mapped(path / "offsets.bin", np.int64, self.n_posts + 1)
        self.hashes = mapped(path / "hashes.bin", np.uint64, self.n_posts)

    @classmethod
    def open(cls, path: Path, key: Key | None = None) -> Store:
        """Open a finished store, checking what can be checked in O(1): format, key and file sizes."""
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise damaged(path, f"its meta.json is unreadable ({e.__class__.__name__})") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"token store {path} has format {meta.get('format')}, this version reads format {FORMAT}",
                            f"delete {path} and rerun (or run python -m greentext_dist.prepare) to rebuild it")
        if key is not None:
            for part in ("origin", "text", "tokenizer"):
                if meta["key"].get(part) != getattr(key, part):
                    what = "tokenizer" if part == "tokenizer" else "source content" if part == "origin" else "text mapping"
                    raise UserError(f"token store {path} was built with another {what} than this run uses",
                                    f"delete {path} and rerun to rebuild it for this run")
        for name, want in meta["files"].items():
            have = (path / name).stat().st_size if (path / name).exists() else None
            if have != want["bytes"]:
                raise damaged(path, f"{name} has {have if have is not None else 'no'} bytes, {want['bytes']} expected")
        return cls(path, meta)

    def verify(self) -> None:
        """The full check (O(size)): every file's checksum."""
        for name, want in self.meta["files"].items():
            if file_digest(self.path / name) != want["blake2b"]:
                raise damaged(self.path, f"{name} does not match its checksum")

    def post(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def val_mask(self, fraction: float) -> np.ndarray:
        """Which posts are held out: exactly data.is_val_post, from the stored hashes."""
        if fraction <= 0:
            return np.zeros(self.n_posts, dtype=bool)
        return self.hashes.astype(np.float64) / 2.0**64 < fraction


def mapped(path: Path, dtype, n: int) -> np.ndarray:
    """A read-only memory map as a plain ndarray (slicing an np.memmap is ~10x slower)."""
    if n == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,)).view(np.ndarray)


def damaged(path: Path, why: str) -> UserError:
    return UserError(f"token store {path} is damaged: {why}",
                     f"rebuild it with python -m greentext_dist.prepare (same --dataset), or delete {path} and rerun")


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def find_offline(cache: Path, source: str, text: str, tokenizer_fp: str) -> Path | None:
    """Hub unreachable: the newest store of this hub dataset built for this mapping and tokenizer, if any."""
    best = None
    for meta_path in cache.glob("*/meta.json"):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        k = meta.get("key", {})
        if (meta.get("format"), k.get("source"), k.get("text"), k.get("tokenizer")) == (FORMAT, source, text, tokenizer_fp) \
                and k.get("origin", "").startswith("hub:") and (best is None or meta["built_at"] > best[0]):
            best = (meta["built_at"], meta_path.parent)
    return best[1] if best else None


# ---------------------------------------------------------------- building


@contextmanager
def locked(lock_path: Path, what: str):
    """An exclusive lock on a file beside the store; waits (without a timeout) while another process builds it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # Some cluster file systems have no flock (Lustre without -o flock). The build stays safe without it:
                # each builder writes its own temporary folder and the first one finished is kept (see build).
                log.warning(f"{lock_path.parent} does not support file locks ({e.strerror}): building the token store of {what} "
                            "without one (another process building it at the same time only costs time)")
                yield
                return
            log.info(f"waiting for another process to finish the token store of {what} ({lock_path})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure(source: str, text: str, tokenizer, posts: Callable[[str | None], Iterator[str]], cache_dir: Path, *,
           revision: str | None = None, repair: bool = False, rebuild: bool = False, progress: bool = True,
           defer: bool = False, flag: str = "--dataset") -> Store:
    """The store of `source`, built if missing (under a lock, atomically); `posts(revision)` yields its texts.
    revision: a hub dataset's commit, if already looked up. repair: rebuild a damaged store instead of refusing it.
    defer: when it must be built, let another rank (the one that shows progress) take the lock first. flag: the option
    that named the source (--dataset, --val-dataset or --mix), for the fix of an error."""
    cache_dir = Path(cache_dir).expanduser()
    tok_fp = tokenizer_fingerprint(tokenizer)
    key = source_key(source, text, tok_fp, revision)
    if key is None:  # a hub dataset, offline
        found = find_offline(cache_dir, source, text, tok_fp)
        if found is None:
            given, local = (f"{source}=WEIGHT", "DIR/FILE=WEIGHT") if flag == "--mix" else (source, f"DIR/{KNOWN_DATA_FILES.get(source, '')}")
            raise UserError(f"dataset '{source}' is on the Hugging Face hub, which is unreachable, and {cache_dir} holds no token store of it",
                            f"prepare it where the hub is reachable (python -m greentext_dist.prepare {flag} {given} --cache-dir DIR) "
                            f"and pass that --cache-dir, or download the files and pass {flag} {local}")
        store = Store.open(found)
        log.info(f"hub unreachable: using the token store of {source} at {store.meta['key']['origin']} ({found})")
        return store
    path = cache_dir / key.folder()
    if (path / "meta.json").exists() and not rebuild:
        try:
            return Store.open(path, key)
        except UserError:
            if not repair:
                raise
            log.warning(f"token store {path} is damaged: rebuilding it")
            rebuild = True
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the token cache {cache_dir} ({e.strerror})", "pass --cache-dir (or set GREENTEXT_CACHE) to a writable folder") from None
    if defer:
        time.sleep(2.0)
    with locked(cache_dir / f".{key.folder()}.lock", source):
        if (path / "meta.json").exists() and not rebuild:
            return Store.open(path, key)  # another process built it while we waited
        if path.exists():
            retire(path)  # being rebuilt, or a folder without meta.json, which was never a finished store
        for stale in cache_dir.glob(f".{key.folder()}.tmp-*"):
            if abandoned(stale):
                shutil.rmtree(stale, ignore_errors=True)
        revision = key.origin[4:] if key.origin.startswith("hub:") else None
        build(path, key, tokenizer, posts(revision), progress, estimate_posts(source))
        if source_key(source, text, tok_fp, revision) != key:  # a local source changed (a hub build read one commit)
            retire(path)
            raise UserError(f"dataset {source} changed while its token store was being built (nothing was kept)",
                            "rerun once the files are complete, or prepare from a copy that nothing writes to")
    return Store.open(path, key)


def abandoned(tmp: Path) -> bool:
    """A build's temporary folder (.NAME.tmp-HOST-PID.RANDOM) that no builder will finish: its process on this host is
    gone, or it is a day old. (Where locks do not reach across nodes, another node may be building into its own.)"""
    host, _, pid = tmp.name.rpartition(".tmp-")[2].rpartition(".")[0].rpartition("-")
    if host == socket.gethostname() and pid.isdigit():
        from greentext_dist.rundir import alive

        return not alive(int(pid))
    try:
        return time.time() - tmp.stat().st_mtime > 86400
    except OSError:
        return False


def retire(path: Path) -> None:
    gone = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def build(path: Path, key: Key, tokenizer, texts: Iterator[str], show_progress: bool, total: int | None) -> None:
    """Tokenise `texts` into a store at `path`: written in a temporary folder, then renamed in (atomic)."""
    from greentext_dist.ui import BuildProgress

    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    eos = tokenizer.eos_token_id
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}.{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    t0, n_posts, n_tokens = time.perf_counter(), 0, 0
    try:
        files = {name: open(tmp / name, "wb") for name in FILES}
        digests = {name: hashlib.blake2b(digest_size=16) for name in FILES}

        def write(name: str, array: np.ndarray) -> None:
            b = array.tobytes()
            files[name].write(b)
            digests[name].update(b)

        write("offsets.bin", np.zeros(1, np.int64))
        with BuildProgress(total, show_progress) as bar:
            for batch in background(batched(texts, BATCH), depth=4):
                ids = encode(tokenizer, batch)
                lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
                flat: list[int] = []
                for x in ids:
                    flat += x
                    flat.append(eos)
                write("tokens.bin", np.asarray(flat, dtype=dtype))
                write("offsets.bin", n_tokens + np.cumsum(lengths))
                write("hashes.bin", np.fromiter((post_hash(t) for t in batch), dtype=np.uint64, count=len(batch)))
                n_posts, n_tokens = n_posts + len(batch), n_tokens + int(lengths.sum())
                bar.advance(len(batch), int(lengths.sum()))
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        meta = {"format": FORMAT, "key": {"source": key.source, "origin": key.origin, "text": key.text, "tokenizer": key.tokenizer},
                "posts": n_posts, "tokens": n_tokens, "dtype": np.dtype(dtype).name, "eos": eos,
                "files": {n: {"bytes": (tmp / n).stat().st_size, "blake2b": digests[n].hexdigest()} for n in FILES},
                "built_at": time.time(), "build_seconds": round(time.perf_counter() - t0, 3)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, path)  # atomic: readers see no store or a whole one
        except OSError:
            if not (path / "meta.json").exists():
                raise
            # Another process built the same store first (its lock did not reach us: no flock, or a node-local one).
            shutil.rmtree(tmp, ignore_errors=True)
            log.info(f"token store of {key.source}: another process finished it first; using {path}")
            return
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise UserError(f"no space left in {path.parent} while writing the token store of {key.source} "
                            f"({n_tokens * np.dtype(dtype).itemsize // 2**20} MiB written, nothing kept)",
                            "free space, or point --cache-dir (or GREENTEXT_CACHE) at a larger disk: a store takes ~2 bytes per token") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dt = time.perf_counter() - t0
    log.info(f"token store of {key.source}: {n_posts:,} posts, {n_tokens:,} tokens in {dt:.1f} s "
             f"({n_tokens / max(dt, 1e-9) / 1e3:,.0f}k tokens/s) -> {path}")


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Posts as ordinary text: a literal "<|endoftext|>" in a post is spelled out in BPE tokens (tiktoken's
    encode_ordinary, as nanoGPT prepares data), so a post boundary only ever comes from the packer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast") and hasattr(backend, "encode_special_tokens"):
        # A tokenizer.json may carry truncation or padding settings: a post is never cut or padded here.
        before, truncation, padding = backend.encode_special_tokens, backend.truncation, backend.padding
        backend.encode_special_tokens = True
        backend.no_truncation()
        backend.no_padding()
        try:
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = before
            if truncation:
                backend.enable_truncation(**truncation)
            if padding:
                backend.enable_padding(**padding)
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True, truncation=False)["input_ids"]


def batched(items: Iterator[str], n: int) -> Iterator[list[str]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def background(items: Iterator, depth: int) -> Iterator:
    """Run an iterator in a daemon thread, `depth` items ahead: reading overlaps tokenising (which releases the GIL),
    and the train loader gathers batches while the accelerator computes. Its errors surface in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work():
        try:
            for item in items:
                q.put((item, None))
            q.put((done, None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put((None, e))

    threading.Thread(target=work, daemon=True, name="greentext-read").start()
    while True:
        item, err = q.get()
        if err is not None:
            raise err
        if item is done:
            return
        yield item


