"""Learning-rate schedule and optimizer parameter groups."""

import math

import pytest

from greentext_dist.config import OptimConfig
from greentext_dist.model import build_model
from greentext_dist.config import ModelConfig
from greentext_dist.optim import lr_at, param_groups


def test_warmup_then_cosine_to_min():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    lrs = [lr_at(s, cfg, 20) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # linear, never 0 at step 0
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # monotone decay
    mid = 4 + (19 - 4) / 2
    assert lr_at(int(mid), cfg, 20) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (int(mid) - 4) / 15)))


def test_default_warmup_is_five_percent():
    cfg = OptimConfig(lr=1.0, min_lr=0.0)
    assert lr_at(0, cfg, 100) == pytest.approx(1 / 6)
    assert lr_at(5, cfg, 100) == pytest.approx(1.0)


def test_short_runs_and_warmup_past_the_end():
    assert lr_at(0, OptimConfig(lr=1.0, min_lr=0.5, warmup_steps=0), 1) == pytest.approx(1.0)
    assert lr_at(2, OptimConfig(lr=1.0, min_lr=0.5, warmup_steps=10), 3) == pytest.approx(3 / 11)


def test_weight_decay_only_on_matrices():
    model = build_model(ModelConfig(model="tiny", dropout=0.0))
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    named = dict(model.named_parameters())
    assert any(p is named["transformer.wte.weight"] for p in decay["params"])
    assert any(p is named["transformer.ln_f.bias"] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
