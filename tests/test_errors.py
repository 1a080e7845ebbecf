"""Bad input: exit code 2, one line that names the problem and the fix, no traceback, nothing written."""

import json


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
        "indivisible batch": (["--global-batch-size", "10", "--micro-batch-size", "4"], "not divisible by micro-batch 4 x 1 ranks"),
        "seq-len beyond positions": (["--seq-len", "2048"], "longer than GPT-2's 1024 positions"),
        "zero lr": (["--lr", "0"], "--lr must be positive"),
        "negative steps": (["--max-steps", "-3"], "--max-steps must be positive"),
        "tiny pretrained": (["--init", "pretrained"], "--model tiny has no pretrained weights"),
        "not a gpt2 dir": (["--model-path", str(notgpt2)], "holds a 'llama' model"),
        "hub dataset offline": (["--dataset", "someone/corpus"], "--dataset DIR"),
        "no full step": (["--global-batch-size", "512", "--micro-batch-size", "8", "--epochs", "1"], "give no full step"),
        "bad config file": (["--config", str(cfg)], "'optim.lr' must be float"),
    }


def test_bad_input_cases(tmp_path, corpus, capfd):
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


def test_real_cli_error_has_no_traceback(tmp_path, corpus):
    p = launch(tiny_args(corpus, tmp_path / "o", "--global-batch-size", "6", "--micro-batch-size", "4"), launcher="python")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert "error: --global-batch-size 6 is not divisible" in p.stderr and "Fix: use a multiple of 4" in p.stderr
