"""Streamed posts -> GPT-2 tokens -> packed rows, resumable to the exact post and token.

The packed stream is global and identical on every rank: rank r of W keeps rows r, r+W, r+2W, ...
so a step's global batch is the same rows whatever the world size, and the saved position
(epoch, posts read, packer buffer, rows) is the same on every rank and valid for any world size.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import queue
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from greentext_dist.errors import UserError
from greentext_dist.hub import hub_offline, is_local

if TYPE_CHECKING:
    from datasets import IterableDataset

BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}
# Hub repos that hold the same posts in several formats: pick one.
KNOWN_DATA_FILES = {"DarwinAnim8or/greentext": "greentexts.jsonl"}
IGNORE_INDEX = -100
TOKENIZE_CHUNK = 64  # posts per batched tokenizer call (the Rust tokenizer parallelises within a call)



# ---------------------------------------------------------------- sources


def open_dataset(name: str) -> IterableDataset:
    """A streaming `datasets` view of a hub id, a local file or a local directory."""
    from datasets import load_dataset

    if is_local(name):
        path = Path(os.path.expanduser(name))
        files = sorted(p for p in path.rglob("*") if p.suffix in BUILDERS and p.is_file()) if path.is_dir() else [path]
        if not files:
            raise UserError(f"dataset folder {name} holds no {'/'.join(BUILDERS)} files", "point --dataset at a data file or a folder of them")
        kinds = {BUILDERS.get(p.suffix) for p in files}
        if None in kinds:
            raise UserError(f"dataset {name} has unsupported type '{path.suffix}'", f"use one of {', '.join(BUILDERS)}")
        if len(kinds) > 1:
            raise UserError(f"dataset folder {name} mixes file types {sorted(kinds)}", "keep one type per folder")
        empty = [str(p) for p in files if p.stat().st_size == 0]
        if empty:
            raise UserError(f"dataset file {empty[0]} is empty", "point --dataset at a file with posts")
        builder = kinds.pop()
        # .txt: one post per blank-line-separated paragraph, since greentext posts span several lines.
        extra = {"sample_by": "paragraph"} if builder == "text" else {}
        return load_dataset(builder, data_files=[str(p) for p in files], split="train", streaming=True, **extra)
    if name.count("/") > 1 or name.startswith((".", "/", "~")) or Path(name).suffix in BUILDERS:
        raise UserError(f"dataset {name} does not exist", "check the path, or pass a hub id like DarwinAnim8or/greentext")
    if hub_offline():
        raise UserError(
            f"dataset '{name}' is on the Hugging Face hub, which is unreachable",
            f"download it elsewhere (huggingface-cli download --repo-type dataset {name} --local-dir DIR) and pass --dataset DIR",
        )
    return load_dataset(name, data_files=KNOWN_DATA_FILES.get(name), split="train", streaming=True)


def text_getter(example: dict, text_field: str | None, source: str) -> Callable[[dict], str]:
    """How to read a post from an example: --text-field, else `text`, else prompt + completion."""
    if text_field:
        if text_field not in example:
            raise UserError(f"dataset {source} has no field '{text_field}' (fields: {', '.join(example)})", "pass one of those to --text-field")
        fields = (text_field,)
    elif "text" in example:
        fields = ("text",)
    elif "prompt" in example and "completion" in example:
        fields = ("prompt", "completion")
    else:
        raise UserError(
            f"dataset {source} has no 'text' or 'prompt'+'completion' field (fields: {', '.join(example)})",
            "pass --text-field NAME",
        )

    def get(ex: dict) -> str:
        parts = [ex[f] for f in fields]
        for f, v in zip(fields, parts):
            if v is not None and not isinstance(v, str):
                raise UserError(f"dataset {source}: field '{f}' holds a {type(v).__name__} ({str(v)[:40]!r}), not text",
                                f"make '{f}' a string in every record, or pick another field with --text-field")
        return "".join(v or "" for v in parts)

    return get


def parse_mix(specs: list[str]) -> list[tuple[str, float]]:
    """--mix NAME_OR_PATH=WEIGHT (repeatable): each weight is that source's share of the posts read; the
    main --dataset gets the rest."""
    out = []
    for spec in specs:
        name, _, weight = spec.rpartition("=")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not name or not 0 < w < 1:
            raise UserError(f"--mix {spec!r} is not NAME_OR_PATH=WEIGHT with a weight between 0 and 1", "write e.g. --mix hellaswag=0.1")
        out.append((name, w))
    if sum(w for _, w in out) >= 1:
        raise UserError(f"--mix weights add up to {sum(w for _, w in out):g}, leaving nothing for --dataset", "keep their sum below 1")
    return out


def open_mix_source(name: str, text_field: str | None) -> IterableDataset:
    """One --mix source as a stream of {'text'}. 'hellaswag' (or a file in its schema) becomes context + gold ending."""
    from greentext_dist.hellaswag import HUB_ID, training_text

    if name.lower() == "hellaswag":
        if hub_offline():
            raise UserError(f"--mix hellaswag needs {HUB_ID} from the Hugging Face hub, which is unreachable",
                            "download it elsewhere and pass --mix PATH/TO/hellaswag.jsonl=WEIGHT")
        from datasets import load_dataset

        ds = load_dataset(HUB_ID, split="train", streaming=True)
    else:
        ds = open_dataset(name)
    first = first_example(ds, name)
    strings = [k for k, v in first.items() if isinstance(v, str)]
    if {"endings", "label"} <= set(first) and not text_field:
        to_text = training_text
    elif "text" not in first and len(strings) == 1:  # one text column, whatever its name
        to_text = lambda ex: ex[strings[0]] or ""  # noqa: E731
    else:
        to_text = text_getter(first, text_field, name)
    return ds.map(lambda ex: {"text": to_text(ex)}, remove_columns=list(first))


def open_train_dataset(dataset: str, text_field: str | None, mix: list[str], seed: int) -> tuple[IterableDataset, Callable[[dict], str]]:
    """The training posts: --dataset alone, or interleaved with --mix sources."""
    ds = open_dataset(dataset)
    first = first_example(ds, dataset)
    get_text = text_getter(first, text_field, dataset)
    return with_mix(ds, first, get_text, mix, seed) if mix else (ds, get_text)


def with_mix(ds: IterableDataset, first: dict, get_text, mix: list[str], seed: int) -> tuple[IterableDataset, Callable[[dict], str]]:
    """--dataset interleaved with the --mix sources by weight (seeded, so a resumed run reads the same
    interleaving; an epoch ends when --dataset is exhausted)."""
    from datasets import interleave_datasets

    sources = parse_mix(mix)
    main = ds.map(lambda ex: {"text": get_text(ex)}, remove_columns=list(first))
    streams = [main] + [open_mix_source(name, None) for name, _ in sources]
    probs = [1 - sum(w for _, w in sources)] + [w for _, w in sources]
    mixed = interleave_datasets(streams, probabilities=probs, seed=seed, stopping_strategy="first_exhausted")
    return mixed, lambda ex: ex["text"] or ""


def val_stream(dataset: str, text_field: str | None, val_fraction: float, tokenizer, seq_len: int,
               all_posts: bool = False) -> PackedStream:
    """The held-out posts of `dataset` (hash split), in file order, packed as in training: for training's
    validation and `evaluate --task val-loss` alike."""
    ds = open_dataset(dataset)
    get_text = text_getter(first_example(ds, dataset), text_field, dataset)
    keep = (lambda t: True) if all_posts else (lambda t: is_val_post(t, val_fraction))
    return PackedStream(ds, get_text, tokenizer, seq_len, seed=0, shuffle_buffer=1, keep=keep, shuffle=False)


def is_val_post(text: str, fraction: float) -> bool:
    """Held-out membership by a stable hash of the post, so it never depends on order, seed or world size."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def first_example(ds: IterableDataset, source: str) -> dict:
    try:
        with readable(source):
            return next(iter(ds))
    except StopIteration:
        raise UserError(f"dataset {source} has no rows", "point --dataset at a file with posts") from None


