"""`accelerate launch` with the shipped configs starts 2 synchronised ranks running our own engines."""

import os
import subprocess
import sys

import pytest

from conftest import reference_run, ROOT, TRAIN, tiny_args, train_losses
from greentext_dist.config import accelerate_settings
from greentext_dist.errors import UserError

COMMON = ["--global-batch-size", "8", "--micro-batch-size", "2", "--max-steps", "3", "--eval-every", "0", "--lr", "1e-3",
          "--precision", "fp32"]  # the CLI beats the accelerate config's bf16


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    data, losses, _ = reference_run(tmp_path_factory, COMMON)
    return data, losses


@pytest.mark.parametrize("config,engine", [("ddp.yaml", "engine       ddp"), ("deepspeed_zero2.yaml", "deepspeed zero2")])
@pytest.mark.slow
def test_accelerate_launch_two_ranks(reference, tmp_path, config, engine):
    data, ref = reference
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / config),
           "--num_processes", "2", "--main_process_port", str(29600 + os.getpid() % 300), str(TRAIN),
           *tiny_args(data, tmp_path / "o", *COMMON)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "2 rank(s)" in p.stderr and engine in p.stderr
    # Unsynchronised ranks would each train on half the batch and log different curves.
    assert max(abs(a - b) for a, b in zip(train_losses(tmp_path / "o"), ref)) <= 1e-4


def test_accelerate_settings_mapping():
    fsdp = accelerate_settings({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "false",
                                "FSDP_OFFLOAD_PARAMS": "true", "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert fsdp[("train", "backend")] == "fsdp" and fsdp[("train", "fsdp_reshard_after_forward")] is False
    assert fsdp[("train", "fsdp_cpu_offload")] is True and fsdp[("train", "precision")] == "bf16"
    ds = accelerate_settings({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                              "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu", "ACCELERATE_MIXED_PRECISION": "no"})
    assert ds[("train", "backend")] == "zero3" and ds[("train", "offload")] is True and ds[("train", "precision")] == "fp32"
    assert accelerate_settings({}) == {}
    with pytest.raises(UserError, match="fp16"):
        accelerate_settings({"ACCELERATE_MIXED_PRECISION": "fp16"})
