"""What a new user meets in the first week: --help with defaults, time-based checkpoints, a refused resume
under other settings, the saved config read back, and YAML config files."""

import os

import pytest

from conftest import run_inprocess, tiny_args, train_losses
from greentext_dist import checkpoint as ckpt
from greentext_dist.config import build_parser, parse_args
from greentext_dist.errors import UserError

RUN = ["--global-batch-size", "4", "--micro-batch-size", "2", "--max-steps", "4", "--eval-every", "0", "--lr", "1e-3"]


def test_help_shows_every_default():
    text = build_parser().format_help()
    for flag, default in (("--lr", "0.00025"), ("--global-batch-size", "512"), ("--save-every-minutes", "30.0"),
                          ("--dropout", "0.1"), ("--backend", "auto"), ("--keep-last", "2")):
        block = text[text.index("\n  " + flag + " "):][:400]  # its own help entry, not the usage line
        assert f"(default: {default})" in " ".join(block.split()), flag


def test_time_based_checkpoints(corpus, tmp_path):
    out = tmp_path / "t"
    assert run_inprocess(tiny_args(corpus, out, *RUN, "--save-every-minutes", "1e-6", "--keep-last", "10")) == 0
    assert [n for n, _ in ckpt.step_dirs(out / "checkpoints")] == [1, 2, 3, 4]  # every step is "late"
    out = tmp_path / "off"
    assert run_inprocess(tiny_args(corpus, out, *RUN, "--save-every-minutes", "0", "--keep-last", "10")) == 0
    assert [n for n, _ in ckpt.step_dirs(out / "checkpoints")] == [4]


def test_resume_under_other_settings_is_refused_by_name(corpus, tmp_path, capfd):
    out = tmp_path / "r"
    assert run_inprocess(tiny_args(corpus, out, *RUN, "--halt-at-step", "2")) == 0
    capfd.readouterr()
    assert run_inprocess(tiny_args(corpus, out, *RUN[:-1], "3e-3", "--seq-len", "16")) == 2
    err = capfd.readouterr().err
    assert "--lr 0.003 (the checkpoint has 0.001)" in err and "--seq-len 16 (the checkpoint has 32)" in err
    assert "--resume never --overwrite" in err and ckpt.step_dirs(out / "checkpoints")[-1][0] == 2
    # what may change on resume does not count: the run finishes with a longer schedule
    assert run_inprocess(tiny_args(corpus, out, *RUN, "--max-steps", "5", "--log-every", "2")) == 0
    assert len(train_losses(out)) >= 3


def test_saved_config_reads_back_to_the_same_run(corpus, tmp_path):
    first = tmp_path / "a"
    assert run_inprocess(tiny_args(corpus, first, *RUN, "--dropout", "0.1")) == 0
    text = (first / "config.toml").read_text()
    assert "lr = 0.001  # flag" in text and "backend = \"ddp\"  # auto" in text and "beta2 = 0.999  # default" in text
    again = tmp_path / "b"
    assert run_inprocess(["--config", str(first / "config.toml"), "--output-dir", str(again)]) == 0
    assert train_losses(again) == train_losses(first)


