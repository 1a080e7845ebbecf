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
def test_zero3_under_deepspeed_matches_reference_resumes_and_exports(reference, tmp_path, capfd):
    """`deepspeed train.py --backend zero3` on 2 ranks with accumulation equals the single-process reference; a run
    halted and resumed (under torchrun) equals it exactly; the export is stock GPT-2; a resume on 1 rank is refused.
    The run leaves nothing in /dev/shm."""
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

    # Resuming the 2-rank DeepSpeed state on 1 rank is refused with the way out; the way out works.
    assert run_inprocess(tiny_args(data, full, *run, "--max-steps", "8")) == 2
    err = capfd.readouterr().err
    assert "written by 2 ranks" in err and f"--output-dir NEW --model-path {step}" in err  # a new folder first: nothing to overwrite
    fresh = tmp_path / "fresh"
    p = launch(tiny_args(data, fresh, *run, "--max-steps", "2", "--model-path", str(step)), launcher="python")  # as the fix says
    assert p.returncode == 0, p.stderr[-3000:]


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
