"""Bad input: exit code 2, one line that names the problem and the fix, no traceback, nothing written."""

import json

import pytest

from conftest import launch, run_inprocess, tiny_args


def _bad_cases(tmp_path, corpus):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    fields = tmp_path / "fields.jsonl"
    fields.write_text(json.dumps({"body": ">be me", "score": 3}) + "\n")
    notgpt2 = tmp_path / "notgpt2"
    notgpt2.mkdir()
    (notgpt2 / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[optim]\nlr = 'fast'\n")
    return {
        "unknown model": (["--model", "huge"], "invalid choice: 'huge'"),
        "unknown backend": (["--backend", "megatron"], "invalid choice: 'megatron'"),
        "missing data file": (["--dataset", str(tmp_path / "nope.jsonl")], "does not exist"),
        "empty data file": (["--dataset", str(empty)], "is empty"),
        "missing text field": (["--dataset", str(fields)], "fields: body, score"),
        "validation fraction of 1 or more": (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1), got 1.5"),
        "seq-len beyond positions": (["--seq-len", "2048"], "longer than the model's 1024 positions"),
        "zero lr": (["--lr", "0"], "--lr must be positive"),
        "negative steps": (["--max-steps", "-3"], "--max-steps must be positive"),
        "tiny pretrained": (["--init", "pretrained"], "--model tiny has no pretrained weights"),
        "not a gpt2 dir": (["--model-path", str(notgpt2)], "holds a 'llama' model"),
        "hub dataset offline": (["--dataset", "someone/corpus"], "--dataset DIR"),
        "pretrained weights offline": (["--model", "small", "--init", "pretrained"], "--model-path DIR, or train from random init: --init scratch"),
        "mistyped model path": (["--model-path", str(tmp_path / "nope")], f"model {tmp_path / 'nope'} does not exist"),
        "no full step": (["--global-batch-size", "512", "--micro-batch-size", "8", "--epochs", "1"], "give no full step"),
        "bad config file": (["--config", str(cfg)], "'optim.lr' must be float"),
        "beta outside [0, 1)": (["--beta1", "1.5"], "--beta1 must be in [0, 1), got 1.5"),
        "negative seed": (["--seed", "-1"], "--seed must be in [0, 2**32)"),
        # Checked at start: save_pretrained would only refuse it at the first save, after the training it cost.
        "shard size that is not a size": (["--max-shard-size", "big"], "--max-shard-size 'big' is not a size"),
    }


def test_bad_input_cases(tmp_path, corpus, capfd, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))  # whatever this machine has cached
    cases = _bad_cases(tmp_path, corpus)
    for name, (extra, expected) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        args = tiny_args(corpus, out, "--global-batch-size", "4", "--micro-batch-size", "2")
        assert run_inprocess(args + extra) == 2, name
        err = capfd.readouterr().err
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0] and "Fix: " in lines[0], (name, err[-1500:])
        assert "Traceback" not in err, name
        assert not (out / "checkpoints").exists(), name


@pytest.mark.slow
def test_real_cli_error_has_no_traceback(tmp_path, corpus):
    p = launch(tiny_args(corpus, tmp_path / "o", "--seq-len", "2048"), launcher="python")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert "error: --seq-len 2048 is longer than the model's 1024 positions" in p.stderr and "Fix: use --seq-len 1024 or less" in p.stderr


