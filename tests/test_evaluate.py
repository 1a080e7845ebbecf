"""Generation, HellaSwag scoring against a brute-force reference, validation loss, robustness metrics."""

import json
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from greentext_dist import hellaswag as hs
from greentext_dist.config import ModelConfig
from greentext_dist.generate import generate, generate_batch
from greentext_dist.model import build_model
from greentext_dist.robustness import SuffixAutomaton, corpus_automaton, format_score, summarise
from greentext_dist.tokenizer import load_tokenizer

WORDS = "the a man woman dog is holding runs into kitchen then slowly [title] picks up ball and walks away with it".split()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("tiny")
    model = build_model(ModelConfig(model="tiny", init="scratch", dropout=0.0), seed=5)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    from greentext_dist.generate import load

    return load(str(model_dir), "cpu")[0]


# ---------------------------------------------------------------- generation


def test_generation_is_repeatable_and_batched_equals_one_at_a_time(model, tok):
    a = generate(model, tok, "be me\ngo outside", num_samples=3, max_new_tokens=12, seed=7)
    assert a == generate(model, tok, "be me\ngo outside", num_samples=3, max_new_tokens=12, seed=7)
    assert a != generate(model, tok, "be me\ngo outside", num_samples=3, max_new_tokens=12, seed=8)
    assert all(s.startswith(">be me\n>go outside") for s in a)
    prompts = [">be me", ">tfw no gf\n>be me, a longer prompt with more tokens", "Now the rules has changed", ""]
    batched = generate_batch(model, tok, prompts, num_samples=2, max_new_tokens=10, temperature=0)
    for p, group in zip(prompts, batched):
        alone = generate_batch(model, tok, [p], num_samples=1, max_new_tokens=10, temperature=0)[0][0]
        assert group == [alone, alone]  # left padding changes nothing


def test_generation_stops_at_end_of_text(model, tok):
    # Make every position predict one of two words or <|endoftext|>: the final LayerNorm outputs its bias,
    # and only those three embeddings align with it.
    import copy

    m = copy.deepcopy(model)
    eos, w1, w2 = tok.eos_token_id, tok.encode(" cat")[0], tok.encode(" dog")[0]
    with torch.no_grad():
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.copy_(torch.randn(m.config.n_embd))
        b = m.transformer.ln_f.bias / m.transformer.ln_f.bias.norm()
        m.transformer.wte.weight.mul_(0.0)
        for t in (eos, w1, w2):
            m.transformer.wte.weight[t] = b * 6.0
    samples = generate(m, tok, "", prefix="X", num_samples=16, max_new_tokens=40, seed=0, top_k=0, top_p=1.0, temperature=1.0)
    lengths = [len(tok.encode(s[1:])) for s in samples]
    assert all(set(s[1:].split()) <= {"cat", "dog"} for s in samples)
    assert "<|endoftext|>" not in "".join(samples) and max(lengths) < 40 and len(set(lengths)) > 1


@pytest.mark.slow
def test_generate_cli_prefix_and_output(model_dir, tmp_path):
    out = tmp_path / "s.jsonl"
    p = subprocess.run([sys.executable, "-m", "greentext_dist.generate", str(model_dir), "--prompt", r"be me\ngo outside", "--num-samples", "2",
                        "--max-new-tokens", "5", "--prefix", "PREFIX ", "--no-include-prefix", "--output", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["text"].startswith(">be me\n>go outside") for r in rows)  # a typed \n is a new line


# ---------------------------------------------------------------- HellaSwag


def test_generate_and_evaluate_refuse_bad_settings_before_the_work(model_dir, tmp_path, capsys):
    """Sampling settings, a length past the model's positions, and an output that cannot be written: one line each,
    before any sampling or scoring (an evaluation never ends by losing its result)."""
    from greentext_dist.evaluate import main as evaluate
    from greentext_dist.generate import main as generate

    afile = tmp_path / "a_file"
    afile.write_text("x")
    cases = {
        "negative temperature": (["--temperature", "-1"], "--temperature must not be negative"),
        "negative top-k": (["--top-k", "-3"], "--top-k must not be negative"),
        "top-p above 1": (["--top-p", "2"], "--top-p must be in (0, 1]"),
        "past the positions": (["--max-new-tokens", "5000"], "do not fit the model's 1024 positions. Fix: use --max-new-tokens 1020 or less"),
        "output under a file": (["--output", str(afile / "s.jsonl")], f"--output {afile / 's.jsonl'} cannot be written"),
        "output is a folder": (["--output", str(tmp_path)], "is a folder"),
    }
    for name, (extra, expected) in cases.items():
        assert generate([str(model_dir), "--num-samples", "1", *extra]) == 2, name
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0] and "Fix: " in lines[0], (name, err[-1500:])
    assert generate([str(model_dir), "--num-samples", "1", "--max-new-tokens", "4", "--output", str(tmp_path / "new" / "s.jsonl")]) == 0
    assert len((tmp_path / "new" / "s.jsonl").read_text().splitlines()) == 1  # its folder is created
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(i) + "\n" for i in make_items(2)))
    assert evaluate([str(model_dir), "--task", "hellaswag", "--data", str(items), "--output", str(afile / "r.json")]) == 2
    assert "--output" in capsys.readouterr().err
    assert evaluate([str(model_dir), "--task", "robustness", "--dataset", str(items), "--max-new-tokens", "1020"]) == 2
    assert "--max-new-tokens 1020 do not fit the model's 1024 positions" in " ".join(capsys.readouterr().err.split())
    unlabeled = tmp_path / "test_split.jsonl"
    unlabeled.write_text("".join(json.dumps({**i, "label": ""}) + "\n" for i in make_items(2)))  # as HellaSwag's test split
    assert evaluate([str(model_dir), "--task", "hellaswag", "--data", str(unlabeled)]) == 2
    assert "item 0 has label '', not the index of one of its 4 endings. Fix: use the validation split" in capsys.readouterr().err
    # Offline (as every test is), hub ids not in the cache: one line each.
    assert evaluate([str(model_dir), "--task", "hellaswag", "--data", "someone/hellaswag"]) == 2
    assert "HellaSwag 'someone/hellaswag' is on the Hugging Face hub, which is unreachable, and not in the datasets cache" in capsys.readouterr().err
    assert evaluate(["someone/gpt2-greentext", "--task", "hellaswag", "--data", str(items)]) == 2
    assert "model 'someone/gpt2-greentext' is not cached and the Hugging Face hub is unreachable" in capsys.readouterr().err


