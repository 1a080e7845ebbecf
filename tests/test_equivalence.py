"""Numerics: the loss is normalised by the step's global target count, so how a step is split
(accumulation, ranks) does not change the curve."""

import pytest
from conftest import launch, run_inprocess, tiny_args, train_losses, val_losses

COMMON = ["--global-batch-size", "8", "--max-steps", "4", "--eval-every", "2", "--lr", "1e-3"]


def test_accumulation_equals_one_big_batch(corpus, tmp_path):
    a, b = tmp_path / "ga4", tmp_path / "ga1"
    assert run_inprocess(tiny_args(corpus, a, *COMMON, "--micro-batch-size", "2")) == 0
    assert run_inprocess(tiny_args(corpus, b, *COMMON, "--micro-batch-size", "8")) == 0
    la, lb = train_losses(a), train_losses(b)
    assert len(la) == 4 and la[-1] < la[0]
    assert max(abs(x - y) for x, y in zip(la, lb)) <= 1e-5
    assert max(abs(x - y) for x, y in zip(val_losses(a), val_losses(b))) <= 1e-5


@pytest.mark.slow
def test_two_ranks_equal_one(corpus, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_inprocess(tiny_args(corpus, one, *COMMON, "--micro-batch-size", "4")) == 0
    # A fresh token cache: both ranks find no store, one builds it under the lock, the other waits and reads it.
    p = launch(tiny_args(corpus, two, *COMMON, "--micro-batch-size", "2", "--cache-dir", str(tmp_path / "fresh-cache")), nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 rank(s)" in p.stderr and "2 micro x 2 accumulation x 2 ranks = 8" in p.stderr
    assert len([d for d in (tmp_path / "fresh-cache").iterdir() if not d.name.startswith(".")]) == 1
    l1, l2 = train_losses(one), train_losses(two)
    assert len(l2) == 4
    assert max(abs(x - y) for x, y in zip(l1, l2)) <= 1e-5
    assert max(abs(x - y) for x, y in zip(val_losses(one), val_losses(two))) <= 1e-5


@pytest.mark.slow
def test_three_ranks_with_a_global_batch_they_do_not_divide_equal_one(corpus, tmp_path):
    """The default 512 on 3 or 6 GPUs: 8 sequences on 3 ranks of micro 2 is 2 passes, the second with 2 of its 6 rows
    and 4 rows of padding. The loss counts targets, so the curve is the single process's."""
    one, three = tmp_path / "one", tmp_path / "three"
    assert run_inprocess(tiny_args(corpus, one, *COMMON, "--micro-batch-size", "8")) == 0
    p = launch(tiny_args(corpus, three, *COMMON, "--micro-batch-size", "2"), nproc=3)
    assert p.returncode == 0, p.stderr[-3000:]
    err = " ".join(p.stderr.split())
    assert "2 micro x 2 accumulation x 3 ranks = 8 sequences + 4 padding rows in the last pass" in err
    assert "not a multiple of micro-batch x ranks = 6: each step pads 4 rows (33.3% of its compute). 6 or 12 would waste none" in err
    l1, l3 = train_losses(one), train_losses(three)
    assert len(l3) == 4
    assert max(abs(x - y) for x, y in zip(l1, l3)) <= 1e-5
    assert max(abs(x - y) for x, y in zip(val_losses(one), val_losses(three))) <= 1e-5