def _more_cases(tmp_path, corpus, ckpt_tiny):
    """Cases that need files on disk: (extra args, expected text, env)."""
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": ">be me"}\n{"text": ">ok"}\n{"text": ">cut off\n{"text": ">after"}\n')
    truncated = tmp_path / "truncated"
    import shutil

    shutil.copytree(ckpt_tiny, truncated, ignore=shutil.ignore_patterns("train_state"))
    shard = sorted(truncated.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    damaged = tmp_path / "damaged" / "checkpoints"
    shutil.copytree(ckpt_tiny.parent, damaged)
    dshard = sorted((damaged / ckpt_tiny.name).glob("*.safetensors"))[0]
    dshard.write_bytes(dshard.read_bytes()[:100])
    afile = tmp_path / "a_file"
    afile.write_text("x")
    windows = tmp_path / "windows.csv"
    windows.write_bytes('text\n">be me\n>café"\n'.encode("cp1252"))
    return {
        "malformed jsonl line": (["--dataset", str(broken)], f"{broken} line 3 is not valid JSON", {}),
        "a file that is not UTF-8": (["--dataset", str(windows)], f"{windows} line 3 is not UTF-8 text (bytes e9)", {}),
        "truncated safetensors shard": (["--model-path", str(truncated)], "could not load the weights", {}),
        "truncated shard in a resume checkpoint": (["--resume", str(damaged / ckpt_tiny.name)], "has 100 bytes, expected", {}),
        "resume from another model size": (["--model", "small", "--init", "scratch", "--resume", str(ckpt_tiny)],
                                           "--model small is 12 x 768", {}),
        "GPU-only option without a GPU": (["--backend", "fsdp", "--fsdp-cpu-offload"], "this run has no GPU", {}),
        "unwritable output dir": (["--output-dir", str(afile / "out")], "is not writable", {}),
        "srun copies without ranks": (["--backend", "zero3"], "srun started 2 copies", {"SLURM_STEP_NUM_TASKS": "2"}),
        "WORLD_SIZE without MASTER_ADDR": ([], "MASTER_ADDR is not", {"WORLD_SIZE": "4"}),
        "bad --mix": (["--mix", "hellaswag=2"], "between 0 and 1", {}),
        "negative max-bad-steps": (["--max-bad-steps", "-1"], "--max-bad-steps must not be negative", {}),
        "tokenizer folder without tokenizer files": (["--tokenizer", str(tmp_path)], f"could not load a tokenizer from {tmp_path}", {}),
    }


def test_more_bad_input_cases(tmp_path, corpus, capfd, monkeypatch):
    from greentext_dist import checkpoint as ckpt

    base = tmp_path / "base"
    assert run_inprocess(tiny_args(corpus, base, "--global-batch-size", "4", "--micro-batch-size", "2", "--max-steps", "1")) == 0
    ckpt_tiny = base / "checkpoints" / "step-1"
    capfd.readouterr()
    for name, (extra, expected, env) in _more_cases(tmp_path, corpus, ckpt_tiny).items():
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        with monkeypatch.context() as m:
            for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"):  # as a fresh process would have them
                m.delenv(k, raising=False)
            for k, v in env.items():
                m.setenv(k, v)
            code = run_inprocess(tiny_args(corpus, out, "--global-batch-size", "4", "--micro-batch-size", "2") + extra)
        err = capfd.readouterr().err
        assert code == 2, (name, err[-1500:])
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0] and "Fix: " in lines[0], (name, err[-1500:])
        assert "Traceback" not in err, name
        assert not (out / "checkpoints").exists(), name
    assert ckpt.verify(ckpt_tiny) is None  # the run's own checkpoint was only read


RUN = ["--global-batch-size", "4", "--micro-batch-size", "2", "--max-steps", "4", "--eval-every", "0", "--lr", "1e-3"]


def test_more_errors_are_one_line(corpus, tmp_path, capfd):
    out = tmp_path / "e"
    assert run_inprocess(tiny_args(corpus, out, *RUN)) == 0
    capfd.readouterr()
    cases = {
        "resume an exported model": (tiny_args(corpus, tmp_path / "e2", *RUN, "--resume", str(out / "final")),
                                     "holds no training state"),
        "engine switch on resume": (tiny_args(corpus, out, *RUN[:5], "6", *RUN[6:], "--backend", "fsdp"),
                                    "--backend 'fsdp' (the checkpoint has 'ddp')"),
    }
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": ">be me"}) + "\n" + json.dumps({"text": 5}) + "\n")
    cases["text that is not a string"] = (tiny_args(bad, tmp_path / "e3", *RUN), "field 'text' holds a int")
    for name, (args, expected) in cases.items():
        assert run_inprocess(args) == 2, name
        err = capfd.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err, (name, err[-1500:])
