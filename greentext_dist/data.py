"""Posts -> a token store (tokenised once, see store.py) -> packed rows that each rank reads by index.

An epoch is a seeded permutation of the training posts laid end to end with <|endoftext|> after each, cut into rows
of seq_len + 1 tokens (consecutive rows share one token, so every token is a target exactly once). The row order is
global: rank r of W reads rows r, r+W, r+2W, ... so a step's global batch is the same rows whatever the world size,
and the saved position (epoch, row) is the same on every rank, valid for any world size, and resumed by a seek.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from greentext_dist.attention import dense_doc_mask, flex_doc_mask
from greentext_dist.config import parse_mix
from greentext_dist.errors import UserError
from greentext_dist.hub import hub_offline, is_local
from greentext_dist.store import background, folder_splits, local_files

if TYPE_CHECKING:
    from datasets import IterableDataset

BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
BINARY = (".parquet", ".arrow")  # read in place: never compressed around, never lines of text
# posts.jsonl.gz: `datasets` decompresses while it streams. Suffix -> (Python module, shell tool that prints it).
COMPRESSED = {".gz": ("gzip", "zcat"), ".bz2": ("bz2", "bzcat"), ".xz": ("lzma", "xzcat")}
# Hub repos that hold the same posts in several formats: pick one.
KNOWN_DATA_FILES = {"DarwinAnim8or/greentext": "greentexts.jsonl"}
IGNORE_INDEX = -100


# ---------------------------------------------------------------- sources


def data_suffix(path: Path) -> str:
    """What a file holds: '.jsonl' for posts.jsonl and for posts.jsonl.gz."""
    return Path(path.stem).suffix if path.suffix in COMPRESSED else path.suffix


def open_bytes(path: Path):
    """A data file's bytes, decompressed."""
    import importlib

    return importlib.import_module(COMPRESSED[path.suffix][0]).open(path, "rb") if path.suffix in COMPRESSED else open(path, "rb")


def open_dataset(name: str, revision: str | None = None) -> IterableDataset:
    """A streaming `datasets` view of a hub id (at `revision`), a local file or a local directory."""
    from datasets import load_dataset

    check_source_name(name)
    if is_local(name):
        path = Path(os.path.expanduser(name))
        files = local_files(name)
        if not files:
            raise UserError(f"dataset folder {name} holds no {'/'.join(BUILDERS)} files", "point --dataset at a data file or a folder of them")
        kinds = {BUILDERS.get(data_suffix(p)) for p in files}
        if None in kinds:
            raise UserError(f"dataset {name} has unsupported type '{''.join(path.suffixes[-2:]) or path.name}'",
                            f"use one of {', '.join(BUILDERS)}, optionally compressed ({', '.join(COMPRESSED)})")
        if len(kinds) > 1:
            # e.g. a hub repo downloaded whole, which often holds the same posts as .jsonl and .parquet
            by_kind = {k: [str(f.relative_to(path)) for f in files if BUILDERS[data_suffix(f)] == k] for k in sorted(kinds)}
            listed = "; ".join(f"{k}: {', '.join(fs[:3])}{', ...' if len(fs) > 3 else ''}" for k, fs in by_kind.items())
            example = path / by_kind[min(by_kind, key=lambda k: len(by_kind[k]))][0]
            raise UserError(f"dataset folder {name} mixes file types ({listed})",
                            f"point --dataset at one file, e.g. --dataset {example}, or keep one type per folder")
        if packed := [p for p in files if data_suffix(p) in BINARY and p.suffix in COMPRESSED]:
            raise UserError(f"dataset file {packed[0]} is a compressed {data_suffix(packed[0])[1:]} file, which cannot be read as a stream",
                            f"decompress it ({COMPRESSED[packed[0].suffix][1]} {packed[0]} > {packed[0].with_suffix('')}): "
                            "the format compresses its own columns already")
        if missing := [p for p in files if not p.is_file()]:
            raise UserError(f"dataset {name} lists {missing[0].name}, which is not there", "save the dataset again (save_to_disk)")
        empty = [str(p) for p in files if p.stat().st_size == 0]
        if empty:
            raise UserError(f"dataset file {empty[0]} is empty", "point --dataset at a file with posts")
        if path.is_dir() and len(splits := folder_splits(path)) > 1 and "train" in splits:
            others = ", ".join(sorted(set(splits) - {"train"}))
            logging.getLogger(__name__).info(f"{name} holds the splits train, {others} (by file name, as `datasets` reads a folder): "
                                             f"training on train's {len(files)} file(s); --val-dataset takes another split's files")
        builder = kinds.pop()
        # .txt: one post per blank-line-separated paragraph, since greentext posts span several lines.
        extra = {"sample_by": "paragraph"} if builder == "text" else {}
        if builder == "json" and (field := records_field(files)):
            extra["field"] = field
        return load_dataset(builder, data_files=[str(p) for p in files], split="train", streaming=True, **extra)
    if hub_offline():
        raise UserError(
            f"dataset '{name}' is on the Hugging Face hub, which is unreachable",
            f"download it elsewhere (huggingface-cli download --repo-type dataset {name} --local-dir DIR) and pass "
            f"--dataset DIR/{KNOWN_DATA_FILES.get(name, '')}",
        )
    return load_dataset(name, data_files=KNOWN_DATA_FILES.get(name), split="train", streaming=True, revision=revision)


