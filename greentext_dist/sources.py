"""Where posts come from: a local file (.jsonl .json .txt .csv .parquet .arrow, compressed or not), a folder of them
(its train split by file name, as `datasets` reads a folder), a folder written by `datasets`' save_to_disk, or a hub
dataset; read with `datasets` as a stream of cleaned posts, and a malformed file answered in one line naming the file
and line. The store (store.py) tokenises what this module reads, and data.py packs the stores into rows; hellaswag.py
reads its items here too. It imports neither of them: the graph flows sources -> store -> data -> train.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from greentext_dist.errors import UserError
from greentext_dist.hub import hub_offline, is_local

if TYPE_CHECKING:
    from datasets import IterableDataset

BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
BINARY = (".parquet", ".arrow")  # read in place: never compressed around, never lines of text
# posts.jsonl.gz: `datasets` decompresses while it streams. Suffix -> (Python module, shell tool that prints it).
COMPRESSED = {".gz": ("gzip", "zcat"), ".bz2": ("bz2", "bzcat"), ".xz": ("lzma", "xzcat")}
# Hub repos that hold the same posts in several formats: pick one.
KNOWN_DATA_FILES = {"DarwinAnim8or/greentext": "greentexts.jsonl"}
# `datasets`' own files in a folder (a hub repo's legacy dataset_infos.json, save_to_disk's), never posts, as for `datasets`.
METADATA = {"dataset_infos.json", "dataset_info.json", "state.json", "dataset_dict.json"}


def data_suffix(path: Path) -> str:
    """What a file holds: '.jsonl' for posts.jsonl and for posts.jsonl.gz."""
    return Path(path.stem).suffix if path.suffix in COMPRESSED else path.suffix


def open_bytes(path: Path):
    """A data file's bytes, decompressed."""
    import importlib

    return importlib.import_module(COMPRESSED[path.suffix][0]).open(path, "rb") if path.suffix in COMPRESSED else open(path, "rb")


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets`' save_to_disk: a DatasetDict, or one Dataset."""
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def saved_dataset_files(path: Path) -> list[Path] | None:
    """The .arrow files of a folder written by `datasets`' save_to_disk (a DatasetDict's 'train' split), in row order;
    None for any other folder."""
    if not is_saved_dataset(path):
        return None
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise UserError(f"{path} is a saved DatasetDict without a 'train' split (splits: {', '.join(splits) or 'none'})",
                            f"point at the split to read, e.g. {path / splits[0]}" if splits else "save the posts again")
        path = path / "train"
    state = json.loads((path / "state.json").read_text())
    return [path / f["filename"] for f in state.get("_data_files", [])]


def local_files(name: str) -> list[Path]:
    """The data files of a local source: the file, a save_to_disk folder's .arrow files, or a folder's data files,
    skipping hidden ones (an editor's .ipynb_checkpoints/ copy, `hf download`'s .cache/), __pycache__-like ones and
    `datasets`' metadata, as `datasets` does."""
    path = Path(os.path.expanduser(name))
    if not path.is_dir():
        return [path]
    if (saved := saved_dataset_files(path)) is not None:
        return saved
    hidden = lambda p: any(part.startswith((".", "__")) for part in p.relative_to(path).parts)  # noqa: E731
    files = sorted(p for p in path.rglob("*") if data_suffix(p) in BUILDERS and p.is_file() and not hidden(p) and p.name not in METADATA)
    splits = folder_splits(path)
    return [f for f in files if f.resolve() in splits["train"]] if len(splits) > 1 and "train" in splits else files


def folder_splits(path: Path) -> dict[str, set[Path]]:
    """The splits `datasets` sees in a folder by its file names (data/train-*.parquet, data/test-*.parquet, ...), as
    load_dataset(folder) does: a downloaded hub repo's test posts must not become training posts."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        resolved = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    except Exception:  # noqa: BLE001 - no recognisable layout: every file is data
        return {}
    return {str(split): {Path(f).resolve() for f in files} for split, files in resolved.items()}


def check_source_name(name: str) -> None:
    """A name that looks like a path but is not one: say so before anything asks the hub about it."""
    if not is_local(name) and (name.count("/") > 1 or name.startswith((".", "/", "~")) or data_suffix(Path(name)) in BUILDERS):
        raise UserError(f"dataset {name} does not exist", "check the path, or pass a hub id like DarwinAnim8or/greentext")


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


def post_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


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


def estimate_posts(source: str) -> int | None:
    """Roughly how many records a source holds, for the ETA: lines of local .jsonl/.csv, rows of .parquet/.arrow."""
    if not is_local(source):
        return None
    total = 0
    for f in local_files(source):
        if data_suffix(f) in (".jsonl", ".csv"):
            with open_bytes(f) as fh:
                total += sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 24), b""))
        elif f.suffix == ".parquet":  # not data_suffix: a compressed parquet file has no footer to read
            import pyarrow.parquet as pq

            total += pq.ParquetFile(f).metadata.num_rows
        elif f.suffix == ".arrow":
            import pyarrow as pa

            with pa.memory_map(str(f)) as mm:
                total += sum(batch.num_rows for batch in pa.ipc.open_stream(mm))
        else:
            return None
    return total or None
