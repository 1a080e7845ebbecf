"""MFU arithmetic for the four GPT-2 sizes, and the benchmark script end to end on CPU."""

import subprocess
import sys

import pytest
import torch
from transformers import GPT2LMHeadModel

from conftest import ROOT
from greentext_dist.model import preset_config
from greentext_dist.perf import flops_per_token, model_flops_per_token, peak_tflops

# Parameter counts of the hub checkpoints (tied head counted once); position embeddings are 1024 x d.
SIZES = {"small": (124_439_808, 12, 768), "medium": (354_823_168, 24, 1024),
         "large": (774_030_080, 36, 1280), "xl": (1_557_611_200, 48, 1600)}


@pytest.mark.parametrize("name", SIZES)
def test_model_flops_match_hand_computation(name):
    n_total, layers, width = SIZES[name]
    with torch.device("meta"):
        model = GPT2LMHeadModel(preset_config(name, 0.0))
    assert sum(p.numel() for p in model.parameters()) == n_total
    n = n_total - 1024 * width
    mf, hf = model_flops_per_token(model, 1024, recompute=True)
    assert mf == 6 * n + 12 * layers * width * 1024 == flops_per_token(n, layers, width, 1024)
    assert hf == pytest.approx(mf * 4 / 3)


def test_small_flops_value_and_cpu_peak():
    assert flops_per_token(124_439_808 - 786_432, 12, 768, 1024) == 855_166_464
    assert peak_tflops(torch.device("cpu")) is None and peak_tflops(torch.device("cpu"), 1.5) == 1.5


@pytest.mark.slow
def test_bench_script_runs_on_cpu():
    p = subprocess.run([sys.executable, "scripts/bench.py", "--model", "tiny", "--seq-len", "64", "--micro-batch-size", "2",
                        "--steps", "2", "--warmup", "1", "--precision", "fp32"], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "tokens_per_s=" in p.stdout and "ratio_to_bare=" in p.stdout and "ratio_to_trainer=" in p.stdout


def test_zero3_is_steered_away_from_one_gpu(monkeypatch):
    from greentext_dist.config import Config
    from greentext_dist.plan import plan_engine
    from greentext_dist.engines import resolve_backend

    one, eight = plan_engine("xl", "zero3", 1, 80), plan_engine("xl", "zero3", 8, 80)
    assert one["slow_on_one_gpu"] and not eight["slow_on_one_gpu"]
    assert one["step_s"] > 4 * plan_engine("xl", "ddp", 1, 80, compiled=True)["step_s"]  # compiled DDP: 44% MFU
    cfg = Config()
    monkeypatch.setenv("CROSS_SIZE", "1")
    monkeypatch.setenv("LOCAL_SIZE", "1")
    for model, world, want in (("xl", "1", "zero2"), ("xl", "8", "zero3"), ("large", "2", "zero3"), ("small", "8", "zero2")):
        cfg.model.model = model
        monkeypatch.setenv("WORLD_SIZE", world)
        assert resolve_backend(cfg) == want, (model, world)