def records_field(files: list[Path]) -> str | None:
    """The key that holds the records when every .json file is one object with them in a list (SQuAD's {"data": [...]}),
    which `datasets` reads only when told the key; None for JSON lines or a top-level list."""
    import json

    fields = set()
    for f in files:
        with open_bytes(f) as fh:
            head = fh.read(1 << 16).lstrip()
        if not head.startswith(b"{"):
            return None
        first, _, rest = head.partition(b"\n")
        try:
            obj = json.loads(first)
            if rest.strip() or "text" in obj or {"prompt", "completion"} <= set(obj):
                return None  # JSON lines (or one post on one line)
            # else one object on one line: a minified {"version": ..., "data": [...]}
        except ValueError:
            try:
                with open_bytes(f) as fh:
                    obj = json.loads(fh.read())  # the json builder reads a whole .json file into memory anyway
            except ValueError:
                return None  # malformed: the reader's error names the line
        lists = [k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v[:100])]
        if len(lists) != 1:
            return None
        fields.add(lists[0])
    return fields.pop() if len(fields) == 1 else None


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

    def join(parts) -> str:
        for f, v in zip(fields, parts):
            if v is not None and not isinstance(v, str):
                raise UserError(f"dataset {source}: field '{f}' holds a {type(v).__name__} ({str(v)[:40]!r}), not text",
                                f"make '{f}' a string in every record, or pick another field with --text-field")
        return "".join(v or "" for v in parts)

    def get(ex: dict) -> str:
        return join([ex[f] for f in fields])

    get.batch = lambda b: [join(parts) for parts in zip(*(b[f] for f in fields))]  # a batch of columns, ~10x faster
    return get


def open_mix_source(name: str, text_field: str | None, revision: str | None = None) -> IterableDataset:
    """One --mix source as a stream of {'text'}. 'hellaswag' (or a file in its schema) becomes context + gold ending."""
    from greentext_dist.hellaswag import HUB_ID, training_text

    if name.lower() == "hellaswag":
        if hub_offline():
            raise UserError(f"--mix hellaswag needs {HUB_ID} from the Hugging Face hub, which is unreachable",
                            "download it elsewhere and pass --mix PATH/TO/hellaswag.jsonl=WEIGHT")
        from datasets import load_dataset

        ds = load_dataset(HUB_ID, split="train", streaming=True, revision=revision)
    else:
        ds = open_dataset(name, revision)
    first = first_example(ds, name)
    strings = [k for k, v in first.items() if isinstance(v, str)]
    if {"endings", "label"} <= set(first) and not text_field:
        to_text = training_text
    elif "text" not in first and len(strings) == 1:  # one text column, whatever its name
        to_text = lambda ex: ex[strings[0]] or ""  # noqa: E731
    else:
        to_text = text_getter(first, text_field, name)
    return ds.map(lambda ex: {"text": to_text(ex)}, remove_columns=list(first))


