"""Packing from the token store: every token once, EOS between posts, exact resume by seek, rank sharding, the
held-out split, and the store's tokens equal to tokenising each post directly."""

import itertools
import json

import numpy as np
import pytest

from conftest import data_config
from greentext_dist.data import DataState, TrainLoader, is_val_post, training_data, val_batches, validation_rows
from greentext_dist.errors import UserError
from greentext_dist.tokenizer import bundled_gpt2

TOK = bundled_gpt2()


def make_data(path, seq_len, seed=3, **kw):
    return training_data(data_config(path, seq_len, **kw), TOK, seed, progress=False)


@pytest.fixture
def mixed(tmp_path):
    posts = [
        ">be me\n>" + "very long line " * 500,           # far longer than seq_len
        ">ok",                                           # far shorter
        ">café naïve 日本語 🙂\n\n>blank line above",      # unicode and a blank line
        "   ",                                           # blank post: skipped
        ">short",
        "\n".join(f">line {i}" for i in range(40)),
        ">tail post",
    ]
    p = tmp_path / "mixed.jsonl"
    p.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in posts))
    return p, [t.strip() for t in posts if t.strip()]


def epoch_posts(train, e):
    """Epoch e's posts in their order, as the store holds them (tokens + EOS)."""
    ep = train.epoch(e)
    return [ep.piece(i).tolist() for i in range(len(ep))]


@pytest.mark.parametrize("seq_len", [8, 33, 1024])
def test_every_token_once_with_eos_between_posts(mixed, seq_len):
    path, posts = mixed
    train, _ = make_data(path, seq_len)
    order = epoch_posts(train, 0)
    direct = {p: TOK.encode(p) + [TOK.eos_token_id] for p in posts}
    assert sorted(map(tuple, order)) == sorted(map(tuple, direct.values()))  # each post once, tokenised as the tokenizer does
    ref = [t for p in order for t in p]
    rows = [r.tolist() for r, _ in itertools.islice(train.rows(DataState()), train.rows_in(0))]
    assert all(len(r) == seq_len + 1 for r in rows)
    assert len(rows) == (len(ref) - 1) // seq_len == train.rows_in(0)
    inputs = [t for r in rows for t in r[:-1]]
    targets = [t for r in rows for t in r[1:]]
    assert inputs == ref[:len(inputs)]  # each token an input exactly once, in order
    assert targets == ref[1:len(targets) + 1]  # and a target exactly once
    assert len(ref) - len(inputs) <= seq_len  # only the final partial row is dropped
    done = TOK.decode(inputs).split("<|endoftext|>")[:-1]  # complete posts, EOS after each
    assert set(done) <= set(posts) and (len(done) >= 1 or seq_len > 1000)


def test_resume_from_any_row_continues_exactly(mixed):
    path, _ = mixed
    train, _ = make_data(path, 64)
    full = list(itertools.islice(train.rows(DataState()), 60))  # crosses several epochs
    assert len({s.epoch for _, s in full}) >= 2
    for k in (0, 1, 7, 23, 41):
        state = DataState.from_dict(json.loads(json.dumps(full[k][1].to_dict())))  # survives a JSON round trip
        fresh, _ = make_data(path, 64)  # a new process: nothing carried over but the state
        resumed = [r.tolist() for r, _ in itertools.islice(fresh.rows(state), 60 - k - 1)]
        assert resumed == [r.tolist() for r, _ in full[k + 1:]]


def test_old_data_position_is_refused_clearly():
    with pytest.raises(UserError, match="before the token store.*--output-dir NEW --model-path"):
        DataState.from_dict({"epoch": 0, "posts": 3, "buffer": [1, 2], "rows": 4}, "out/checkpoints/step-4")


def test_corpus_shorter_than_a_row_is_an_error(mixed):
    train, _ = make_data(mixed[0], 100_000)
    with pytest.raises(UserError, match="fewer than --seq-len"):
        next(train.rows(DataState()))


def test_epochs_are_reshuffled_and_seeded(tmp_path):
    from conftest import write_posts

    path = write_posts(tmp_path / "p.jsonl", n=50)
    order = lambda e, seed=3: epoch_posts(make_data(path, 16, seed=seed)[0], e)  # noqa: E731
    assert order(0) == order(0)
    assert order(0) != order(1) and order(0) != order(0, seed=4)
    assert sorted(order(0)) == sorted(order(1))


