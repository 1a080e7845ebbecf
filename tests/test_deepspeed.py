"""DeepSpeed ZeRO-2 / ZeRO-3 on 2 real CPU ranks (gloo): parity with the single-process reference,
bf16 + accumulation + checkpointing, exact resume, the ZeRO-3 export, and config conflicts."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import GPT2LMHeadModel

from conftest import assert_checkpoint_size, reference_run, ROOT, TRAIN, launch, run_inprocess, tiny_args, train_losses, val_losses
from greentext_dist import checkpoint as ckpt

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="DeepSpeed builds its CPU comm op with g++")

COMMON = ["--global-batch-size", "8", "--micro-batch-size", "2", "--max-steps", "4", "--eval-every", "2", "--lr", "1e-3"]
# Tiny matrices are below ZeRO-3's default persistence threshold: set it to 0 so everything is partitioned.
ZERO3_ALL = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "data_types": {"grad_accum_dtype": "fp32"},
    "steps_per_print": 10**9, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory, COMMON)


def deepspeed_launch(args, nproc=2):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(29500 + os.getpid() % 1000), str(TRAIN), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def zero3_config(tmp_path):
    path = tmp_path / "zero3_all.json"
    path.write_text(json.dumps(ZERO3_ALL))
    return path


# Each stage and each launcher once (pairwise): the headline `deepspeed train.py` with ZeRO-3 (the resume/export test
# below) and ZeRO-2 under torchrun here; ZeRO-3 under torchrun also runs in the bf16 test, ZeRO-2 under deepspeed in the
# auto-backend test. ZeRO-2 runs micro 3: the global batch of 8 is no multiple of 3 x 2 ranks, so its last pass is
# padded (DeepSpeed counts 12 rows).
@pytest.mark.slow
def test_zero2_with_a_padded_pass_matches_reference_fp32(reference, tmp_path):
    data, ref, ref_val = reference
    out = tmp_path / "o"
    p = launch(tiny_args(data, out, *COMMON, "--micro-batch-size", "3", "--backend", "zero2"), nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "deepspeed zero2" in p.stderr and "2 rank(s)" in p.stderr and "3 micro x 2 accumulation x 2 ranks = 8 sequences" in p.stderr
    assert max(abs(a - b) for a, b in zip(train_losses(out), ref)) <= 1e-4
    assert max(abs(a - b) for a, b in zip(val_losses(out), ref_val)) <= 1e-4


@pytest.mark.slow
def test_zero3_bf16_accumulation_checkpointing_and_sampling(reference, tmp_path):
    """bf16 + accumulation + checkpointing stay close to the fp32 reference; samples during training (every rank
    takes part: ZeRO-3 gathers the weights for generation) leave the run going."""
    data, ref, _ = reference
    args = tiny_args(data, tmp_path / "b", *COMMON, "--backend", "zero3", "--precision", "bf16", "--gradient-checkpointing",
                     "--ds-config", str(zero3_config(tmp_path)), "--sample-every", "2")
    p = launch(args, nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    losses = train_losses(tmp_path / "b")
    assert losses[-1] < losses[0] and max(abs(a - b) for a, b in zip(losses, ref)) <= 2e-2
    assert_checkpoint_size(tmp_path / "b", "zero3", "bf16")  # two ranks' files together
    rows = [json.loads(line) for line in (tmp_path / "b" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 2, 2, 4, 4, 4]


@pytest.mark.slow
def test_auto_backend_under_deepspeed_launcher_bf16_checkpointing(reference, tmp_path):
    """`deepspeed train.py` picks ZeRO-2 for small sizes; bf16 + accumulation + checkpointing stay close."""
    data, ref, _ = reference
    out = tmp_path / "bf16"
    args = tiny_args(data, out, *COMMON, "--precision", "bf16", "--gradient-checkpointing")
    p = deepspeed_launch(args)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "deepspeed zero2, bf16, gradient checkpointing on" in p.stdout + p.stderr
    assert_checkpoint_size(out, "zero2", "bf16")
    losses = train_losses(out)
    assert losses[-1] < losses[0]
    assert max(abs(a - b) for a, b in zip(losses, ref)) <= 2e-2


@pytest.mark.slow
def test_zero3_under_deepspeed_matches_reference_resumes_and_exports(reference, tmp_path):
    """`deepspeed train.py --backend zero3` on 2 ranks with accumulation equals the single-process reference; a run
    halted and resumed (under torchrun) equals it exactly; the export is stock GPT-2. The run leaves nothing in
    /dev/shm."""
    data, ref, ref_val = reference
    run = [*COMMON, "--backend", "zero3", "--ds-config", str(zero3_config(tmp_path))]
    full, split = tmp_path / "full", tmp_path / "split"
    shm = set(os.listdir("/dev/shm"))
    p = deepspeed_launch(tiny_args(data, full, *run))
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    assert set(os.listdir("/dev/shm")) <= shm, "DeepSpeed's CPU all-reduce buffers (66 MB of RAM a rank) outlived the run"
    assert "deepspeed zero3" in log and "2 rank(s)" in log and "2 micro x 2 accumulation x 2 ranks = 8 sequences" in log
    # The ranks add nothing of DeepSpeed's to the log (the launcher's own [INFO] lines are its own).
    assert "built successfully" not in log and "FutureWarning" not in log, [l for l in log.splitlines() if "built" in l or "Warning" in l]
    a = train_losses(full)
    assert len(a) == 4 and max(abs(x - y) for x, y in zip(a, ref)) <= 1e-4
    assert max(abs(x - y) for x, y in zip(val_losses(full), ref_val)) <= 1e-4

    for extra in (["--halt-at-step", "2"], []):
        p = launch(tiny_args(data, split, *run, *extra), nproc=2)
        assert p.returncode == 0, p.stderr[-3000:]
    b = train_losses(split)
    assert len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-6

    # The export (gathered module by module) reloads as stock GPT-2 and equals DeepSpeed's own fp32 state.
    step = full / "checkpoints" / "step-4"
    assert len(list(step.glob("model-*.safetensors"))) >= 2 and ckpt.verify(step) is None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    exported = GPT2LMHeadModel.from_pretrained(step).eval()
    assert exported.lm_head.weight.data_ptr() == exported.transformer.wte.weight.data_ptr()
    zero = GPT2LMHeadModel.from_pretrained(step).eval()
    missing, unexpected = zero.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(step / "train_state", tag="deepspeed"), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(x).logits, zero(x).logits)



def reshard_chain(data, run, out, hops):
    """Run `hops` of (ranks, extra flags) in one folder, each resuming the last; returns each hop's log."""
    logs = []
    for nproc, extra in hops:
        args = tiny_args(data, out, *run, *extra)
        p = launch(args, nproc=nproc) if nproc > 1 else launch(args, launcher="python")
        assert p.returncode == 0, p.stderr[-3000:]
        logs.append(p.stderr)
    return logs