def one_newline(text: str) -> str:
    """Line endings as "\n": "\r\n" and a lone "\r" are line breaks, as Python reads a text file (and as a .txt
    source reaches us), so a post is the same tokens from a .txt, .jsonl, .csv or .parquet file, or a prompt."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def clean_post(text: str) -> str:
    """A post as the store keeps it: one kind of line ending, no blank space or byte-order mark (a file's first
    character when Windows editors save it) around it; "" drops the post."""
    return one_newline(text).strip().lstrip("\ufeff").strip()


def source_posts(name: str, text_field: str | None, revision: str | None = None) -> Iterator[str]:
    """The non-blank posts of a --dataset/--val-dataset source, cleaned (clean_post), in file order."""
    ds = open_dataset(name, revision)
    get_text = text_getter(first_example(ds, name), text_field, name)
    with readable(name):
        for batch in ds.iter(batch_size=1000):
            for text in get_text.batch(batch):
                if text := clean_post(text):
                    yield text


def mix_posts(name: str, revision: str | None = None) -> Iterator[str]:
    """The non-blank posts of a --mix source (any text column; HellaSwag as context + gold ending), cleaned."""
    with readable(name):
        for ex in open_mix_source(name, None, revision):
            if text := clean_post(ex["text"] or ""):
                yield text


def post_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def is_val_post(text: str, fraction: float) -> bool:
    """Held-out membership by a stable hash of the (cleaned) post, so it never depends on order, seed or world
    size. The store keeps each post's hash, so Store.val_mask gives the same answer without the text."""
    return fraction > 0 and post_hash(text) / 2**64 < fraction


def first_example(ds: IterableDataset, source: str) -> dict:
    try:
        with readable(source):
            return next(iter(ds))
    except StopIteration:
        raise UserError(f"dataset {source} has no rows", "point --dataset at a file with posts") from None