def first_bad_json_line(source: str) -> tuple[str, int, str] | None:
    """(file, line number, error) of the first line of a local .jsonl/.json source that is not one JSON object."""
    import json

    path = Path(os.path.expanduser(source))
    files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json")) if path.is_dir() else [path]
    for f in files:
        if f.suffix not in (".jsonl", ".json") or not f.is_file():
            continue
        with open(f, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    if not isinstance(json.loads(line), dict):
                        return str(f), n, "not a JSON object"
                except ValueError as e:
                    return str(f), n, str(e)
    return None


@contextmanager
def readable(source: str):
    """Turn a reader's failure on a malformed local file into one line naming the file and line."""
    try:
        yield
    except UserError:
        raise
    except Exception:
        bad = first_bad_json_line(source) if is_local(source) else None
        if bad is None:
            raise
        f, n, why = bad
        raise UserError(f"{f} line {n} is not valid JSON ({why})", "fix or delete that line (one JSON object per line)") from None


# ---------------------------------------------------------------- packing


@dataclass
class DataState:
    epoch: int = 0
    posts: int = 0  # examples read from this epoch's shuffled stream
    buffer: list[int] = field(default_factory=list)  # packer tokens not yet emitted
    rows: int = 0  # rows emitted since the start of the run

    def to_dict(self) -> dict:
        return asdict(self)


class PackedStream:
    """Endless, epoch-reshuffled stream of (row of seq_len+1 tokens, state after that row).

    Posts are tokenised on the fly and joined with <|endoftext|>. Row k holds stream tokens
    [k*T, k*T+T]: consecutive rows share one token, so every token is a target exactly once.
    A new epoch starts with an empty buffer: only the final partial row of an epoch is dropped.
    """

    def __init__(self, ds: IterableDataset, get_text, tokenizer, seq_len: int, *, seed: int,
                 shuffle_buffer: int, keep: Callable[[str], bool] = lambda _: True, shuffle: bool = True):
        self.ds, self.get_text, self.tok, self.T = ds, get_text, tokenizer, seq_len
        self.seed, self.shuffle_buffer, self.keep, self.shuffle = seed, shuffle_buffer, keep, shuffle
        self.eos = tokenizer.eos_token_id

    def epoch_examples(self, epoch: int) -> Iterator[dict]:
        if not self.shuffle:
            return iter(self.ds)
        ds = self.ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        ds.set_epoch(epoch)
        return iter(ds)

    def posts(self, epoch: int, skip: int) -> Iterator[tuple[int, list[int]]]:
        """(examples read so far, tokens of the post + EOS) for the kept posts of one epoch."""
        examples = itertools.islice(self.epoch_examples(epoch), skip, None)
        n = skip
        while chunk := list(itertools.islice(examples, TOKENIZE_CHUNK)):
            texts, counts = [], []
            for ex in chunk:
                n += 1
                text = self.get_text(ex).strip()
                if text and self.keep(text):
                    texts.append(text)
                    counts.append(n)
            ids = self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []
            for count, toks in zip(counts, ids):
                yield count, toks + [self.eos]
            if len(chunk) < TOKENIZE_CHUNK:
                return

    def rows(self, state: DataState, *, epochs: int | None = None) -> Iterator[tuple[list[int], DataState]]:
        epoch, skip, buf, rows = state.epoch, state.posts, list(state.buffer), state.rows
        T = self.T
        while epochs is None or epoch < epochs:
            emitted, from_start = False, skip == 0 and not buf
            posts, count = self.posts(epoch, skip), skip
            while True:
                # Drain first: a resumed buffer may already hold whole rows.
                start = 0
                while len(buf) - start >= T + 1:
                    row = buf[start:start + T + 1]
                    start += T
                    rows += 1
                    emitted = True
                    yield row, DataState(epoch, count, buf[start:], rows)
                del buf[:start]
                if (nxt := next(posts, None)) is None:
                    break
                count, toks = nxt
                buf.extend(toks)
            if not emitted and from_start:
                raise UserError("the training data holds fewer than --seq-len + 1 tokens", "lower --seq-len or add data")
            epoch, skip, buf = epoch + 1, 0, []


def count_corpus(stream: PackedStream, source: str = "") -> dict:
    """One pass over one epoch: posts, tokens (with EOS), rows. Order does not matter, so no shuffle.
    Being a full pass, it is also where a malformed line anywhere in a local file is found and named."""
    posts = tokens = 0
    saved, stream.shuffle = stream.shuffle, False
    try:
        with readable(source):
            for _, toks in stream.posts(0, 0):
                posts += 1
                tokens += len(toks)
    finally:
        stream.shuffle = saved
    rows = max(tokens - 1, 0) // stream.T
    return {"posts": posts, "tokens": tokens, "rows": rows}


# ---------------------------------------------------------------- batches


def doc_positions(x: torch.Tensor, eos: int) -> torch.Tensor:
    """Position ids that restart at every <|endoftext|>, which opens the next post, as at generation time."""
    idx = torch.arange(x.shape[1], device=x.device).expand_as(x)
    starts = torch.where(x == eos, idx, 0).cummax(dim=1).values
    return idx - starts


def isolated_inputs(position_ids: torch.Tensor | None) -> dict:
    """Model inputs for isolated packing: restarted positions and a block-diagonal causal mask (True = attend),
    passed as a 4-D mask that transformers hands to SDPA unchanged. (transformers' own packed-sequence
    detection from position ids only remaps positions and still lets a post see the posts before it.)"""
    if position_ids is None:
        return {}
    doc = (position_ids == 0).cumsum(dim=1)
    T = position_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    return {"position_ids": position_ids, "attention_mask": mask[:, None]}


def to_batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tensor(rows, dtype=torch.long)
    return t[:, :-1], t[:, 1:]


def _background(items: Iterator, depth: int) -> Iterator:
    """Run an iterator in a daemon thread, `depth` items ahead. The tokenizer releases the GIL, so
    posts are tokenised and packed while the accelerator computes. Errors surface in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)

    def work():
        try:
            for item in items:
                q.put((item, None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
            q.put((None, e))

    threading.Thread(target=work, daemon=True, name="greentext-prefetch").start()
    while True:
        item, err = q.get()
        if err is not None:
            raise err
        yield item


class TrainLoader:
    """Micro-batches for one rank. Each call reads micro x world rows of the global stream and keeps
    this rank's share, so the state after a call is the same on every rank. With `prefetch`, batches are
    built ahead in a background thread; the order and the saved state are exactly the same."""

    def __init__(self, stream: PackedStream, state: DataState, micro: int, rank: int, world: int, device,
                 prefetch: int = 0, isolated: bool = False):
        self.micro, self.rank, self.world, self.device = micro, rank, world, torch.device(device)
        self.eos, self.isolated = stream.eos, isolated
        self.state = state
        self._rows = stream.rows(state)
        self._batches = _background(self._produce(), prefetch) if prefetch else self._produce()

    def _produce(self):
        pin = self.device.type == "cuda"
        while True:
            mine, state = [], None
            for _ in range(self.micro):
                group = [next(self._rows) for _ in range(self.world)]
                mine.append(group[self.rank][0])
                state = group[-1][1]
            x, y = to_batch(mine)
            pos = doc_positions(x, self.eos) if self.isolated else None
            if pin:
                x, y, pos = x.pin_memory(), y.pin_memory(), pos.pin_memory() if pos is not None else None
            yield x, y, pos, state

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, DataState]:
        x, y, pos, self.state = next(self._batches)
        to = lambda t: t.to(self.device, non_blocking=True) if t is not None else None  # noqa: E731
        return to(x), to(y), to(pos), self.state


def val_rows(stream: PackedStream) -> list[list[int]]:
    """All validation tokens in order, packed like training; the last partial row is padded, not dropped."""
    buf: list[int] = []
    for _, toks in stream.posts(0, 0):
        buf.extend(toks)
    T = stream.T
    rows = [buf[i:i + T + 1] for i in range(0, max(len(buf) - 1, 0), T)]
    return rows


def val_batches(rows: list[list[int]], micro: int, rank: int, world: int, limit: int | None, eos: int | None = None):
    """This rank's validation batches (x, y, position ids when `eos` is given for isolated packing).
    Every rank gets the same number of batches (sharded engines need
    every rank in every forward); padding rows and positions carry IGNORE_INDEX targets."""
    T = max((len(r) for r in rows), default=2) - 1
    mine = rows[rank::world]
    n_batches = -(-len(rows) // (world * micro))
    if limit:
        n_batches = min(n_batches, limit)
    for b in range(n_batches):
        chunk = mine[b * micro:(b + 1) * micro]
        x = torch.full((micro, T), 0, dtype=torch.long)
        y = torch.full((micro, T), IGNORE_INDEX, dtype=torch.long)
        for i, r in enumerate(chunk):
            r = torch.tensor(r, dtype=torch.long)
            x[i, :len(r) - 1] = r[:-1]
            y[i, :len(r) - 1] = r[1:]
        yield x, y, doc_positions(x, eos) if eos is not None else None
