"""A non-editable install (a built wheel) carries everything the package reads at run time."""

import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_wheel_ships_configs_and_finds_them(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("greentext_dist-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for want in ("greentext_dist/configs/deepspeed/zero2.json", "greentext_dist/configs/deepspeed/zero3_offload.json",
                 "greentext_dist/configs/accelerate/fsdp.yaml", "greentext_dist/data/demo_greentexts.jsonl"):
        assert want in names, want
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    code = ("import greentext_dist, sys; from greentext_dist.engines.deepspeed import DS_CONFIGS;"
            "assert str(DS_CONFIGS).startswith(sys.argv[1]), DS_CONFIGS; assert (DS_CONFIGS / 'zero2.json').is_file()")
    p = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