def first_bad_json_line(source: str) -> tuple[str, int, str] | None:
    """(file, line number, error) of the first line of a local .jsonl/.json source that is not one JSON object."""
    import json

    for f in local_files(source):
        if data_suffix(f) not in (".jsonl", ".json") or not f.is_file():
            continue
        with io.TextIOWrapper(open_bytes(f), encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    if not isinstance(json.loads(line.rstrip("\r\n")), dict):
                        return str(f), n, "not a JSON object"
                except ValueError as e:
                    return str(f), n, str(e)
    return None


def first_undecodable(source: str) -> tuple[str, int, bytes] | None:
    """(file, line number, bytes) of the first text in a local source that is not UTF-8 (parquet and arrow are binary: skipped)."""
    for f in local_files(source):
        if data_suffix(f) in BINARY:
            continue
        with open_bytes(f) as fh:
            for n, line in enumerate(fh, 1):  # a UTF-8 sequence never holds the byte of "\n"
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    return str(f), n, line[e.start:e.end]
    return None


def file_with_columns(source: str, columns: list[str]) -> str | None:
    """The first file of a local source whose records have exactly these columns (for an error message)."""
    from datasets import load_dataset

    for f in local_files(source):
        try:
            if set(next(iter(load_dataset(BUILDERS[data_suffix(f)], data_files=[str(f)], split="train", streaming=True)))) == set(columns):
                return str(f)
        except Exception:  # noqa: BLE001 - only looking
            continue
    return None


@contextmanager
def readable(source: str):
    """Turn a reader's failure on a malformed local file (not UTF-8, or a bad JSON line) into one line naming the file
    and line."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        if not is_local(source):
            raise
        from datasets.table import CastError

        if isinstance(e, CastError):  # a file whose columns differ from the first's
            odd = file_with_columns(source, e.table_column_names)
            raise UserError(f"{odd or 'a file of ' + source} has columns {sorted(e.table_column_names)} where the first file of "
                            f"{source} has {sorted(e.requested_column_names)}", "keep one kind of record per folder, or point at one file") from None
        if undecodable := first_undecodable(source):
            f, n, raw = undecodable
            path = Path(f)
            plain = path.with_suffix("") if path.suffix in COMPRESSED else path
            convert = f"{COMPRESSED[path.suffix][1]} {f} | iconv -f cp1252 -t utf-8" if path.suffix in COMPRESSED else f"iconv -f cp1252 -t utf-8 {f}"
            raise UserError(f"{f} line {n} is not UTF-8 text (bytes {raw.hex(' ')})",
                            f"convert it to UTF-8 and read the copy, e.g. {convert} > {plain.with_stem(plain.stem + '-utf8')} "
                            "(cp1252: the usual Windows encoding)") from None
        bad = first_bad_json_line(source)
        if bad is None:
            raise
        f, n, why = bad
        raise UserError(f"{f} line {n} is not valid JSON ({why})", "fix or delete that line (one JSON object per line)") from None


# ---------------------------------------------------------------- stores -> packed rows


def cache_dir(setting: str | None) -> Path:
    from greentext_dist.store import default_cache_dir

    return Path(setting).expanduser() if setting else default_cache_dir()


def prepare_source(name: str, text_field: str | None, tokenizer, cache: Path, *, mix: bool = False, revision: str | None = None,
                   repair: bool = False, rebuild: bool = False, progress: bool = True, defer: bool = False, val: bool = False):
    """The token store of one source (built on first use). `mix`: read it as a --mix source; `val`: it is the
    --val-dataset (for messages). `revision`: a hub source's commit, if already looked up (see hub_revisions)."""
    from greentext_dist import store

    key_name = stored_name(name, mix)
    if key_name == name:
        check_source_name(name)
    text = f"{'mix' if mix else 'post'}:{text_field or 'auto'}"
    posts = (lambda rev: mix_posts(name, rev)) if mix else (lambda rev: source_posts(name, text_field, rev))
    flag = "--mix" if mix else "--val-dataset" if val else "--dataset"
    return store.ensure(key_name, text, tokenizer, posts, cache, revision=revision, repair=repair, rebuild=rebuild, progress=progress,
                        defer=defer, flag=flag)


def stored_name(name: str, mix: bool = False) -> str:
    """The name a source's store is keyed by: `--mix hellaswag` is HellaSwag's hub id."""
    from greentext_dist.hellaswag import HUB_ID

    return HUB_ID if mix and name.lower() == "hellaswag" else name


def hub_sources(d) -> list[str]:
    """The stored names of --dataset, --val-dataset and the --mix sources."""
    return [d.dataset, *([d.val_dataset] if d.val_dataset else []), *(stored_name(name, mix=True) for name, _ in parse_mix(d.mix))]


def source_commit(name: str) -> str | None:
    """A source's current hub commit: None for a local one or while the hub is unreachable."""
    from greentext_dist import store

    check_source_name(name)
    return store.hub_commit(name)


def hub_revisions(d) -> dict[str, str]:
    """The current commit of each hub source of this run. Training asks on rank 0 only and hands the answer to every
    rank: hundreds of ranks asking the hub's API at once get rate-limited, and could each see a different commit."""
    return {name: rev for name in hub_sources(d) if (rev := source_commit(name))}


def check_source_name(name: str) -> None:
    """A name that looks like a path but is not one: say so before anything asks the hub about it."""
    from greentext_dist.hub import is_local

    if not is_local(name) and (name.count("/") > 1 or name.startswith((".", "/", "~")) or data_suffix(Path(name)) in BUILDERS):
        raise UserError(f"dataset {name} does not exist", "check the path, or pass a hub id like DarwinAnim8or/greentext")


@dataclass
class DataState:
    epoch: int = 0
    row: int = 0  # rows of this epoch already read
    rows: int = 0  # rows read since the start of the run

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: object = "the checkpoint") -> DataState:
        if set(d) != {"epoch", "row", "rows"}:
            raise UserError(f"{where} holds a data position from before the token store (fields {sorted(d)}), which cannot be seeked to",
                            f"start a new run from its weights in a new folder: --output-dir NEW --model-path {where}")
        return cls(**d)


