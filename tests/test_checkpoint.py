"""Checkpoints: exact resume, loadable sharded HF export, atomic saves and rotation."""

import subprocess
import sys

import pytest
import torch
from transformers import GPT2LMHeadModel

from conftest import ROOT, launch, run_inprocess, tiny_args, train_losses, val_losses
from faults import launch_env
from greentext_dist import checkpoint as ckpt

RUN = ["--global-batch-size", "4", "--micro-batch-size", "2", "--max-steps", "6", "--eval-every", "3", "--lr", "1e-3"]


@pytest.mark.slow
def test_resume_matches_uninterrupted(corpus, tmp_path):
    """With dropout on, so the random state must come back too (dropout 0 is the weaker case)."""
    dropout = "0.1"
    full, split = tmp_path / "full", tmp_path / "split"
    assert run_inprocess(tiny_args(corpus, full, *RUN, "--dropout", dropout)) == 0
    # The first half runs as `python -m` in its own process, the second resumes it.
    first = subprocess.run([sys.executable, "-m", "greentext_dist.train", *tiny_args(corpus, split, *RUN, "--dropout", dropout, "--halt-at-step", "3")],
                           capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "halted after step 3" in first.stderr
    assert [p.name for _, p in ckpt.step_dirs(split / "checkpoints")] == ["step-3"]
    assert run_inprocess(tiny_args(corpus, split, *RUN, "--dropout", dropout)) == 0
    a, b = train_losses(full), train_losses(split)
    assert len(a) == len(b) == 6  # metrics.jsonl holds each step once
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6
    assert max(abs(x - y) for x, y in zip(val_losses(full), val_losses(split))) <= 1e-6
    state = ckpt.read_trainer_state(split / "checkpoints" / "step-6")
    assert state["step"] == 6 and state["data"]["rows"] == 6 * 4


@pytest.mark.slow
def test_export_reloads_sharded_with_equal_logits(corpus, tmp_path):
    from greentext_dist.config import ModelConfig
    from greentext_dist.dist import init_distributed
    from greentext_dist.engines.ddp import apply_ddp
    from greentext_dist.model import build_model
    from greentext_dist.optim import build_optimizer
    from greentext_dist.config import OptimConfig
    from greentext_dist.tokenizer import bundled_gpt2

    env = init_distributed()
    torch.manual_seed(0)
    model = build_model(ModelConfig(model="tiny", dropout=0.0))
    engine = apply_ddp(model, build_optimizer(model, OptimConfig(lr=1e-2), env.device), env, "fp32")
    x = torch.randint(0, 50257, (2, 16))
    engine.backward(engine.forward(x).float().logsumexp(-1).mean())
    engine.step(1.0, torch.tensor(True))  # weights now differ from any fresh init
    saved = ckpt.save_checkpoint(engine, tmp_path / "checkpoints", 1, {"step": 1}, bundled_gpt2(), keep_last=2, max_shard_size="5MB")
    shards = sorted(p.name for p in saved.glob("*.safetensors"))
    assert len(shards) >= 2 and (saved / "model.safetensors.index.json").is_file()
    assert (saved / "config.json").is_file() and (saved / "generation_config.json").is_file()
    assert (saved / "tokenizer_config.json").is_file()
    assert ckpt.verify(saved) is None
    code = """
import torch, sys
from transformers import GPT2LMHeadModel
m = GPT2LMHeadModel.from_pretrained(sys.argv[1]).eval()
assert m.transformer.wte.weight.data_ptr() == m.lm_head.weight.data_ptr(), "tie lost"
torch.save(m(torch.load(sys.argv[2])).logits, sys.argv[3])
"""
    torch.save(x, tmp_path / "x.pt")
    p = subprocess.run([sys.executable, "-c", code, str(saved), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    with torch.no_grad():
        want = model.eval()(x).logits
    assert torch.equal(torch.load(tmp_path / "y.pt"), want)


def test_final_and_rotation(corpus, tmp_path):
    out = tmp_path / "run"
    assert run_inprocess(tiny_args(corpus, out, *RUN, "--save-every", "2", "--keep-last", "2")) == 0
    assert [p.name for _, p in ckpt.step_dirs(out / "checkpoints")] == ["step-4", "step-6"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-6"
    final = out / "final"
    assert not (final / "train_state").exists() and ckpt.verify(final) is None
    m = GPT2LMHeadModel.from_pretrained(final)
    assert m.config.n_layer == 2 and not list(out.glob("checkpoints/.tmp-*"))


def test_damaged_newest_checkpoint_falls_back(corpus, tmp_path):
    out = tmp_path / "run"
    assert run_inprocess(tiny_args(corpus, out, *RUN, "--save-every", "2", "--keep-last", "3")) == 0
    root = out / "checkpoints"
    shard = sorted((root / "step-6").glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a full disk
    (root / ".tmp-step-8").mkdir()  # an interrupted save
    assert ckpt.verify(root / "step-6").startswith("model-")
    import logging

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    ckpt.log.addHandler(handler)
    try:
        assert ckpt.find_resumable(root) == root / "step-4"
    finally:
        ckpt.log.removeHandler(handler)
    assert any("step-6 is unusable" in m and "bytes" in m for m in seen)


def test_verify_names_the_damaged_file(tmp_path):
    """Checksums are computed on several threads; the answer must still name the right file, the first in order."""
    folder = tmp_path / "step-1"
    (folder / "train_state").mkdir(parents=True)
    for i in range(5):
        (folder / f"model-{i}.safetensors").write_bytes(bytes([i]) * 100_000)
    (folder / "train_state" / "optimizer.pt").write_bytes(b"state" * 1000)
    ckpt.write_manifest(folder)
    assert ckpt.verify(folder) is None
    for name in ("model-3.safetensors", "model-1.safetensors"):  # same size, one byte flipped: only the checksum sees it
        data = bytearray((folder / name).read_bytes())
        data[50_000] ^= 1
        (folder / name).write_bytes(data)
    assert ckpt.verify(folder) == "model-1.safetensors does not match its checksum"
    (folder / "train_state" / "optimizer.pt").unlink()
    assert ckpt.verify(folder) == "train_state/optimizer.pt is missing"


@pytest.mark.slow
def test_crash_mid_save_keeps_previous(corpus, tmp_path):
    """A save killed half-way leaves only a hidden temp folder; the run resumes from the last good step."""
    out = tmp_path / "run"
    assert run_inprocess(tiny_args(corpus, out, *RUN, "--halt-at-step", "2")) == 0
    p = launch(tiny_args(corpus, out, *RUN, "--save-every", "4"), launcher="python", env=launch_env(crash_in_save=True))
    assert p.returncode != 0
    root = out / "checkpoints"
    assert [q.name for _, q in ckpt.step_dirs(root)] == ["step-2"] and (root / ".tmp-step-4").is_dir()
    assert ckpt.find_resumable(root) == root / "step-2"
    assert run_inprocess(tiny_args(corpus, out, *RUN, "--save-every", "4")) == 0
    assert len(train_losses(out)) == 6