def test_ranks_split_the_global_stream(mixed):
    path, _ = mixed
    train, _ = make_data(path, 8)
    global_rows = [r.tolist() for r, _ in itertools.islice(train.rows(DataState()), 12)]
    per_rank = []
    for rank in range(2):
        loader = TrainLoader(train, DataState(), micro=3, rank=rank, world=2, device="cpu", prefetch=2 * rank)
        x, y, _, state = loader.next_batch()
        x2, _, _, state2 = loader.next_batch()
        per_rank.append((x.tolist() + x2.tolist(), state2))
    single = TrainLoader(train, DataState(), micro=12, rank=0, world=1, device="cpu")
    x1, _, _, s1 = single.next_batch()
    assert per_rank[0][1] == per_rank[1][1]  # the data position is the same on every rank
    assert per_rank[0][1] == s1 and s1.rows == 12  # ... and independent of the world size
    assert x1.tolist() == [r[:-1] for r in global_rows]
    assert per_rank[0][0] == [global_rows[i][:-1] for i in (0, 2, 4, 6, 8, 10)]  # rank r reads rows r, r+W, ...
    assert per_rank[1][0] == [global_rows[i][:-1] for i in (1, 3, 5, 7, 9, 11)]


@pytest.mark.parametrize("world,micro,step_rows", [(3, 2, 8), (3, 4, 5), (2, 4, 3), (4, 1, 6)])
def test_any_global_batch_on_any_number_of_ranks(mixed, world, micro, step_rows):
    """A global batch that is not a multiple of micro x ranks (512 on 3 GPUs): each step still reads exactly its
    global rows, in order; the last pass gives every rank a full micro-batch, whose missing rows are padding with no
    targets; and the data position after a step is the same as for one rank."""
    from greentext_dist.data import IGNORE_INDEX, step_passes

    path, _ = mixed
    train, _ = make_data(path, 8)
    steps = 3
    global_rows = [r.tolist() for r, _ in itertools.islice(train.rows(DataState()), steps * step_rows)]
    passes = step_passes(step_rows, micro, world)
    assert sum(passes) == step_rows and len(passes) == -(-step_rows // (micro * world))
    loaders = [TrainLoader(train, DataState(), micro, rank, world, "cpu", prefetch=rank % 2, step_rows=step_rows) for rank in range(world)]
    one = TrainLoader(train, DataState(), step_rows, 0, 1, "cpu", step_rows=step_rows)
    for step in range(steps):
        seen, ends = {}, set()
        for rank, loader in enumerate(loaders):
            for p, rows in enumerate(passes):
                x, y, _, state = loader.next_batch()
                assert x.shape == y.shape == (micro, 8)  # the same shapes on every rank and pass
                for j in range(micro):
                    k = rank + j * world
                    if k < rows:  # rank r reads the pass's rows r, r + W, ...
                        seen[sum(passes[:p]) + k] = x[j].tolist()
                        assert y[j].tolist() == global_rows[step * step_rows + sum(passes[:p]) + k][1:]
                    else:
                        assert (y[j] == IGNORE_INDEX).all()  # padding: no targets, so no loss and no gradient
            ends.add((state.epoch, state.row, state.rows))
        assert [seen[i] for i in range(step_rows)] == [r[:-1] for r in global_rows[step * step_rows:(step + 1) * step_rows]]
        s1 = one.next_batch()[3]
        assert ends == {(s1.epoch, s1.row, s1.rows)} and s1.rows == (step + 1) * step_rows


def test_val_split_is_stable_and_disjoint(tmp_path):
    from conftest import write_posts

    path = write_posts(tmp_path / "p.jsonl", n=200)
    texts = [json.loads(line)["text"].strip() for line in path.read_text().splitlines()]
    train, val = make_data(path, 16, val_fraction=0.2)
    store = train.stores[0]
    held = [t for t in texts if is_val_post(t, 0.2)]
    assert 20 <= len(held) <= 60
    assert store.val_mask(0.2).tolist() == [is_val_post(t, 0.2) for t in texts]  # the stored hashes give the same split
    assert len(train.epoch(0)) + len(val.packed) == 200
    assert TOK.decode(val.packed.slice(0, val.packed.total)).split("<|endoftext|>")[:-1] == held  # file order


def test_val_batches_pad_and_balance_ranks(mixed):
    path, posts = mixed
    train, _ = make_data(path, 64)
    store = train.stores[0]
    rows = validation_rows(store, np.arange(store.n_posts), 64)
    n_targets = sum(len(rows[i]) - 1 for i in range(len(rows)))
    assert n_targets == store.n_tokens - 1  # nothing dropped in validation
    counts = []
    for rank in range(3):
        batches = list(val_batches(rows, 2, rank, 3, None))
        counts.append((len(batches), sum(int((y != -100).sum()) for _, y, _ in batches)))
    assert len({c for c, _ in counts}) == 1  # same number of forwards on every rank
    assert sum(t for _, t in counts) == n_targets
