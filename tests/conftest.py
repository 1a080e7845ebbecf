"""Shared helpers: small corpora written by the tests, and real training runs (in-process or launched)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "greentext_dist" / "train.py"

# No test may touch the network: the hub is unreachable here and on many clusters.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GREENTEXT_PLAIN_LOG"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Token stores go to a folder of this test session, never the user's cache (tests that need their own pass --cache-dir).
_CACHE = tempfile.mkdtemp(prefix="greentext-test-cache-")
os.environ["GREENTEXT_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


def write_posts(path: Path, n: int = 60, seed: int = 0) -> Path:
    """Greentext-shaped posts of varied length, with unicode and blank lines."""
    import random

    rng = random.Random(seed)
    words = "be me go outside see a dog cat pizza mfw tfw the bus job boss code unicode café naïve 日本 🙂 rain".split()
    posts = []
    for i in range(n):
        lines = [f">be me number {i}"]
        for _ in range(rng.choice([1, 2, 5, 12])):
            lines.append(">" + " ".join(rng.choice(words) for _ in range(rng.randint(1, 9))))
            if rng.random() < 0.15:
                lines.append("")
        posts.append({"text": "\n".join(lines)})
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in posts))
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_posts(tmp_path / "posts.jsonl")


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "tiny", "--dataset", str(data), "--output-dir", str(out), "--seq-len", "32",
            "--precision", "fp32", "--dropout", "0", "--val-fraction", "0.1", "--max-shard-size", "5MB", *extra]


def assert_checkpoint_size(out: Path, backend: str, precision: str) -> None:
    """The newest step checkpoint of run folder `out` is the size train.py's disk check estimates (within 2%)."""
    from greentext_dist import checkpoint as ckpt
    from greentext_dist.plan import shape

    s = shape("tiny")
    _, newest = ckpt.step_dirs(out / "checkpoints")[-1]
    one, hf = ckpt.checkpoint_bytes(backend, precision, s.n_params)
    got = ckpt.folder_bytes(newest), ckpt.folder_bytes(newest, "*.*")
    assert got[0] == pytest.approx(one, rel=0.02) and got[1] == pytest.approx(hf, rel=0.02), (backend, precision, got, (one, hf))


def run_inprocess(args: list[str]) -> int:
    from greentext_dist.train import cli

    return cli(args)


def launch(args: list[str], nproc: int = 1, launcher: str = "torchrun", timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """A real launch in fresh processes; returns the finished process with its output."""
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone", str(TRAIN), *args]
    else:
        cmd = [sys.executable, str(TRAIN), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)


def train_losses(out: Path) -> list[float]:
    from greentext_dist.metrics import read_metrics

    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def val_losses(out: Path) -> list[float]:
    from greentext_dist.metrics import read_metrics

    return [r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]


def reference_run(tmp_path_factory, args: list[str]) -> tuple[Path, list[float], list[float]]:
    """The single-process reference every engine is compared with: (data, train losses, val losses)."""
    d = tmp_path_factory.mktemp("ref")
    data = write_posts(d / "posts.jsonl")
    assert run_inprocess(tiny_args(data, d / "out", *args)) == 0
    return data, train_losses(d / "out"), val_losses(d / "out")


def data_config(path, seq_len: int, **kw):
    from greentext_dist.config import DataConfig

    return DataConfig(dataset=str(path), seq_len=seq_len, **{"val_fraction": 0.0, **kw})


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A local stand-in for the hub (tests/fakehub.py) with its own HF cache, in this process (`huggingface_hub` reads
    its settings at import, so they are patched too) and in launched ones (`hub.env`). While it runs, the hub counts
    as reachable."""
    import huggingface_hub.constants as hf_constants
    from fakehub import FakeHub

    from greentext_dist.hub import hub_offline

    fake = FakeHub(tmp_path / "hub-uploads")
    fake.env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": fake.url, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_TOKEN": "hf_test"}
    for k, v in fake.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(hf_constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", fake.env["HF_HUB_CACHE"])
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    import datasets.config as ds_config  # datasets keeps its own copies

    for name, value in (("HF_ENDPOINT", fake.url), ("HF_HUB_OFFLINE", False), ("HF_DATASETS_OFFLINE", False)):
        monkeypatch.setattr(ds_config, name, value)
    hub_offline.cache_clear()
    yield fake
    fake.close()
    monkeypatch.undo()
    hub_offline.cache_clear()
