"""Posts (read in sources.py) -> a token store (tokenised once, see store.py) -> packed rows that each rank reads by index.

An epoch is a seeded permutation of the training posts laid end to end with <|endoftext|> after each, cut into rows
of seq_len + 1 tokens (consecutive rows share one token, so every token is a target exactly once). The row order is
global: rank r of W reads rows r, r+W, r+2W, ... so a step's global batch is the same rows whatever the world size,
and the saved position (epoch, row) is the same on every rank, valid for any world size, and resumed by a seek.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from greentext_dist.attention import dense_doc_mask, flex_doc_mask
from greentext_dist.config import parse_mix
from greentext_dist.errors import UserError
from greentext_dist.hub import hub_offline
from greentext_dist.sources import check_source_name, clean_post, first_example, open_dataset, post_hash, readable, source_posts, text_getter
from greentext_dist import store
from greentext_dist.store import background

if TYPE_CHECKING:
    from datasets import IterableDataset

IGNORE_INDEX = -100


# ---------------------------------------------------------------- --mix sources and the validation split


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


def mix_posts(name: str, revision: str | None = None) -> Iterator[str]:
    """The non-blank posts of a --mix source (any text column; HellaSwag as context + gold ending), cleaned."""
    with readable(name):
        for ex in open_mix_source(name, None, revision):
            if text := clean_post(ex["text"] or ""):
                yield text


def is_val_post(text: str, fraction: float) -> bool:
    """Held-out membership by a stable hash of the (cleaned) post, so it never depends on order, seed or world
    size. The store keeps each post's hash, so Store.val_mask gives the same answer without the text."""
    return fraction > 0 and post_hash(text) / 2**64 < fraction


# ---------------------------------------------------------------- stores -> packed rows


def cache_dir(setting: str | None) -> Path:
    return Path(setting).expanduser() if setting else store.default_cache_dir()


def prepare_source(name: str, text_field: str | None, tokenizer, cache: Path, *, mix: bool = False, revision: str | None = None,
                   repair: bool = False, rebuild: bool = False, progress: bool = True, defer: bool = False, val: bool = False):
    """The token store of one source (built on first use). `mix`: read it as a --mix source; `val`: it is the
    --val-dataset (for messages). `revision`: a hub source's commit, if already looked up (see hub_revisions)."""
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
    check_source_name(name)
    return store.hub_commit(name)


def hub_revisions(d) -> dict[str, str]:
    """The current commit of each hub source of this run. Training asks on rank 0 only and hands the answer to every
    rank: hundreds of ranks asking the hub's API at once get rate-limited, and could each see a different commit."""
    return {name: rev for name in hub_sources(d) if (rev := source_commit(name))}


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