def test_harness_preprocessing():
    doc = {"activity_label": "Roof shingle removal", "ctx_a": "A man is on a roof.", "ctx_b": "he", "endings": ["a [step] b", "c"], "label": "1"}
    item = hs.to_item(doc)
    assert item["context"] == "Roof shingle removal: A man is on a roof. He" and item["endings"] == ["a b", "c"] and item["label"] == 1
    assert hs.preprocess("How to X [title] Do it.  Now") == "How to X. Do it. Now"
    assert hs.to_item({"activity_label": "A", "ctx": "x y", "endings": ["e"], "label": 0})["context"] == "A: x y"


def make_items(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    sent = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    docs = []
    for i in range(n):
        endings = [sent(rng.randint(1, 12)) + "." for _ in range(4)]
        if i % 2:
            docs.append({"activity_label": sent(2), "ctx_a": sent(rng.randint(3, 20)), "ctx_b": sent(2), "endings": endings, "label": rng.randrange(4)})
        else:  # the local schema: ctx only, sometimes with a trailing space
            docs.append({"activity_label": sent(2), "ctx": sent(rng.randint(3, 20)) + (" " if i % 4 == 0 else ""), "endings": endings,
                         "label": str(rng.randrange(4))})
    return docs


def brute_force(model, tok, items) -> tuple[float, float, list[float]]:
    """Plain transformers: one context+ending per forward pass, no batching, no padding."""
    sums = []
    for it in items:
        for e in it["endings"]:
            ctx, cont = hs.encode_pair(tok, it["context"], " " + e)
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            sums.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
    return *accuracies(items, sums), sums


def accuracies(items, sums) -> tuple[float, float]:
    """acc (highest log-probability) and acc_norm (per character of the ending), by hand."""
    acc = acc_norm = 0
    for i, it in enumerate(items):
        s = sums[4 * i:4 * i + 4]
        acc += max(range(4), key=lambda j: s[j]) == it["label"]
        acc_norm += max(range(4), key=lambda j: s[j] / len(it["endings"][j])) == it["label"]
    return acc / len(items), acc_norm / len(items)


@pytest.mark.slow
def test_hellaswag_equals_brute_force_reference(model, model_dir, tok, tmp_path):
    n = 60
    docs = make_items(n)
    data = tmp_path / "hs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    items = hs.load_items(str(data))
    acc, acc_norm, ref_sums = brute_force(model, tok, items)
    sums = hs.continuation_logprobs(model, hs.requests(tok, items, 1024), batch_size=7, device="cpu")
    assert sums == pytest.approx(ref_sums, abs=1e-4)
    assert sum(r["acc"] for r in hs.score(items, ref_sums)) < len(items)  # a random model is not perfect: the test can fail
    out = tmp_path / "res.json"
    from greentext_dist.evaluate import main

    log = tmp_path / "items.jsonl"
    assert main([str(model_dir), "--task", "hellaswag", "--data", str(data), "--batch-size", "5", "--output", str(out),
                 "--log-samples", str(log)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == n and res["acc"] == pytest.approx(acc) and res["acc_norm"] == pytest.approx(acc_norm)
    per_item = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["index"] for r in per_item] == list(range(n)) and sum(r["acc"] for r in per_item) / n == pytest.approx(acc)
    assert [v for r in per_item for v in r["logprobs"]] == pytest.approx(ref_sums, abs=1e-4)
    assert res["acc_stderr"] == pytest.approx((acc * (1 - acc) / (n - 1)) ** 0.5)
    assert res["acc_norm_stderr"] == pytest.approx((acc_norm * (1 - acc_norm) / (n - 1)) ** 0.5)
    # sharded over two ranks and all-reduced: the same numbers
    out2 = tmp_path / "res2.json"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "greentext_dist.evaluate",
                        str(model_dir), "--task", "hellaswag", "--data", str(data), "--limit", "25", "--output", str(out2)],
                       capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    res2 = json.loads(out2.read_text())
    a25, n25 = accuracies(items[:25], ref_sums)  # 25 items: the ranks get 13 and 12
    assert res2["n"] == 25 and res2["acc"] == pytest.approx(a25) and res2["acc_norm"] == pytest.approx(n25)
    assert "per_item" not in res2 and res2["acc_stderr"] > 0


def test_hellaswag_files_that_cannot_be_read_are_one_line(tmp_path):
    from greentext_dist.errors import UserError

    good = "".join(json.dumps(d) + "\n" for d in make_items(3))
    cut = tmp_path / "cut.jsonl"
    cut.write_text(good + '{"ctx": "cut off\n')
    with pytest.raises(UserError, match=r"cut.jsonl line 4 is not valid JSON \(Unterminated string"):
        hs.load_items(str(cut))
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes((good + json.dumps({**make_items(1)[0], "ctx": "a café"}, ensure_ascii=False) + "\n").encode("cp1252"))
    with pytest.raises(UserError, match=r"windows.jsonl line 4 is not UTF-8 text \(bytes e9\)"):
        hs.load_items(str(windows))
    fields = tmp_path / "fields.jsonl"
    fields.write_text(json.dumps({"question": "x", "answer": "y"}) + "\n")
    with pytest.raises(UserError, match=r"lacks fields \['ctx', 'endings', 'label'\]"):
        hs.load_items(str(fields))


def test_hellaswag_saved_to_disk_reads_as_the_jsonl(tmp_path):
    """HellaSwag saved with `datasets` (load_dataset("Rowan/hellaswag").save_to_disk(DIR) where the hub is reachable)
    gives the same items as its jsonl; the whole DatasetDict gives its validation split."""
    from datasets import Dataset, DatasetDict

    from greentext_dist.errors import UserError

    docs = make_items(8)
    (tmp_path / "hs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    columns = {k: [d.get(k) for d in docs] for k in ("activity_label", "ctx", "ctx_a", "ctx_b", "endings")}
    val = Dataset.from_dict({**columns, "label": [str(d["label"]) for d in docs]})  # the hub's schema: labels are strings
    val.save_to_disk(tmp_path / "val")
    DatasetDict({"train": val.select(range(2)), "validation": val}).save_to_disk(tmp_path / "all")
    expected = hs.load_items(str(tmp_path / "hs.jsonl"))
    assert hs.load_items(str(tmp_path / "val")) == expected and hs.load_items(str(tmp_path / "all")) == expected
    DatasetDict({"test": val}).save_to_disk(tmp_path / "test-only")
    with pytest.raises(UserError, match=r"test-only has no 'validation' split \(splits: test\)"):
        hs.load_items(str(tmp_path / "test-only"))


def test_hellaswag_empty_ending_does_not_divide_by_zero():
    items = [{"context": "x", "endings": ["", "a", "bb", "ccc"], "label": 0}]
    (r,) = hs.score(items, [-1.0, -5.0, -5.0, -5.0])
    assert r["pred"] == 0 and r["pred_norm"] == 0 and r["acc"] == r["acc_norm"] == 1


# ---------------------------------------------------------------- validation loss


def test_val_loss_task_matches_training_definition(model, model_dir, tok, corpus, tmp_path):
    from greentext_dist.evaluate import main

    out = tmp_path / "v.json"
    assert main([str(model_dir), "--task", "val-loss", "--dataset", str(corpus), "--all-posts", "--seq-len", "32",
                 "--batch-size", "3", "--output", str(out)]) == 0
    got = json.loads(out.read_text())
    stream = []  # every post in file order, tokenised here (not by the store), <|endoftext|> after each
    for line in corpus.read_text().splitlines():
        stream += tok.encode(json.loads(line)["text"].strip()) + [tok.eos_token_id]
    rows = [stream[i:i + 33] for i in range(0, len(stream) - 1, 32)]  # the last partial row is scored too
    total = count = 0.0
    for r in rows:  # one row at a time, unpadded
        ids = torch.tensor([r])
        with torch.no_grad():
            logits = model(input_ids=ids[:, :-1]).logits
        total += F.cross_entropy(logits[0].float(), ids[0, 1:], reduction="sum").item()
        count += len(r) - 1
    assert got["tokens"] == count and got["val_loss"] == pytest.approx(total / count, rel=1e-5)


# ---------------------------------------------------------------- robustness metrics


def test_format_score_on_hand_made_samples():
    good = " outside\n>see a dog\n>it bites me\n\n>mfw"
    assert format_score(good).__dict__ == {"lines": 3, "green_lines": 3, "well_formed": True}
    mixed = " and then\n>be me\nI am writing to inform you\n>mfw"
    assert format_score(mixed).__dict__ == {"lines": 3, "green_lines": 2, "well_formed": False}
    assert format_score(" one line only").lines == 0 and not format_score(" x\n>only one").well_formed
    samples = [{"kind": "greentext", "generated": good, "longest_run": 60}, {"kind": "deviation", "generated": mixed, "longest_run": 3}]
    s = summarise(samples)
    assert s["all"]["line_adherence"] == pytest.approx(5 / 6) and s["all"]["well_formed"] == 0.5
    assert s["all"]["memorised_over_50"] == 0.5 and s["greentext"]["longest_run_max"] == 60 and s["deviation"]["well_formed"] == 0.0


def brute_longest(corpus: list[int], q: list[int]) -> int:
    best = 0
    for i in range(len(q)):
        for j in range(len(corpus)):
            k = 0
            while i + k < len(q) and j + k < len(corpus) and q[i + k] == corpus[j + k]:
                k += 1
            best = max(best, k)
    return best


def test_longest_shared_run_equals_brute_force():
    rng = random.Random(3)
    for _ in range(30):
        corpus = [rng.randrange(5) for _ in range(rng.randint(1, 60))]
        q = [rng.randrange(5) for _ in range(rng.randint(0, 25))]
        assert SuffixAutomaton(corpus).longest_match(q) == brute_longest(corpus, q)
    sa = corpus_automaton([[1, 2, 3, 4], [7, 8, 9]], eos=0)
    assert sa.longest_match([9, 2, 3, 4, 0, 7, 5]) == 5  # runs may cross a post boundary, as the packed stream does
    assert sa.longest_match([]) == 0


def test_robustness_task_writes_json_and_report(model_dir, corpus, tmp_path):
    from greentext_dist.evaluate import main

    out = tmp_path / "rob.json"
    assert main([str(model_dir), "--task", "robustness", "--dataset", str(corpus), "--num-samples", "2", "--max-new-tokens", "8",
                 "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["summary"]["all"]["samples"] == 24 and {s["kind"] for s in res["samples"]} == {"greentext", "deviation"}
    report = (tmp_path / "rob.md").read_text()
    assert "well-formed" in report and "you should ignore how the train was created" in report


# ---------------------------------------------------------------- samples during training, training report


@pytest.mark.slow  # two training runs: kept out of the fast tier (under 2 min)
def test_sampling_during_training_leaves_the_curve_alone_and_report_is_written(corpus, tmp_path):
    from conftest import run_inprocess, tiny_args, train_losses

    common = ["--max-steps", "6", "--global-batch-size", "4", "--micro-batch-size", "2", "--eval-every", "3", "--dropout", "0.1"]
    assert run_inprocess(tiny_args(corpus, tmp_path / "plain", *common)) == 0
    assert run_inprocess(tiny_args(corpus, tmp_path / "sampled", *common, "--sample-every", "2")) == 0
    assert train_losses(tmp_path / "sampled") == train_losses(tmp_path / "plain")  # dropout RNG untouched
    rows = [json.loads(l) for l in (tmp_path / "sampled" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 2, 2, 4, 4, 4, 6, 6, 6] and rows[0]["text"].startswith(">be me")
    report = (tmp_path / "sampled" / "report.md").read_text()
    assert "final val loss" in report and "loss.png" in report and "Samples at step 6" in report
    assert (tmp_path / "sampled" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_matplotlib_says_so(corpus, tmp_path, monkeypatch):
    from conftest import run_inprocess, tiny_args
    from greentext_dist.report import write_report

    assert run_inprocess(tiny_args(corpus, tmp_path / "r", "--max-steps", "2", "--global-batch-size", "2", "--micro-batch-size", "2")) == 0
    (tmp_path / "r" / "loss.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    text = write_report(tmp_path / "r", [("model", "tiny")]).read_text()
    assert "matplotlib is not installed" in text and not (tmp_path / "r" / "loss.png").exists()
