"""LoRA (peft) on every engine: the adapter trains and nothing else, every engine gives the single-process curve,
halt + resume is exact, OUT/final is a stock GPT-2 with the adapter merged in (what peft computes), OUT/adapter is
PEFT's own format, and bad settings are one line."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from conftest import launch, run_inprocess, tiny_args, train_losses, write_posts
from greentext_dist import plan
from greentext_dist.config import ModelConfig

LORA = ["--global-batch-size", "8", "--micro-batch-size", "2", "--max-steps", "4", "--eval-every", "2", "--lr", "1e-2",
        "--lora-rank", "4", "--lora-alpha", "16", "--keep-last", "9"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process LoRA run every engine is held to (halted at step 2 and resumed, as users do)."""
    d = tmp_path_factory.mktemp("lora")
    data = write_posts(d / "posts.jsonl")
    straight, split = d / "straight", d / "split"
    assert run_inprocess(tiny_args(data, straight, *LORA)) == 0
    assert run_inprocess(tiny_args(data, split, *LORA, "--halt-at-step", "2")) == 0
    assert run_inprocess(tiny_args(data, split, *LORA)) == 0
    return data, straight, split


def starting_weights() -> dict:
    """The tiny base as every run draws it (the default seed): what a LoRA run must leave untouched."""
    from greentext_dist.config import TrainConfig
    from greentext_dist.model import build_model

    return build_model(ModelConfig(model="tiny", dropout=0.0), seed=TrainConfig().seed).state_dict()


def adapter_checks(out):
    """What holds for every engine's run: the base bit-identical to the starting weights, every lora_B trained away
    from zero (under ZeRO-3 peft has left them at zero), only the adapter in the optimizer's state."""
    base = GPT2LMHeadModel.from_pretrained(out / "adapter" / "base").state_dict()
    start = starting_weights()
    assert all(torch.equal(base[k], start[k]) for k in start), [k for k in start if not torch.equal(base[k], start[k])]
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    b = [k for k in adapter if "lora_B" in k]
    assert len(b) == 2 * 4 and all(adapter[k].abs().sum() > 0 for k in b)  # 2 blocks x 4 projections
    return adapter


def test_lora_trains_the_adapter_only_and_publishes_both(single):
    data, straight, split = single
    assert train_losses(split) == train_losses(straight)  # halt + resume: exact
    adapter = adapter_checks(straight)
    # The optimizer holds the adapter and nothing else; so does the resumable state.
    step = straight / "checkpoints" / "step-4"
    optim = torch.load(step / "train_state" / "optimizer.pt", weights_only=True)
    assert sum(s["exp_avg"].numel() for s in optim["state"].values()) == sum(v.numel() for v in adapter.values())
    assert set(load_file(step / "train_state" / "adapter.safetensors")) == {
        k.removeprefix("base_model.model.").replace(".weight", ".default.weight") for k in adapter}
    # OUT/final is stock GPT-2 (plain transformers) and equals the base with the adapter through peft.
    from peft import PeftModel

    final = GPT2LMHeadModel.from_pretrained(straight / "final").eval()
    through_peft = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(straight / "adapter" / "base"), str(straight / "adapter")).eval()
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), through_peft.disable_adapter():
        base = through_peft(x).logits
    with torch.no_grad():
        merged, want = final(x).logits, through_peft(x).logits
    assert (merged - want).abs().max() <= 1e-5 and (merged - base).abs().max() > 1e-3
    config = json.loads((straight / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16 and config["fan_in_fan_out"] and config["base_model_name_or_path"] == "base"
    assert "LoRA" in (straight / "final" / "README.md").read_text()


def test_generate_and_evaluate_take_an_adapter_folder(single, capsys):
    """An adapter folder loads as its base with the adapter merged in: the same samples and loss as OUT/final."""
    from greentext_dist import evaluate, generate

    _, straight, _ = single
    outs = []
    for folder in (straight / "final", straight / "adapter"):
        assert generate.main([str(folder), "--num-samples", "1", "--max-new-tokens", "12", "--seed", "0"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and ">" in outs[0]
    losses = []
    for folder in (straight / "final", straight / "adapter"):
        args = ["--task", "val-loss", "--dataset", str(straight.parent / "posts.jsonl"), "--seq-len", "32", "--val-fraction", "0.1"]
        assert evaluate.main([str(folder), *args]) == 0
        out = capsys.readouterr().out
        losses.append(json.loads(out[out.index("{"):])["val_loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_lora_settings_are_one_line_and_a_resume_keeps_them(single, tmp_path, capfd):
    data, straight, _ = single
    cases = [
        (["--lora-rank", "-1"], "--lora-rank must not be negative"),
        (["--lora-rank", "4", "--lora-targets", "q_proj"], "--lora-targets q_proj matches no module of GPT-2"),
        (["--lora-rank", "4", "--lora-targets", "c_attn,wte"], "--lora-targets wte is not one of GPT-2's projections"),
        (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be positive"),
        (["--lora-rank", "4", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
    ]
    for extra, want in cases:
        assert run_inprocess(tiny_args(data, tmp_path / "x", "--max-steps", "1", *extra)) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0] and "Fix:" in err[0], (extra, err)
    # Resuming the LoRA run with another rank (or as full fine-tuning) is refused, naming the setting and the way out.
    for rank in ("8", "0"):
        other = [rank if prev == "--lora-rank" else a for prev, a in zip(["", *LORA], LORA)]
        assert run_inprocess(tiny_args(data, straight, *other, "--max-steps", "6")) == 2
        err = capfd.readouterr().err
        assert "--lora-rank" in err and "(the checkpoint has 4)" in err and "new --output-dir" in err, err


def test_the_planner_counts_lora(capsys):
    """A LoRA plan holds the frozen base and the adapter's states: XL with rank 16 fits one 24 GB card, as full
    fine-tuning does not, and the command says which setting to use."""
    s = plan.shape("xl", lora_rank=16)
    assert s.trainable == 16 * 16 * 1600 * 48  # rank x 16d per block: c_attn (d, 3d), both c_proj, c_fc (d, 4d)
    full, lora = plan.plan_engine("xl", "ddp", 1, 24, compiled=True), plan.plan_engine("xl", "ddp", 1, 24, compiled=True, lora_rank=16)
    assert not full["fits"] and lora["fits"]
    assert lora["states_gib"] * 2**30 == pytest.approx(4 * s.n_params + 8 * s.trainable + 2 * s.n_params)  # base fp32 + bf16 copy
    assert plan.main(["--model", "xl", "--lora-rank", "16", "--gpus", "1", "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 16" in out and "recommended: ddp" in out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zero2", "zero3", "fsdp"])
def test_lora_on_two_ranks_equals_one(single, tmp_path, backend):
    """Each engine on 2 ranks gives the single-process LoRA curve, leaves the base as drawn, trains every lora_B
    (the ZeRO-3 pitfall), and keeps only the adapter in its resumable state."""
    data, straight, _ = single
    out = tmp_path / backend
    p = launch(tiny_args(data, out, *LORA, "--backend", backend), nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    got, want = train_losses(out), train_losses(straight)
    assert len(got) == 4 and max(abs(a - b) for a, b in zip(got, want)) <= 1e-5, (got, want)
    mine, theirs = adapter_checks(out), load_file(straight / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(mine[k], theirs[k], atol=1e-5) for k in theirs)
    state = out / "checkpoints" / "step-4" / "train_state"
    assert sum(f.stat().st_size for f in state.rglob("*") if f.is_file()) < 0.2 * plan.shape("tiny").n_params * 4
