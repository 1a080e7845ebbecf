"""A non-editable install (a built wheel in a fresh venv, torch kept, run from outside the checkout) carries
everything the package reads at run time: a ZeRO-2 run finds its DeepSpeed config, accelerate launch uses a
packaged config."""

import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, write_posts

TINY = ["--model", "tiny", "--seq-len", "32", "--precision", "fp32", "--global-batch-size", "4", "--micro-batch-size", "2",
        "--max-steps", "2", "--eval-every", "0", "--val-fraction", "0"]


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_trains_with_packaged_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("greentext_dist-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for want in ("greentext_dist/configs/deepspeed/zero2.json", "greentext_dist/configs/deepspeed/zero3_offload.json",
                 "greentext_dist/configs/accelerate/fsdp.yaml", "greentext_dist/data/demo_greentexts.jsonl"):
        assert want in names, want
    # A venv that sees the installed torch and friends (not reinstalled), with the wheel installed non-editable.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    # The packages of the environment running this test (itself maybe a venv) stay visible, after the venv's own.
    venv_site = subprocess.run([py, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True).stdout.strip()
    (Path(venv_site) / "_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    p = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GREENTEXT_PLAIN_LOG": "1", "PYTHONPATH": ""}
    where = subprocess.run([py, "-c", "import greentext_dist, json; from greentext_dist.configs import ACCELERATE;"
                            "print(json.dumps([greentext_dist.__file__, str(ACCELERATE / 'fsdp.yaml')]))"],
                           capture_output=True, text=True, cwd=elsewhere, env=env)
    package, fsdp_yaml = json.loads(where.stdout)
    assert package.startswith(str(venv)) and not package.startswith(str(ROOT)), package
    data = write_posts(elsewhere / "posts.jsonl")
    p = subprocess.run([py, "-m", "greentext_dist.train", *TINY, "--dataset", str(data), "--output-dir", "z2", "--backend", "zero2"],
                       capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300)
    assert p.returncode == 0 and "deepspeed zero2" in p.stderr, p.stderr[-3000:]
    train_py = os.path.join(os.path.dirname(package), "train.py")
    p = subprocess.run([py, "-m", "accelerate.commands.launch", "--config_file", fsdp_yaml, "--num_processes", "1", train_py,
                        *TINY, "--dataset", str(data), "--output-dir", "acc"], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300)
    assert p.returncode == 0 and "fsdp2" in p.stderr, p.stderr[-3000:]
    assert (elsewhere / "z2" / "final" / "config.json").is_file() and (elsewhere / "acc" / "final" / "config.json").is_file()
