"""scripts/gpu_check.py, the one script a rare and short GPU lease runs: every command it would launch parses, and its
orchestration runs dry on the CPU (tiny model), so a lease is never spent on a renamed flag or a broken harness."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from greentext_dist.config import parse_args


def load_script(name: str, monkeypatch, tmp_path):
    monkeypatch.setenv("GREENTEXT_CACHE", os.environ.get("GREENTEXT_CACHE", str(tmp_path / "cache")))  # it sets a default
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_command_it_would_run_parses(tmp_path, monkeypatch):
    gc, bench = load_script("gpu_check", monkeypatch, tmp_path), load_script("bench", monkeypatch, tmp_path)
    corpus, out = tmp_path / "corpus.jsonl", tmp_path / "out"
    for label, args in gc.BENCH:
        if isinstance(args, list):  # the first row's setting through train.py
            parse_args(gc.timing_args(corpus, out, args))
        else:
            bench.build_parser().parse_args(args.split())
    assert set(gc.NEXT) <= {label for label, _ in gc.BENCH}
    for _, kind, extra, port in [*gc.SMALL_E2E, gc.XL_E2E]:
        parse_args(gc.e2e_args("small", corpus, out, extra))
        assert gc.launcher(kind, port)
    assert parse_args(gc.lora_args(corpus, out)).model.lora_rank == 16
    p = subprocess.run([sys.executable, "scripts/gpu_check.py", str(tmp_path / "r"), "rows:small-best,no-such-row"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 1 and "unknown bench rows ['no-such-row']" in p.stderr


@pytest.mark.slow
def test_lora_part_runs_dry_on_the_cpu(tmp_path):
    """XL LoRA on one GPU, as the next GPU session runs it, with the tiny model: its row, with the planner beside it."""
    env = {**os.environ, "GPU_CHECK_DRY": "1", "BUDGET_S": "300", "GPU_CHECK_WORK": str(tmp_path / "work")}
    p = subprocess.run([sys.executable, "scripts/gpu_check.py", str(tmp_path / "r"), "lora"], capture_output=True, text=True,
                       timeout=400, cwd=ROOT, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["rc"] == 0 and rows[0]["steps"] == 20 and rows[0]["adapter"], rows
    assert rows[0]["median_tokens_per_s"] and rows[0]["planned_peak_gib"] > 0 and "--lora-rank 16" in rows[0]["command"]


@pytest.mark.slow
def test_xl_part_runs_dry_on_the_cpu(tmp_path):
    """The halt -> resume -> reload harness under the deepspeed launcher, as `deepspeed train.py --model xl` runs on a
    GPU, with the tiny model: one row, ok."""
    env = {**os.environ, "GPU_CHECK_DRY": "1", "E2E_STEPS": "4", "BUDGET_S": "300", "GPU_CHECK_WORK": str(tmp_path / "work")}
    p = subprocess.run([sys.executable, "scripts/gpu_check.py", str(tmp_path / "r"), "xl"], capture_output=True, text=True,
                       timeout=400, cwd=ROOT, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["ok"], rows
    row = rows[0]
    assert row["run"] == "tiny-auto-deepspeed" and row["command"].startswith("deepspeed --num_gpus 1") and row["steps"] == 4
    assert row["halted_with_checkpoint"] and row["resumed"] and row["final_loads"] and row["samples"]