class Packed:
    """Posts of one or more stores laid end to end: piece i is post[i] of stores[src[i]]. Holds ~13 bytes per post
    (source, post id, cumulative length); the tokens stay in the stores' memory maps."""

    def __init__(self, stores: list, src: np.ndarray, post: np.ndarray):
        self.tokens, self.offsets = [s.tokens for s in stores], [s.offsets for s in stores]
        self.src, self.post = src, post.astype(np.int32) if len(post) and post.max() < 2**31 else post
        lengths = np.empty(len(post), np.int64)
        for k, off in enumerate(self.offsets):
            sel = src == k
            lengths[sel] = off[post[sel] + 1] - off[post[sel]]
        self.cum = np.concatenate([[0], np.cumsum(lengths)])
        self.total = int(self.cum[-1])

    def __len__(self) -> int:
        return len(self.post)

    def slice(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the concatenation (int64), gathered from the memory-mapped stores."""
        out = np.empty(b - a, np.int64)
        i = int(np.searchsorted(self.cum, a, side="right")) - 1
        n = 0
        while n < b - a:
            k, off = self.src[i], a + n - int(self.cum[i])
            take = min(int(self.cum[i + 1]) - a - n, b - a - n)
            s = int(self.offsets[k][self.post[i]]) + off
            out[n:n + take] = self.tokens[k][s:s + take]
            n += take
            i += 1
        return out

    def piece(self, i: int) -> np.ndarray:
        return self.slice(int(self.cum[i]), int(self.cum[i + 1]))


class TrainData:
    """The training rows: epoch e is a seeded permutation of the training posts (with --mix, interleaved by weight
    with posts of the other sources; an epoch ends when the --dataset posts are used up), packed into rows."""

    def __init__(self, stores: list, selections: list[np.ndarray], weights: list[float], seq_len: int, seed: int):
        self.stores, self.selections, self.weights, self.T, self.seed = stores, selections, weights, seq_len, seed
        self.store_names = [s.path.name for s in stores]  # what the data is: checkpoints record it, ranks compare it

    @functools.lru_cache(maxsize=2)  # the current epoch, and the next one while crossing over  # noqa: B019
    def epoch(self, e: int) -> Packed:
        main = self.selections[0]
        main_order = main[np.random.default_rng([self.seed, e]).permutation(len(main))]
        if len(self.stores) == 1:
            return Packed(self.stores, np.zeros(len(main), np.uint8), main_order)
        # Which source each post comes from: seeded draws by weight until every --dataset post is drawn.
        rng, probs = np.random.default_rng([self.seed, e, 1]), np.asarray(self.weights) / sum(self.weights)
        draws, n_main = [], 0
        while n_main < len(main):
            d = rng.choice(len(probs), size=max(1024, 2 * len(main)), p=probs).astype(np.uint8)
            draws.append(d)
            n_main += int((d == 0).sum())
        src = np.concatenate(draws)
        src = src[:int(np.searchsorted(np.cumsum(src == 0), len(main))) + 1]
        post = np.empty(len(src), np.int64)
        post[src == 0] = main_order
        for k in range(1, len(self.stores)):
            need, ids = int((src == k).sum()), self.selections[k]
            passes = -(-need // len(ids))  # a small source is reshuffled and reread as often as its weight asks
            post[src == k] = np.concatenate([ids[np.random.default_rng([self.seed, e, 2, k, p]).permutation(len(ids))]
                                             for p in range(passes)])[:need]
        return Packed(self.stores, src, post)

    def rows_in(self, e: int) -> int:
        return max(self.epoch(e).total - 1, 0) // self.T

    def row(self, e: int, r: int) -> np.ndarray:
        return self.epoch(e).slice(r * self.T, r * self.T + self.T + 1)

    def advance(self, s: DataState, n: int = 1) -> DataState:
        epoch, row = s.epoch, s.row + n
        while row >= (per := self.rows_in(epoch)):
            if per == 0:
                raise UserError("the training data holds fewer than --seq-len + 1 tokens", "lower --seq-len or add data")
            epoch, row = epoch + 1, row - per
        return DataState(epoch, row, s.rows + n)

    def rows(self, state: DataState) -> Iterator[tuple[np.ndarray, DataState]]:
        """The global stream from `state` on: (row of seq_len + 1 tokens, the state after it)."""
        while True:
            nxt = self.advance(state)
            yield self.row(state.epoch, state.row), nxt
            state = nxt


class ValRows:
    """Held-out posts in file order, packed like training; the last partial row is kept (padded in batches)."""

    def __init__(self, packed: Packed, seq_len: int):
        self.packed, self.T = packed, seq_len
        self.n = -(-max(packed.total - 1, 0) // seq_len)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        a = i * self.T
        return self.packed.slice(a, min(a + self.T + 1, self.packed.total))


@dataclass(frozen=True)
class Corpus:
    posts: int
    tokens: int
    rows: int


def training_data(d, tokenizer, seed: int, *, revisions: dict[str, str] | None = None, progress: bool = True,
                  defer: bool = False) -> tuple[TrainData, ValRows | None]:
    """--dataset (minus its held-out posts), the --mix sources, and the validation rows, from their token stores.
    `revisions`: hub_revisions(d), when already looked up."""
    cache = cache_dir(d.cache_dir)
    common = dict(progress=progress, defer=defer)
    rev = (revisions or {}).get
    main = prepare_source(d.dataset, d.text_field, tokenizer, cache, revision=rev(d.dataset), **common)
    if main.n_posts == 0:
        raise UserError(f"dataset {d.dataset} holds no non-blank posts", "point --dataset at a file with text (or fix --text-field)")
    held = main.val_mask(0.0 if d.val_dataset else d.val_fraction)
    train_ids = np.flatnonzero(~held)
    if len(train_ids) == 0:
        raise UserError(f"{d.dataset} has no training posts left ({main.n_posts} posts, all held out by --val-fraction {d.val_fraction})",
                        "lower --val-fraction, add posts, or pass a separate --val-dataset")
    stores, selections, weights = [main], [train_ids], [1.0]
    for name, w in parse_mix(d.mix):
        s = prepare_source(name, None, tokenizer, cache, mix=True, revision=rev(stored_name(name, mix=True)), **common)
        if s.n_posts == 0:
            raise UserError(f"--mix source {name} holds no posts", "remove it or point it at a file with text")
        stores.append(s)
        selections.append(np.arange(s.n_posts))
        weights.append(w)
    weights[0] = 1 - sum(weights[1:])
    train = TrainData(stores, selections, weights, d.seq_len, seed)
    if d.val_dataset:
        v = prepare_source(d.val_dataset, d.text_field, tokenizer, cache, revision=rev(d.val_dataset), val=True, **common)
        val = validation_rows(v, np.arange(v.n_posts), d.seq_len)
    else:
        val = validation_rows(main, np.flatnonzero(held), d.seq_len) if held.any() else None
    return train, val


def validation_rows(store, ids: np.ndarray, seq_len: int) -> ValRows:
    return ValRows(Packed([store], np.zeros(len(ids), np.uint8), ids), seq_len)


def corpus_of(train: TrainData) -> Corpus:
    """Posts, tokens (with EOS) and rows of one epoch (the first: with --mix, epochs differ slightly)."""
    ep = train.epoch(0)
    return Corpus(len(ep), ep.total, train.rows_in(0))


def val_corpus(val: ValRows) -> Corpus:
    return Corpus(len(val.packed), val.packed.total, len(val))


# ---------------------------------------------------------------- batches


def doc_positions(x: torch.Tensor, eos: int) -> torch.Tensor:
    """Position ids that restart at every <|endoftext|>, which opens the next post, as at generation time."""
    idx = torch.arange(x.shape[1], device=x.device).expand_as(x)
    starts = torch.where(x == eos, idx, 0).cummax(dim=1).values
    return idx - starts


def isolated_inputs(position_ids: torch.Tensor | None, flex: bool = False) -> dict:
    """Model inputs for isolated packing: restarted positions and a block-diagonal causal mask, as a 4-D bool mask
    that transformers hands to SDPA unchanged, or as a FlexAttention block mask (`flex`). (transformers' own
    packed-sequence detection from position ids only remaps positions and still lets a post see the posts before it.)"""
    if position_ids is None:
        return {}
    return {"position_ids": position_ids, "attention_mask": (flex_doc_mask if flex else dense_doc_mask)(position_ids)}


def to_batch(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(np.stack(rows).astype(np.int64, copy=False))
    return t[:, :-1], t[:, 1:]


def step_passes(step_rows: int, micro: int, world: int) -> list[int]:
    """Rows of the global stream each pass of an optimizer step reads: micro x world, and fewer in the last pass
    when `step_rows` (the global batch) is not a multiple of that."""
    per = micro * world
    return [per] * (step_rows // per) + ([step_rows % per] if step_rows % per else [])


class TrainLoader:
    """Micro-batches for one rank. Each call reads one pass of the global stream (micro x world rows, see step_passes)
    and takes this rank's share, by index, so the state after a call is the same on every rank. A pass that holds
    fewer rows fills a rank's micro-batch with rows of no targets, so every rank runs the same shapes. With
    `prefetch`, batches are built ahead in a background thread; the order and the saved state are exactly the same.
    `step_rows`: the global batch (the loader starts at a step's first pass); None: every pass is full."""

    def __init__(self, data: TrainData, state: DataState, micro: int, rank: int, world: int, device,
                 prefetch: int = 0, isolated: bool = False, step_rows: int | None = None):
        self.data, self.micro, self.rank, self.world, self.device = data, micro, rank, world, torch.device(device)
        self.eos, self.isolated = int(data.stores[0].meta["eos"]), isolated
        self.passes = step_passes(step_rows, micro, world) if step_rows else [micro * world]
        self.state = state
        # Gathered and pinned ahead in a thread, while the accelerator computes.
        self._batches = background(self._produce(state), prefetch) if prefetch else self._produce(state)

    def _produce(self, state: DataState):
        pin = self.device.type == "cuda"
        padding = np.full(self.data.T + 1, self.eos, dtype=np.int64)
        while True:
            for rows in self.passes:
                # This rank's rows of the pass: r, r + world, ... (a prefix of the micro-batch; the rest is padding).
                mine = [self.rank + j * self.world for j in range(self.micro) if self.rank + j * self.world < rows]
                at = [self.data.advance(state, k) if k else state for k in mine]
                x, y = to_batch([self.data.row(a.epoch, a.row) for a in at] + [padding] * (self.micro - len(mine)))
                if len(mine) < self.micro:
                    y = y.clone()  # y is a view of x's rows (shifted by one token)
                    y[len(mine):] = IGNORE_INDEX
                state = self.data.advance(state, rows)
                pos = doc_positions(x, self.eos) if self.isolated else None
                if pin:
                    x, y, pos = x.pin_memory(), y.pin_memory(), pos.pin_memory() if pos is not None else None
                yield x, y, pos, state

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, DataState]:
        x, y, pos, self.state = next(self._batches)
        to = lambda t: t.to(self.device, non_blocking=True) if t is not None else None  # noqa: E731
        return to(x), to(y), to(pos), self.state


def val_batches(rows: ValRows, micro: int, rank: int, world: int, limit: int | None, eos: int | None = None):
    """This rank's validation batches (x, y, position ids when `eos` is given for isolated packing) from the packed
    validation rows. Every rank gets the same number of batches (sharded engines need every rank in every
    forward); padding rows and positions carry IGNORE_INDEX targets."""
    T = rows.T
    mine = range(rank, len(rows), world)
    n_batches = -(-len(rows) // (world * micro))
    if limit:
        n_batches = min(n_batches, limit)
    for b in range(n_batches):
        x = torch.full((micro, T), 0, dtype=torch.long)
        y = torch.full((micro, T), IGNORE_INDEX, dtype=torch.long)
        for i, j in enumerate(mine[b * micro:(b + 1) * micro]):
            r = torch.as_tensor(np.asarray(rows[j], dtype=np.int64))
            x[i, :len(r) - 1] = r[:-1]
            y[i, :len(r) - 1] = r[1:]
        yield x, y, doc_positions(x, eos) if eos is not None else None
