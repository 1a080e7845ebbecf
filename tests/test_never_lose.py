"""A user's second week: the toolkit never loses a run (following our own fix messages, a damaged only checkpoint),
says how long things take, and answers mistakes in one line, in keywords for the Python API, and at once."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_inprocess, tiny_args, train_losses
from greentext_dist import checkpoint as ckpt
from greentext_dist.errors import UserError

RUN = ["--global-batch-size", "4", "--micro-batch-size", "2", "--eval-every", "0"]


def error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


# 1. Following our own fix messages never deletes the run.

def test_overwrite_refuses_to_move_the_model_path_away_and_moves_instead_of_deleting(corpus, tmp_path, capfd):
    out = tmp_path / "run"
    assert run_inprocess(tiny_args(corpus, out, *RUN, "--max-steps", "4", "--save-every", "2")) == 0
    before = snapshot(out)
    step = out / "checkpoints" / "step-4"
    # What a user types after "start a new run from its weights" (the README once said so): the weights live inside
    # the folder --overwrite would empty. Refused before anything moves, with the way that works.
    assert run_inprocess(tiny_args(corpus, out, *RUN, "--max-steps", "2", "--model-path", str(step), "--resume", "never", "--overwrite")) == 2
    line = error_line(capfd.readouterr().err)
    assert f"--model-path {step} lies inside {out / 'checkpoints'}" in line and "--output-dir NEW" in line
    assert snapshot(out) == before and ckpt.verify(step) is None
    # The way out it names works, and leaves the first run alone.
    assert run_inprocess(tiny_args(corpus, tmp_path / "new", *RUN, "--max-steps", "2", "--model-path", str(step))) == 0
    assert snapshot(out) == before
    # --overwrite with nothing of the run inside: the previous run is moved aside whole (a rename), never deleted.
    assert run_inprocess(tiny_args(corpus, out, *RUN, "--max-steps", "3", "--resume", "never", "--overwrite")) == 0
    aside = list((out / "overwritten").iterdir())
    assert len(aside) == 1 and "moved the previous run's checkpoints" in capfd.readouterr().err
    assert ckpt.verify(aside[0] / "checkpoints" / "step-4") is None and (aside[0] / "final" / "config.json").is_file()
    assert len(train_losses(aside[0])) == 4 and len(train_losses(out)) == 3  # each run's own metrics


def test_every_input_of_the_run_is_guarded(tmp_path):
    """--dataset, --val-dataset, --mix, --tokenizer, --cache-dir, --ds-config, --resume: none may lie in what moves."""
    from greentext_dist import rundir

    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "final" / "posts.jsonl").write_text("{}\n")
    for flag in ("--dataset", "--val-dataset", "--mix x.jsonl", "--tokenizer", "--cache-dir", "--ds-config"):
        with pytest.raises(UserError, match=f"^{flag} .*lies inside .*final"):
            rundir.set_aside(out, [out / "final"], {flag: str(out / "final" / "posts.jsonl")}, "test")
    assert (out / "final" / "posts.jsonl").is_file()
    # A hub id or a path elsewhere is no reason to refuse.
    assert rundir.set_aside(out, [out / "final"], {"--dataset": "DarwinAnim8or/greentext", "--tokenizer": str(tmp_path)}, "t").is_dir()
    assert not (out / "final").exists()


def test_branching_moves_the_newer_checkpoints_aside(corpus, tmp_path):
    out = tmp_path / "run"
    assert run_inprocess(tiny_args(corpus, out, *RUN, "--max-steps", "6", "--save-every", "2", "--keep-last", "5")) == 0
    branch = out / "checkpoints" / "step-2"
    assert run_inprocess(tiny_args(corpus, out, *RUN, "--max-steps", "6", "--save-every", "2", "--keep-last", "5",
                                   "--resume", str(branch), "--overwrite")) == 0
    aside = next((out / "overwritten").iterdir()) / "checkpoints"
    assert sorted(p.name for p in aside.iterdir()) == ["step-4", "step-6"] and all(ckpt.verify(p) is None for p in aside.iterdir())


# 2. A damaged checkpoint is never rotated away, nor silently replaced by a fresh start.

def truncate_weights(step: Path) -> None:
    shard = sorted(step.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])


def test_a_damaged_only_checkpoint_stops_the_run_instead_of_restarting_it(corpus, tmp_path, capfd):
    out = tmp_path / "run"
    args = tiny_args(corpus, out, *RUN, "--max-steps", "6", "--save-every", "1", "--keep-last", "1")
    assert run_inprocess([*args, "--halt-at-step", "3"]) == 0
    step = out / "checkpoints" / "step-3"
    truncate_weights(step)
    metrics = (out / "metrics.jsonl").read_text()
    capfd.readouterr()
    assert run_inprocess(args) == 2  # the same command, as a requeued job would run it
    line = error_line(capfd.readouterr().err)
    assert "no usable checkpoint" in line and "step-3" in line and "bytes" in line
    assert "restore" in line and "--resume never --overwrite" in line and "--output-dir NEW" in line
    assert step.is_dir() and (out / "metrics.jsonl").read_text() == metrics  # nothing trained, rotated or rewritten
    # One of the two ways out: start over here; the damaged checkpoint is moved aside, not deleted.
    assert run_inprocess([*args, "--resume", "never", "--overwrite"]) == 0
    assert len(train_losses(out)) == 6
    kept = next((out / "overwritten").iterdir()) / "checkpoints" / "step-3"
    assert ckpt.verify(kept).startswith("model") and (kept / "train_state").is_dir()
    card = (out / "final" / "README.md").read_text()  # 4. the model card's code compiles
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert blocks and [compile(b, "README.md", "exec") for b in blocks]


def test_a_damaged_newest_checkpoint_is_kept_out_of_the_rotation(corpus, tmp_path, capfd):
    out = tmp_path / "run"
    args = tiny_args(corpus, out, *RUN, "--max-steps", "8", "--save-every", "2", "--keep-last", "2")
    assert run_inprocess([*args, "--halt-at-step", "4"]) == 0
    truncate_weights(out / "checkpoints" / "step-4")
    assert run_inprocess(args) == 0  # resumes from step-2, with a warning that names what it kept
    err = capfd.readouterr().err
    assert "step-4 is unusable" in err and "resuming from step-2" in err and "damaged-step-4" in err
    root = out / "checkpoints"
    assert [n for n, _ in ckpt.step_dirs(root)] == [6, 8] and (root / "damaged-step-4").is_dir()  # rotated twice since, still there
    assert len(train_losses(out)) == 8


def test_an_interrupted_replacement_is_finished_not_lost(tmp_path):
    """Killed between the two renames that replace a folder: the next start puts the complete copy back."""
    root = tmp_path / "checkpoints"
    for name in (".tmp-step-4", ".del-step-6", ".tmp-best"):
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(os.urandom(100))
        ckpt.write_manifest(root / name)
    (root / ".tmp-step-8").mkdir()  # a save that never finished: no manifest
    ckpt.remove_partial_saves(root)
    assert sorted(p.name for p in root.iterdir()) == ["best", "step-4", "step-6"]
    assert all(ckpt.verify(root / n) is None for n in ("best", "step-4", "step-6"))


# 3. Time is visible.

def test_a_slow_step_is_named_at_start_with_a_quick_try(corpus, tmp_path, monkeypatch, capfd):
    from greentext_dist import perf

    monkeypatch.setattr(perf, "cpu_matmul_flops", lambda d, v, n, precision: 1e6)  # a very slow CPU
    assert run_inprocess(tiny_args(corpus, tmp_path / "run", *RUN, "--max-steps", "1")) == 0
    err = capfd.readouterr().err
    row = next(l for l in err.splitlines() if l.startswith("time "))
    assert "per step" in row and "for the 1 step(s) to go" in row
    warning = next(l for l in err.splitlines() if "one step will take" in l)
    assert "--global-batch-size 8 --micro-batch-size 8 --seq-len 128" in warning


def test_the_readme_cpu_command_for_ones_own_data_runs(corpus, tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    command = next(l for l in readme.splitlines() if "my_posts.jsonl" in l and "--seq-len 128" in l and "--precision fp32" in l)
    argv = command.split("#")[0].split()
    assert argv[:3] == ["python", "-m", "greentext_dist.train"]
    argv = [str(corpus) if a == "my_posts.jsonl" else str(tmp_path / a) if a.startswith("runs/") else a for a in argv[3:]]
    assert run_inprocess([*argv, "--max-steps", "2"]) == 0  # later flags win: a short run of the same command


@pytest.mark.slow
def test_the_default_cpu_run_says_how_long_a_step_takes_and_answers_a_signal_at_once(corpus, tmp_path):
    """The issue's exact command: the default 512 x 1024 batch on a CPU is hours a step. The start says so, and
    Ctrl-C is answered when it arrives (not when the step ends); a second Ctrl-C stops at once."""
    proc = subprocess.Popen([sys.executable, "-m", "greentext_dist.train", "--model", "tiny", "--dataset", str(corpus),
                             "--output-dir", str(tmp_path / "run")], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    seen, acked = [], None
    for line in proc.stderr:
        seen.append(line)
        if "one step will take" in line:
            time.sleep(2)  # inside step 1
            proc.send_signal(signal.SIGINT)
            sent = time.monotonic()
        elif "SIGINT received" in line:
            acked = time.monotonic() - sent
            proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    err = "".join(seen)
    assert acked is not None and acked < 30, err[-3000:]
    assert "stopping after step 1 finishes" in err and "Ctrl-C again to stop now" in err
    assert proc.returncode == 130 and "Traceback" not in err


@pytest.mark.slow
def test_a_signal_is_acknowledged_with_the_step_it_stops_after(corpus, tmp_path):
    from test_signals import start, wait_for_steps

    out = tmp_path / "run"
    proc = start(tiny_args(corpus, out, *RUN, "--max-steps", "400"), 1)
    wait_for_steps(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    ack = re.search(r"SIGTERM received: stopping after step (\d+) finishes \(about [^)]*\)", err)
    done = re.search(r"stopped by SIGTERM after step (\d+)", err)
    assert ack and done and ack.group(1) == done.group(1), err[-3000:]


# 5, 6. Settings as people write them; exact names.

@pytest.mark.parametrize("suffix, text", [(".yaml", "optim:\n  lr: 1e-3\n  min_lr: 1E-4\ntrain:\n  max_steps: 1e1\n"),
                                          (".toml", "[optim]\nlr = \"1e-3\"\nmin_lr = 1e-4\n[train]\nmax_steps = 10\n"),
                                          (".json", '{"optim": {"lr": 1e-3, "min_lr": "1e-4"}, "train": {"max_steps": 10.0}}')])
def test_numbers_in_config_files_are_read_however_they_are_written(tmp_path, suffix, text):
    from greentext_dist.config import parse_args

    f = tmp_path / f"c{suffix}"
    f.write_text(text)
    cfg = parse_args(["--config", str(f)])
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.train.max_steps) == (1e-3, 1e-4, 10) and isinstance(cfg.train.max_steps, int)


@pytest.mark.parametrize("text, message", [("optim:\n  lr: fast\n", "must be float, got 'fast'"), ("train:\n  max_steps: 2.5\n", "must be int"),
                                           ("optim:\n  lr: .nan\n", "must be a finite number"), ("train:\n  seed: true\n", "must be int")])
def test_what_is_not_a_number_is_still_refused(tmp_path, text, message):
    from greentext_dist.config import parse_args

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(UserError, match=message):
        parse_args(["--config", str(tmp_path / "c.yaml")])


def test_no_abbreviations_and_keywords_in_api_errors(corpus, tmp_path, capfd):
    from greentext_dist import train

    assert run_inprocess(tiny_args(corpus, tmp_path / "a", *RUN, "--max-step", "3")) == 2
    assert "unknown flag --max-step. Fix: did you mean --max-steps?" in error_line(capfd.readouterr().err)
    with pytest.raises(UserError, match=r"unknown keyword max_step=\. Fix: use max_steps="):
        train(model="tiny", dataset=str(corpus), max_step=3)
    with pytest.raises(UserError, match=r"^compile= takes True or False"):
        train(model="tiny", dataset=str(corpus), compile="no")
    with pytest.raises(UserError) as e:
        train(model="tiny", dataset=str(corpus), output_dir=str(tmp_path / "b"), seq_len=32, max_steps=2, global_batch_size=4,
              micro_batch_size=2, warmup_steps=-1)
    assert "warmup_steps=" in str(e.value) and "--" not in str(e.value)


# 7. Ctrl-C with the launcher that keeps the README's promise.

@pytest.mark.slow
def test_ctrl_c_under_greentext_train_nproc_saves_and_exits_0(corpus, tmp_path):
    def command(out):
        return [sys.executable, "-m", "greentext_dist.train", "--nproc", "2", *tiny_args(corpus, out, *RUN, "--max-steps", "20", "--lr", "1e-3")]

    out = tmp_path / "run"
    # Ctrl-C in a terminal signals the foreground process group: here, the launcher's (the ranks have their own sessions).
    proc = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    from test_signals import wait_for_steps

    wait_for_steps(out, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    stopped = len(train_losses(out))
    assert 3 <= stopped < 20, "the signal arrived too late to test anything"
    assert f"stopped by SIGINT after step {stopped}" in err and ckpt.verify(out / "checkpoints" / f"step-{stopped}") is None
    assert err.count("SIGINT received: stopping after step") == 1  # one line from the one node, not one per rank
    # The same command resumes onto the uninterrupted curve (2 ranks resumed on 2: exact).
    for folder in (out, tmp_path / "straight"):
        p = subprocess.run(command(folder), capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    a, b = train_losses(out), train_losses(tmp_path / "straight")
    assert len(a) == len(b) == 20 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-6


@pytest.mark.slow
def test_a_rank_that_fails_ends_the_job_with_its_code(tmp_path):
    from greentext_dist.launch import launch

    # Bad settings on every rank: each says so once (the first rank to fail sets the job's code) and none hangs.
    t0 = time.monotonic()
    code = launch(2, ["--model", "tiny", "--dataset", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and time.monotonic() - t0 < 120


def test_nproc_is_refused_inside_another_launcher(monkeypatch):
    from greentext_dist.launch import split_nproc

    assert split_nproc(["--nproc", "2", "--model", "tiny"]) == (2, ["--model", "tiny"])
    assert split_nproc(["--nproc=3"]) == (3, [])
    with pytest.raises(UserError, match="is not a number of ranks"):
        split_nproc(["--nproc", "zero"])
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="already one rank of a launcher"):
        split_nproc(["--nproc", "2"])


# 8. Smaller things.

def test_an_output_dir_that_is_a_file_is_named(corpus, tmp_path, capfd):
    f = tmp_path / "taken"
    f.write_text("x")
    assert run_inprocess(tiny_args(corpus, f, *RUN, "--max-steps", "1")) == 2
    assert f"--output-dir {f} is a file, not a folder" in error_line(capfd.readouterr().err) and f.read_text() == "x"


def test_no_empty_samples_file_and_a_plain_loss_plot(corpus, tmp_path):
    from greentext_dist.metrics import read_metrics
    from greentext_dist.report import loss_figure

    out = tmp_path / "run"
    assert run_inprocess(tiny_args(corpus, out, *RUN, "--max-steps", "3", "--val-fraction", "0")) == 0
    assert not (out / "samples.jsonl").exists() and (out / "loss.png").is_file()
    fig = loss_figure(read_metrics(out / "metrics.jsonl"))
    fig.canvas.draw()
    assert fig.axes[0].get_legend() is None  # no "validation" entry for a run without validation
    steps = [t.get_text().replace("−", "-") for t in fig.axes[0].get_xticklabels() if t.get_text()]
    assert steps and all(re.fullmatch(r"-?\d+", s) for s in steps), steps  # no 1.5 steps


@pytest.mark.slow
def test_logs_written_to_a_file_keep_whole_lines(corpus, tmp_path):
    """A SLURM log is a file: the summary and messages are not wrapped at 80 columns nor cut with an ellipsis."""
    out = tmp_path / ("a-folder-name-long-enough-that-the-whole-path-is-over-eighty-columns" * 2)
    p = subprocess.run([sys.executable, "-m", "greentext_dist.train", *tiny_args(corpus, out, *RUN, "--max-steps", "1")],
                       capture_output=True, text=True, cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "GREENTEXT_PLAIN_LOG"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "…" not in p.stderr and any(l.startswith("output") and l.rstrip().endswith(str(out)) for l in p.stderr.splitlines())
    assert any(l.startswith("done:") and str(out / "final") in l for l in p.stderr.splitlines())


@pytest.mark.slow
def test_the_cpu_memory_estimate_is_close_to_the_measured_peak(corpus, tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "greentext_dist.train", *tiny_args(corpus, out, "--global-batch-size", "8", "--micro-batch-size", "8",
                        "--seq-len", "512", "--dropout", "0.1", "--max-steps", "1", "--eval-every", "0")], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    planned = float(re.search(r"~([\d.]+) GiB peak on this CPU", p.stderr).group(1))
    measured = max(json.loads(l).get("peak_mem_gb", 0) for l in (out / "metrics.jsonl").read_text().splitlines())
    assert planned == pytest.approx(measured, rel=0.2), (planned, measured)


COMMANDS = [["greentext_dist.train", "--help"], ["greentext_dist.train", "--max-step", "3"], ["greentext_dist.train", "--lr", "-1"],
            ["greentext_dist.evaluate", "x", "--task", "hellaswg"], ["greentext_dist.generate", "--help"], ["greentext_dist.plan", "--gpus", "x"],
            ["greentext_dist.prepare", "--help"], ["greentext_dist.push", "--help"]]


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_help_and_one_line_errors_come_before_torch_loads(argv):
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", *argv], capture_output=True, text=True, cwd=ROOT)
    loaded = {l.split("|")[-1].strip() for l in p.stderr.splitlines() if l.startswith("import time:")}
    assert p.returncode == (0 if "--help" in argv else 2), p.stderr[-2000:]
    assert not {"torch", "transformers", "deepspeed", "datasets"} & loaded
    if p.returncode == 2:
        assert len([l for l in p.stderr.splitlines() if not l.startswith("import time:")]) == 1
        assert "did you mean hellaswag?" in p.stderr if "hellaswg" in argv else True
