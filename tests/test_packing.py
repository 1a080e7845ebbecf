"""Packing: every token once, EOS between posts, exact resume, rank sharding, held-out split."""

import itertools
import json

import pytest

from greentext_dist.data import (
    DataState, PackedStream, TrainLoader, count_corpus, is_val_post, open_dataset, text_getter, val_batches, val_rows,
)
from greentext_dist.tokenizer import bundled_gpt2

TOK = bundled_gpt2()


def make_stream(path, seq_len, shuffle=False, keep=lambda t: True):
    ds = open_dataset(str(path))
    return PackedStream(ds, text_getter({"text": ""}, None, str(path)), TOK, seq_len, seed=3, shuffle_buffer=16,
                        keep=keep, shuffle=shuffle)


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


def expected_tokens(posts):
    out = []
    for t in posts:
        out += TOK.encode(t) + [TOK.eos_token_id]
    return out


@pytest.mark.parametrize("seq_len", [8, 33, 1024])
def test_every_token_once_with_eos_between_posts(mixed, seq_len):
    path, posts = mixed
    stream = make_stream(path, seq_len)
    ref = expected_tokens(posts)
    rows = [r for r, s in itertools.takewhile(lambda rs: rs[1].epoch == 0, stream.rows(DataState()))]
    assert all(len(r) == seq_len + 1 for r in rows)
    assert len(rows) == (len(ref) - 1) // seq_len == count_corpus(stream)["rows"]
    inputs = [t for r in rows for t in r[:-1]]
    targets = [t for r in rows for t in r[1:]]
    assert inputs == ref[:len(inputs)]  # each token an input exactly once, in order
    assert targets == ref[1:len(targets) + 1]  # and a target exactly once
    assert len(ref) - len(inputs) <= seq_len  # only the final partial row is dropped
    done = TOK.decode(inputs).split("<|endoftext|>")[:-1]  # complete posts, EOS after each
    assert done == posts[:len(done)] and (len(done) >= 1 or seq_len > 1000)


def test_resume_from_any_row_continues_exactly(mixed):
    path, _ = mixed
    stream = make_stream(path, 64, shuffle=True)
    full = list(itertools.islice(stream.rows(DataState()), 60))  # crosses several epochs
    assert len({s.epoch for _, s in full}) >= 2
    for k in (0, 1, 7, 23, 41):
        state = full[k][1]
        state = DataState(**json.loads(json.dumps(state.to_dict())))  # survives a JSON round trip
        resumed = [r for r, _ in itertools.islice(stream.rows(state), 60 - k - 1)]
        assert resumed == [r for r, _ in full[k + 1:]]


def test_corpus_shorter_than_a_row_is_an_error(mixed):
    from greentext_dist.errors import UserError

    with pytest.raises(UserError, match="fewer than --seq-len"):
        next(make_stream(mixed[0], 100_000).rows(DataState()))


def test_epochs_are_reshuffled_and_seeded(tmp_path):
    from conftest import write_posts

    stream = make_stream(write_posts(tmp_path / "p.jsonl", n=50), 16, shuffle=True)
    first = lambda e: [next(iter(stream.get_text(ex) for ex in stream.epoch_examples(e)))]  # noqa: E731
    order = lambda e: [stream.get_text(ex) for ex in stream.epoch_examples(e)]  # noqa: E731
    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == sorted(order(1))
    assert first(0)


def test_ranks_split_the_global_stream(mixed):
    path, _ = mixed
    stream = make_stream(path, 8)
    global_rows = [r for r, _ in itertools.islice(stream.rows(DataState()), 12)]
    per_rank = []
    for rank in range(2):
        loader = TrainLoader(stream, DataState(), micro=3, rank=rank, world=2, device="cpu")
        x, y, _, state = loader.next_batch()
        x2, _, _, state2 = loader.next_batch()
        per_rank.append((x.tolist() + x2.tolist(), state2))
    single = TrainLoader(stream, DataState(), micro=12, rank=0, world=1, device="cpu")
    x1, _, _, s1 = single.next_batch()
    assert per_rank[0][1] == per_rank[1][1]  # the data position is the same on every rank
    assert per_rank[0][1] == s1 and s1.rows == 12  # ... and independent of the world size
    assert x1.tolist() == [r[:-1] for r in global_rows]
    got = sorted(map(tuple, per_rank[0][0] + per_rank[1][0]))
    assert got == sorted(tuple(r[:-1]) for r in global_rows)


def test_val_split_is_stable_and_disjoint(tmp_path):
    from conftest import write_posts

    path = write_posts(tmp_path / "p.jsonl", n=200)
    texts = [json.loads(l)["text"] for l in path.read_text().splitlines()]
    val = [t for t in texts if is_val_post(t, 0.2)]
    assert 20 <= len(val) <= 60
    assert val == [t for t in texts if is_val_post(t, 0.2)]
    train = make_stream(path, 16, keep=lambda t: not is_val_post(t, 0.2))
    held = make_stream(path, 16, keep=lambda t: is_val_post(t, 0.2))
    assert count_corpus(train)["posts"] + count_corpus(held)["posts"] == 200


def test_val_batches_pad_and_balance_ranks(mixed):
    path, posts = mixed
    rows = val_rows(make_stream(path, 64))
    n_targets = sum(len(r) - 1 for r in rows)
    assert n_targets == len(expected_tokens(posts)) - 1  # nothing dropped in validation
    counts = []
    for rank in range(3):
        batches = list(val_batches(rows, 2, rank, 3, None))
        counts.append((len(batches), sum(int((y != -100).sum()) for _, y, _ in batches)))
    assert len({c for c, _ in counts}) == 1  # same number of forwards on every rank
    assert sum(t for _, t in counts) == n_targets