def test_yaml_config_and_clear_errors(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("optim:\n  lr: 0.002\ntrain:\n  micro_batch_size: 4\n")
    cfg = parse_args(["--config", str(y)])
    assert cfg.optim.lr == 0.002 and cfg.train.micro_batch_size == 4
    y.write_text("optim: [lr: 1\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        parse_args(["--config", str(y)])
    j = tmp_path / "run.json"
    j.write_text("optim:\n  lr: 0.002\n")  # YAML in a .json file: named as JSON, with the fix
    with pytest.raises(UserError, match="is not valid JSON"):
        parse_args(["--config", str(j)])
    ini = tmp_path / "run.ini"
    ini.write_text("[optim]\nlr = 0.002\n")
    with pytest.raises(UserError, match="has no .toml, .yaml or .json suffix.*rename it"):
        parse_args(["--config", str(ini)])
    y.write_text("train:\n  max_steps: ten\n")
    with pytest.raises(UserError, match="'train.max_steps' must be int, got 'ten'. Fix: write an integer"):
        parse_args(["--config", str(y)])


@pytest.mark.slow  # ~20 s of training runs: kept out of the fast tier
def test_final_is_the_best_validation_checkpoint_with_a_model_card(corpus, tmp_path):
    """lr high enough to overfit the tiny corpus: val loss goes down, then up. OUT/final holds the best step's
    weights (bit-equal to checkpoints/best), the report and the card name it, and early stopping ends the run."""
    import json

    from safetensors.torch import load_file

    out = tmp_path / "best"
    args = tiny_args(corpus, out, "--global-batch-size", "4", "--micro-batch-size", "2", "--max-steps", "60", "--eval-every", "2",
                     "--lr", "3e-2", "--min-lr", "3e-2", "--warmup-steps", "0", "--val-fraction", "0.3", "--keep-last", "1",
                     "--early-stopping-patience", "3", "--sample-every", "1000")
    assert run_inprocess(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    best_step, best_loss = min(val, key=lambda v: v[1])
    assert len(train_losses(out)) < 60, "early stopping ended the run"
    assert json.loads((out / "checkpoints" / "best" / "best.json").read_text()) == {"step": best_step, "val_loss": best_loss}
    assert best_step != val[-1][0], "the tiny corpus overfits: the best is not the last validation"

    def weights(d):
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    final, best = weights(out / "final"), weights(out / "checkpoints" / "best")
    assert final.keys() == best.keys() and all((final[k] == best[k]).all() for k in final)
    last = weights(ckpt.step_dirs(out / "checkpoints")[-1][1])
    assert any((final[k] != last[k]).any() for k in final)
    card = (out / "final" / "README.md").read_text()
    assert f"step {best_step} (lowest validation loss)" in card and "license: mit" in card and "Intended use" in card
    assert f"step {best_step}, the best val loss" in (out / "report.md").read_text()
    assert ckpt.verify(out / "final") is None
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel.from_pretrained(out / "final")  # the card does not disturb loading


def test_final_last_and_default_length(corpus, tmp_path):
    from greentext_dist.train import DEFAULT_STEPS, Corpus, plan_run
    from greentext_dist.dist import DistEnv
    import torch

    out = tmp_path / "last"
    assert run_inprocess(tiny_args(corpus, out, *RUN, "--eval-every", "2", "--final", "last")) == 0
    assert not (out / "checkpoints" / "best").exists() and "the last step" in (out / "report.md").read_text()
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    small = parse_args(["--micro-batch-size", "8"])
    assert plan_run(small, env, Corpus(posts=1880, tokens=200_000, rows=195)).max_steps == DEFAULT_STEPS == 300
    assert plan_run(small, env, Corpus(posts=10**6, tokens=10**9, rows=10**6)).max_steps == 3 * 10**6 // 512
    assert plan_run(parse_args(["--epochs", "1", "--global-batch-size", "64", "--micro-batch-size", "8"]), env,
                    Corpus(posts=1880, tokens=200_000, rows=195)).max_steps == 3


@pytest.mark.slow  # three training runs
def test_the_same_command_after_the_end_changes_nothing(corpus, tmp_path, capsys):
    """A requeue or a retry of a finished run: no second final validation or metrics line, OUT/final as it was;
    a larger --max-steps then trains on from the end."""
    from greentext_dist.metrics import read_metrics

    out = tmp_path / "run"
    args = tiny_args(corpus, out, "--global-batch-size", "4", "--micro-batch-size", "2", "--max-steps", "3")
    assert run_inprocess(args) == 0
    lines = (out / "metrics.jsonl").read_text()
    final = {f.name: f.read_bytes() for f in (out / "final").iterdir() if f.suffix == ".safetensors"}
    capsys.readouterr()
    assert run_inprocess(args) == 0
    assert "the run already ended at step 3" in " ".join(capsys.readouterr().err.split())
    assert (out / "metrics.jsonl").read_text() == lines
    assert {f.name: f.read_bytes() for f in (out / "final").iterdir() if f.suffix == ".safetensors"} == final
    assert run_inprocess(args[:-1] + ["5"]) == 0
    assert [(r["step"], "val_loss" in r) for r in read_metrics(out / "metrics.jsonl")][-4:] == [(3, True), (4, False), (5, False), (5, True)]


def test_interrupted_best_replacement_keeps_a_complete_copy(tmp_path):
    import shutil

    root = tmp_path / "checkpoints"
    done = root / ".tmp-best"
    done.mkdir(parents=True)
    (done / "model.safetensors").write_bytes(b"x" * 10)
    ckpt.write_manifest(done)
    shutil.copytree(done, root / ".del-best")
    (root / ".del-best" / "model.safetensors").write_bytes(b"y")  # damaged: not chosen
    ckpt.remove_partial_saves(root)
    assert (root / "best" / "model.safetensors").read_bytes() == b"x" * 10 and not (root / ".tmp-best").exists()
    assert not (root / ".del-best").exists()


def test_tensorboard_gets_the_same_metrics(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from greentext_dist.metrics import read_metrics

    out = tmp_path / "tb"
    assert run_inprocess(tiny_args(corpus, out, *RUN[:-4], "--eval-every", "2", "--lr", "1e-3", "--report-to", "tensorboard")) == 0
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    want = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}
    got = {e.step: e.value for e in acc.Scalars("loss")}
    assert got.keys() == want.keys() and all(abs(got[s] - want[s]) < 1e-5 for s in want)
    assert [e.step for e in acc.Scalars("val_loss")] == [2, 4] and "tokens_per_s" in acc.Tags()["scalars"]
    assert "lr = 0.001  # flag" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


@pytest.mark.slow
def test_wandb_offline_run_files(corpus, tmp_path):
    pytest.importorskip("wandb")
    import json

    from conftest import launch

    out = tmp_path / "wb"
    p = launch(tiny_args(corpus, out, *RUN, "--report-to", "wandb"), launcher="python",
               env={"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_API_KEY": ""})
    assert p.returncode == 0, p.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    logs = list(runs[0].glob("run-*.wandb")) if len(runs) == 1 else []
    assert logs, "one offline run with its log"
    # The offline log is wandb's protobuf record stream; metric values are stored as their JSON text.
    data = logs[0].read_bytes()
    assert all(json.dumps(loss).encode() in data for loss in train_losses(out))
    assert b"global_batch_size" in data and b"tokens_per_s" in data


def test_bad_report_to_and_offline_push_are_one_line(corpus, tmp_path, capfd, monkeypatch):
    with pytest.raises(UserError, match="unknown tracker mlflow"):
        parse_args(["--report-to", "tensorboard,mlflow"])
    from greentext_dist import push

    out = tmp_path / "p"
    assert run_inprocess(tiny_args(corpus, out, *RUN)) == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    push.hub_offline.cache_clear()
    assert push.main([str(out / "final"), "--repo-id", "me/greentext"]) == 2
    err = capfd.readouterr().err
    assert "hub is unreachable" in err and "Traceback" not in err
    assert push.main([str(tmp_path), "--repo-id", "me/greentext"]) == 2
    assert "not a Hugging Face model directory" in capfd.readouterr().err
    from greentext_dist.generate import main as generate

    assert generate([str(out)]) == 2  # the run's folder instead of its model
    assert f"{out} is a training run's folder, not a model. Fix: pass {out / 'final'} or" in capfd.readouterr().err
    shard = sorted((out / "final").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # same size: only the manifest's checksum sees it
    shard.write_bytes(data)
    assert push.main([str(out / "final"), "--repo-id", "me/greentext"]) == 2  # refused before asking the hub anything
    assert f"final is damaged: {shard.name} does not match its checksum" in capfd.readouterr().err


def test_python_api_runs_twice_in_one_process(corpus, tmp_path):
    from greentext_dist import train

    settings = dict(model="tiny", dataset=str(corpus), seq_len=32, precision="fp32", dropout=0.0, global_batch_size=4,
                    micro_batch_size=2, max_steps=3, eval_every=0, max_shard_size="5MB")
    first = train(output_dir=str(tmp_path / "a"), **settings)
    second = train(output_dir=str(tmp_path / "b"), **settings)  # the lock and process group of the first are released
    assert first == tmp_path / "a" / "final" and second.is_dir()
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    with pytest.raises(UserError, match="^lr= must be positive.*to lr=\\.$"):  # keywords, not flags
        train(output_dir=str(tmp_path / "c"), lr=-1.0, **settings)
    assert not (tmp_path / "a" / ".lock").exists()
    # FSDP needs a process group even on one rank: its address is taken back, so a later call (or a process
    # started from this one, which inherits the environment) does not find MASTER_PORT set to a port in use.
    before = dict(os.environ)
    for out in ("d", "e"):
        train(output_dir=str(tmp_path / out), backend="fsdp", **settings)
        assert dict(os.environ) == before


def test_python_api_runs_the_deepspeed_engines_and_others_in_one_process(corpus, tmp_path):
    """A notebook trains with ZeRO-3, then ZeRO-2, then DDP: DeepSpeed keeps groups cloned from the first run's process
    group (a second run raised "Group ... is not registered"), and transformers kept the ZeRO-3 config (the next model
    was built partitioned). Each run ends them; the three curves are the one-process reference's."""
    from greentext_dist import train

    settings = dict(model="tiny", dataset=str(corpus), seq_len=32, precision="fp32", dropout=0.0, global_batch_size=2,
                    micro_batch_size=2, max_steps=2, eval_every=0, val_fraction=0.0, save_every=0)
    curves = []
    for backend in ("zero3", "zero2", "ddp"):
        train(output_dir=str(tmp_path / backend), backend=backend, **settings)
        curves.append(train_losses(tmp_path / backend))
    assert curves[0] == pytest.approx(curves[2], rel=1e-6) and curves[1] == pytest.approx(curves[2], rel=1e-6)
    from transformers.integrations import is_deepspeed_zero3_enabled

    assert not is_deepspeed_zero3_enabled()


def test_python_api_points_a_datasets_object_to_save_to_disk(corpus, tmp_path):
    """A notebook user passes the Dataset they loaded: one line that says how to hand it over, and that way works."""
    from datasets import load_dataset

    from greentext_dist import train

    ds = load_dataset("json", data_files=str(corpus), split="train")
    settings = dict(model="tiny", seq_len=32, precision="fp32", global_batch_size=4, micro_batch_size=2, max_steps=2, eval_every=0)
    with pytest.raises(UserError, match=r"dataset= takes a str, number or path, not a Dataset.*save_to_disk\(DIR\)"):
        train(dataset=ds, output_dir=str(tmp_path / "a"), **settings)
    ds.save_to_disk(tmp_path / "saved")
    assert train(dataset=tmp_path / "saved", output_dir=str(tmp_path / "b"), **settings).is_dir()


def test_a_warmup_longer_than_the_run_is_named(corpus, tmp_path, capfd):
    from greentext_dist.metrics import read_metrics

    out = tmp_path / "w"
    assert run_inprocess(tiny_args(corpus, out, *RUN[:4], "--max-steps", "3", "--warmup-steps", "10", "--lr", "1e-3", "--eval-every", "0")) == 0
    err = " ".join(capfd.readouterr().err.split())
    assert "--warmup-steps 10 is not shorter than the run (3 steps): the learning rate ends at 0.000273, below --lr 0.001" in err
    assert [round(r["lr"], 7) for r in read_metrics(out / "metrics.jsonl") if "lr" in r] == [round(1e-3 * k / 11, 7) for k in (1, 2, 3)]


def test_final_is_group_readable_and_tokenizer_knows_its_length(corpus, tmp_path):
    import json
    import stat

    out = tmp_path / "m"
    assert run_inprocess(tiny_args(corpus, out, *RUN)) == 0
    for f in (out / "final").iterdir():
        assert f.stat().st_mode & stat.S_IRGRP, f.name
    assert json.loads((out / "final" / "tokenizer_config.json").read_text())["model_max_length"] == 1024


def test_branching_from_an_older_checkpoint(corpus, tmp_path, capfd):
    out = tmp_path / "br"
    args = tiny_args(corpus, out, *RUN[:5], "6", *RUN[6:], "--save-every", "2", "--keep-last", "3")
    assert run_inprocess(args) == 0
    assert [n for n, _ in ckpt.step_dirs(out / "checkpoints")] == [2, 4, 6]
    capfd.readouterr()
    assert run_inprocess([*args, "--resume", str(out / "checkpoints" / "step-4")]) == 2
    assert "newer checkpoints exist (step-6)" in capfd.readouterr().err
    assert run_inprocess([*args[:-2], "--keep-last", "1", "--save-every", "1", "--resume", str(out / "checkpoints" / "step-4"),
                          "--overwrite"]) == 0
    assert [n for n, _ in ckpt.step_dirs(out / "checkpoints")] == [6]  # the branch's own step 6; step 5 rotated, never the new one
    assert len(train_losses(out)) == 6 and (out / "checkpoints" / "latest").read_text().strip() == "step-6"


def test_signals_import_without_sigusr1(monkeypatch):
    import importlib
    import signal

    from greentext_dist import signals

    monkeypatch.delattr(signal, "SIGUSR1")
    try:
        importlib.reload(signals)
        assert set(signals.NAMES.values()) == {"SIGTERM", "SIGINT"}
    finally:
        monkeypatch.undo()
        importlib.reload(signals)


@pytest.mark.slow  # launches the generate CLI
def test_generate_prints_samples_on_stdout(corpus, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "g"
    assert run_inprocess(tiny_args(corpus, out, *RUN)) == 0
    p = subprocess.run([sys.executable, "-m", "greentext_dist.generate", str(out / "final"), "--num-samples", "2", "--max-new-tokens", "8"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.count(">be me") == 2 and "sample 2" in p.stdout and ">be me" not in p.stderr


@pytest.mark.slow
def test_ctrl_c_during_start_up_is_one_line(corpus, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT, TRAIN

    proc = subprocess.Popen([sys.executable, str(TRAIN), *tiny_args(corpus, tmp_path / "c", *RUN)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    # Strike while torch is being imported (its library is mapped, training cannot have started): deterministic.
    for _ in range(2000):
        maps = open(f"/proc/{proc.pid}/maps").read() if proc.poll() is None else ""
        if "libtorch" in maps:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted outside the training steps" in err, err[-2000:]


@pytest.mark.slow
def test_a_save_failing_on_one_rank_stops_every_rank(corpus, tmp_path):
    from conftest import launch
    from faults import launch_env

    out = tmp_path / "one"
    p = launch(tiny_args(corpus, out, *RUN, "--save-every", "2"), nproc=2, env=launch_env(save_error_on_rank=1), timeout=180)
    assert p.returncode != 0
    assert "saving checkpoint step-2 failed: RuntimeError: injected failure on one rank" in p.stderr
    assert "free disk space" not in p.stderr and "see the failing rank's error above" in p.stderr  # not a disk problem
    assert not list((out / "checkpoints").glob("step-*")) and not list((out / "checkpoints").glob(".tmp-*"))


def test_apple_gpu_is_chosen_for_one_process(monkeypatch):
    import torch

    from greentext_dist import dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert dist.init_distributed().device.type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert dist.init_distributed().device.type == "cpu"