def saved_optimizer(step_dir):
    """(weight decay of each parameter group, AdamW's step count of each partition) in a DeepSpeed checkpoint's files."""
    decays, steps = set(), set()
    for f in (step_dir / "train_state" / "deepspeed").glob("*optim_states.pt"):
        sd = torch.load(f, weights_only=False)["optimizer_state_dict"]
        inner = sd.get("base_optimizer_state") or sd["optimizer_state_dict"]  # ZeRO-2 / ZeRO-3
        decays.add(tuple(g["weight_decay"] for g in inner["param_groups"]))
        steps |= {int(v["step"]) for v in inner["state"].values()}
    return decays, steps


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_resumes_on_another_world_size(reference, tmp_path, stage):
    """2 ranks -> 1 rank -> 2 ranks through DeepSpeed's universal checkpoint: the curve is the single-process
    reference's (the same tolerance as FSDP's resharded resume); the conversion is made once and kept beside the
    checkpoint; the checkpoints after it are ordinary ones of the new world size."""
    data, ref, _ = reference
    run = [*COMMON, "--backend", stage, "--keep-last", "9", *(["--ds-config", str(zero3_config(tmp_path))] if stage == "zero3" else [])]
    out = tmp_path / "chain"
    logs = reshard_chain(data, run, out, [(2, ["--halt-at-step", "1"]), (1, ["--halt-at-step", "2"]), (2, [])])
    assert "written by 2 ranks, this run has 1" in logs[1] and "converting it once" in logs[1]
    assert "written by 1 ranks, this run has 2" in logs[2] and "converting it once" in logs[2]
    assert "2 micro x 4 accumulation x 1 ranks = 8" in logs[1]
    steps = out / "checkpoints"
    for n in (1, 2):
        assert ckpt.verify(steps / f"step-{n}" / "universal") is None and ckpt.verify(steps / f"step-{n}") is None
    # The checkpoints after a universal load are ordinary ones of the new world size: every rank's model states are
    # there (DeepSpeed #7546: left on, ZeRO-3 wrote rank 0's only), and no universal copy is made for them.
    assert not (steps / "step-4" / "universal").exists()
    assert len(list((steps / "step-4" / "train_state" / "deepspeed").glob("*model_states.pt"))) == (2 if stage == "zero3" else 1)
    got = train_losses(out)
    assert len(got) == 4 and max(abs(a - b) for a, b in zip(got, ref)) <= 1e-5, (got, ref)
    # What the loss cannot show at 1e-5 (DeepSpeed's ZeRO-3 universal loader gave every group the first's weight decay
    # and every partition one shared step counter): the optimizer each resumed run saved is the one a straight run has.
    for n in (2, 4):
        assert saved_optimizer(steps / f"step-{n}") == ({(0.01, 0.0)}, {n}), n


@pytest.mark.slow
def test_universal_copy_is_made_once_whole_and_made_again_when_damaged(reference, tmp_path):
    """A second resume on another world size converts nothing; a conversion killed halfway (its temporary folder
    left behind) is never loaded and is cleaned; a damaged copy is refused, made again, and the curve holds. bf16."""
    data, _, _ = reference
    run = [*COMMON, "--backend", "zero2", "--precision", "bf16"]
    straight, out = tmp_path / "straight", tmp_path / "o"
    reshard_chain(data, run, straight, [(2, [])])
    reshard_chain(data, run, out, [(2, ["--halt-at-step", "2"]), (1, ["--halt-at-step", "3"])])
    step2 = out / "checkpoints" / "step-2"
    universal = step2 / "universal"
    made = {p: p.stat().st_mtime_ns for p in universal.rglob("*") if p.is_file()}
    # Branch again from step 2 on 1 rank: the copy is reused as it is.
    logs = reshard_chain(data, run, out, [(1, ["--resume", str(step2), "--overwrite", "--halt-at-step", "3"])])
    assert "kept from an earlier resume" in logs[0]
    assert {p: p.stat().st_mtime_ns for p in universal.rglob("*") if p.is_file()} == made
    # A killed conversion's leftover, and a damaged copy: the leftover is removed, the copy made again.
    (step2 / ".universal-tmp-killed" / "universal").mkdir(parents=True)
    victim = next(p for p in universal.rglob("*.pt"))
    victim.write_bytes(victim.read_bytes()[:-10])
    logs = reshard_chain(data, run, out, [(1, ["--resume", str(step2), "--overwrite"])])
    assert "is damaged" in logs[0] and "making it again" in logs[0]
    assert ckpt.verify(universal) is None and not list(step2.glob(".universal-tmp-*"))
    got, want = train_losses(out), train_losses(straight)
    assert len(got) == 4 and max(abs(a - b) for a, b in zip(got, want)) <= 2e-3, (got, want)  # bf16 rounding, other sums


def test_ds_config_conflicts_are_clear(corpus, tmp_path, capfd):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}))
    stage2 = tmp_path / "stage2.json"
    stage2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2},}')
    cases = [
        (["--backend", "zero2", "--ds-config", str(bad)], "sets train_micro_batch_size_per_gpu = 16 but --micro-batch-size gives 2"),
        (["--backend", "zero3", "--ds-config", str(stage2)], "sets zero_optimization.stage = 2 but --backend gives 3"),
        (["--backend", "zero2", "--ds-config", str(broken)], "is not valid JSON (line 1"),
        (["--ds-config", str(bad)], "need a DeepSpeed engine"),
    ]
    for extra, expected in cases:
        assert run_inprocess(tiny_args(corpus, tmp_path / "o", *COMMON, *extra)) == 2
        err = capfd.readouterr().err
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0], err[-2000:]
        assert "Traceback" not in err


@pytest.mark.slow
def test_zero3_offload_shipped_config(reference, tmp_path):
    """ds_configs/zero3_offload.json: parameters and optimizer state on the CPU, DeepSpeed's CPU AdamW."""
    data, ref, _ = reference
    p = launch(tiny_args(data, tmp_path / "off", *COMMON, "--backend", "zero3", "--offload"), nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "deepspeed zero3 + offload" in p.stderr
    assert max(abs(a - b) for a, b in zip(train_losses(tmp_path / "off"), ref)) <= 1e-4
