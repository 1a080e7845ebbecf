"""The token store: tokenised once and reused, keyed by what decides its content, safe against concurrent builders,
damage, a source changing under it and a full disk, and a rank's memory independent of the corpus size."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, data_config, run_inprocess, tiny_args, write_posts
from fakehub import SHA
from greentext_dist import store as store_mod
from greentext_dist.data import prepare_source, training_data
from greentext_dist.errors import UserError
from greentext_dist.tokenizer import bundled_gpt2

TOK = bundled_gpt2()


def stores_in(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


def leftovers(cache: Path) -> list[Path]:
    """Anything a later run could mistake for a store: folders other than finished stores."""
    return sorted(p for p in cache.iterdir() if p.is_dir() and not (p / "meta.json").exists())


@pytest.fixture
def counting(monkeypatch):
    """How many posts were tokenised (store.encode is the one tokenisation call)."""
    seen = {"posts": 0}
    real = store_mod.encode

    def encode(tok, texts):
        seen["posts"] += len(texts)
        return real(tok, texts)

    monkeypatch.setattr(store_mod, "encode", encode)
    return seen


def prepare(*args, cache, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "greentext_dist.prepare", *args, "--cache-dir", str(cache)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env={**os.environ, **(env or {})}, **kw)


def test_second_start_does_no_tokenisation(corpus, tmp_path, counting):
    common = ["--max-steps", "1", "--global-batch-size", "4", "--micro-batch-size", "4", "--cache-dir", str(tmp_path / "cache")]
    assert run_inprocess(tiny_args(corpus, tmp_path / "a", *common)) == 0
    assert counting["posts"] == 60  # every post once: training and validation come from the same store
    assert run_inprocess(tiny_args(corpus, tmp_path / "b", *common, "--val-fraction", "0.3")) == 0
    assert counting["posts"] == 60  # a new run, even with another split, reads the store
    assert len(stores_in(tmp_path / "cache")) == 1


def test_each_key_part_makes_a_new_store(tmp_path, counting, monkeypatch):
    cache = tmp_path / "cache"
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"text": f">post {i}", "body": f">body {i}"}) + "\n" for i in range(30)))
    first = prepare_source(str(path), None, TOK, cache, progress=False)
    assert prepare_source(str(path), None, TOK, cache, progress=False).path == first.path and counting["posts"] == 30

    by_field = prepare_source(str(path), "body", TOK, cache, progress=False)  # the text mapping
    assert by_field.path != first.path and TOK.decode(by_field.post(0)) == ">body 0<|endoftext|>"

    other_tok = bundled_gpt2()
    other_tok.add_tokens(["<|greentext|>"])  # the tokenizer
    assert prepare_source(str(path), None, other_tok, cache, progress=False).path != first.path

    with monkeypatch.context() as m:
        m.setattr(store_mod, "FORMAT", store_mod.FORMAT + 1)  # the format version
        assert prepare_source(str(path), None, TOK, cache, progress=False).path != first.path

    with open(path, "a") as f:  # the source's content
        f.write(json.dumps({"text": ">a new post", "body": "x"}) + "\n")
    changed = prepare_source(str(path), None, TOK, cache, progress=False)
    assert changed.path != first.path and changed.n_posts == 31
    assert counting["posts"] == 30 * 4 + 31
    assert len(stores_in(cache)) == 5 and not leftovers(cache)


@pytest.mark.slow
def test_two_processes_preparing_at_once_build_one_store(tmp_path):
    data = write_posts(tmp_path / "p.jsonl", n=3000)
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "greentext_dist.prepare", "--dataset", str(data), "--cache-dir", str(cache)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    assert len({o.split("->")[-1].strip() for o, _ in outs}) == 1  # both name the same store
    built = [bool(re.search(r"tokens in [\d.]+ s", " ".join(e.split()))) for _, e in outs]
    assert sum(built) == 1, outs  # the lock: one tokenised, the other waited (or came later) and reused it
    (store,) = stores_in(cache)
    assert not leftovers(cache)
    assert prepare("--dataset", str(data), "--verify", cache=cache).returncode == 0


def test_without_file_locks_two_builders_keep_the_first_finished_store(corpus, tmp_path, monkeypatch):
    """Where the file system has no flock (Lustre without -o flock), or one that does not reach across nodes, two
    builders can run at once: each writes its own temporary folder, the first finished is kept and the other uses
    it, and neither deletes the other's work in progress."""
    import errno
    import fcntl

    from greentext_dist.sources import source_posts

    real_flock = fcntl.flock

    def no_flock(fh, op):
        if op & fcntl.LOCK_UN:
            return real_flock(fh, op)
        raise OSError(errno.ENOLCK, "No locks available")

    warnings = []
    import types

    monkeypatch.setattr(store_mod, "fcntl", types.SimpleNamespace(flock=no_flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB,
                                                                  LOCK_UN=fcntl.LOCK_UN))  # the store's locks only
    monkeypatch.setattr(store_mod.log, "warning", lambda msg, *a, **k: warnings.append(msg))
    cache, other = tmp_path / "cache", {}

    def posts(revision):
        for i, text in enumerate(source_posts(str(corpus), None)):
            if i == 5 and not other:  # another builder starts and finishes while this one is halfway
                other["started"] = True
                other["store"] = store_mod.ensure(str(corpus), "post:auto", TOK, posts, cache, progress=False)
            yield text

    first = store_mod.ensure(str(corpus), "post:auto", TOK, posts, cache, progress=False)
    assert first.path == other["store"].path and first.n_tokens == other["store"].n_tokens == prepare_source(
        str(corpus), None, TOK, tmp_path / "elsewhere", progress=False).n_tokens
    assert len(stores_in(cache)) == 1 and not leftovers(cache)
    assert any("does not support file locks" in w for w in warnings)


def test_a_build_clears_only_abandoned_temporary_folders(corpus, tmp_path):
    """Left by a killed build on this host: removed by the next one. Another node's build in progress (its lock may not
    reach here) or a live process's: kept. Another node's, a day old: removed."""
    import socket
    import time

    cache = tmp_path / "cache"
    folder = prepare_source(str(corpus), None, TOK, tmp_path / "probe", progress=False).path.name  # the store's folder name
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    host = socket.gethostname()
    names = {"killed here": f"{host}-{dead}", "live here": f"{host}-{os.getpid()}", "other node": "node-7.cluster-123",
             "other node, old": "node-8-456"}
    tmps = {k: cache / f".{folder}.tmp-{v}.0123abcd" for k, v in names.items()}
    for t in tmps.values():
        t.mkdir(parents=True)
    day_ago = time.time() - 2 * 86400
    os.utime(tmps["other node, old"], (day_ago, day_ago))
    assert prepare_source(str(corpus), None, TOK, cache, progress=False).path.name == folder
    assert {k for k, t in tmps.items() if t.exists()} == {"live here", "other node"}


def test_end_of_text_written_in_a_post_is_ordinary_text(tmp_path):
    """A post that contains the string "<|endoftext|>" (a web scrape, a post about GPT-2) keeps it as text: the only
    end-of-text tokens in the store are the packer's, one after each post (as nanoGPT prepares data)."""
    posts = [">be me\n>type <|endoftext|> in a post", ">tfw<|endoftext|>", ">normal post"]
    path = tmp_path / "posts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in posts))
    store = prepare_source(str(path), None, TOK, tmp_path / "cache", progress=False)
    eos = TOK.eos_token_id
    for i, text in enumerate(posts):
        ids = store.post(i).tolist()
        assert ids[-1] == eos and eos not in ids[:-1] and TOK.decode(ids[:-1]) == text
    assert TOK.encode("<|endoftext|>") == [eos]  # prompts and the tokenizer itself are left as they were


def test_damaged_store_is_refused_then_rebuilt(corpus, tmp_path, capsys):
    cache = tmp_path / "cache"
    store = prepare_source(str(corpus), None, TOK, cache, progress=False)
    with open(store.path / "tokens.bin", "r+b") as f:
        f.truncate(store.n_tokens)  # half the bytes
    with pytest.raises(UserError, match="is damaged: tokens.bin has .* bytes.*prepare"):
        training_data(data_config(corpus, 32, cache_dir=str(cache)), TOK, 0, progress=False)
    assert run_inprocess(tiny_args(corpus, tmp_path / "out", "--cache-dir", str(cache))) != 0
    err = capsys.readouterr().err
    assert "is damaged" in err and "Traceback" not in err
    p = prepare("--dataset", str(corpus), "--verify", cache=cache)  # prepare rebuilds it
    assert p.returncode == 0 and "damaged: rebuilding" in p.stderr and "verified" in p.stdout
    assert prepare_source(str(corpus), None, TOK, cache, progress=False).n_tokens == store.n_tokens

    (store.path / "meta.json").unlink()  # never finished: rebuilt silently
    assert prepare_source(str(corpus), None, TOK, cache, progress=False).n_tokens == store.n_tokens


@pytest.mark.parametrize("field,value,message", [("format", 0, "has format 0"), ("tokenizer", "0123", "another tokenizer")])
def test_store_of_another_format_or_tokenizer_is_refused(corpus, tmp_path, field, value, message):
    cache = tmp_path / "cache"
    store = prepare_source(str(corpus), None, TOK, cache, progress=False)
    meta = json.loads((store.path / "meta.json").read_text())
    if field == "format":
        meta["format"] = value
    else:
        meta["key"]["tokenizer"] = value
    (store.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=message):
        prepare_source(str(corpus), None, TOK, cache, progress=False)


def test_source_changing_during_the_build_is_refused(tmp_path, monkeypatch):
    import greentext_dist.data as data

    path = write_posts(tmp_path / "p.jsonl", n=50)
    real = data.source_posts

    def changing(*args):
        for i, text in enumerate(real(*args)):
            if i == 10:
                with open(path, "a") as f:
                    f.write(json.dumps({"text": ">written while reading"}) + "\n")
            yield text

    monkeypatch.setattr(data, "source_posts", changing)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="changed while its token store was being built"):
        prepare_source(str(path), None, TOK, cache, progress=False)
    assert stores_in(cache) == [] and not leftovers(cache)
    monkeypatch.undo()
    assert prepare_source(str(path), None, TOK, cache, progress=False).n_posts == 51


@pytest.mark.slow  # two launched prepare processes: kept out of the fast tier
def test_full_disk_leaves_nothing_behind(tmp_path):
    import resource

    data = write_posts(tmp_path / "p.jsonl", n=2000)
    cache = tmp_path / "cache"

    def small_disk():  # files may not grow past 64 KiB: writes fail with EFBIG, as ENOSPC does on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    p = prepare("--dataset", str(data), cache=cache, preexec_fn=small_disk)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "no space left" in p.stderr and "--cache-dir" in p.stderr and "Traceback" not in p.stderr
    assert stores_in(cache) == [] and not leftovers(cache)
    assert prepare("--dataset", str(data), cache=cache).returncode == 0  # with room, the same command works


def test_no_training_posts_after_the_split(tmp_path):
    path = write_posts(tmp_path / "p.jsonl", n=10)
    with pytest.raises(UserError, match="no training posts left.*--val-fraction"):
        training_data(data_config(path, 16, val_fraction=0.9999), TOK, 0, progress=False)
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "  "}\n{"text": ""}\n')
    with pytest.raises(UserError, match="no non-blank posts"):
        training_data(data_config(blank, 16), TOK, 0, progress=False)


def test_hub_store_is_found_offline(corpus, tmp_path):
    """A store prepared where the hub was reachable serves the same hub id on an offline node."""
    cache = tmp_path / "cache"
    store = prepare_source(str(corpus), None, TOK, cache, progress=False)
    meta = json.loads((store.path / "meta.json").read_text())
    meta["key"].update(source="someone/greentext", origin="hub:0123abcd")  # as if prepared from the hub
    (store.path / "meta.json").write_text(json.dumps(meta))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    found = prepare_source("someone/greentext", None, TOK, cache, progress=False)
    assert found.path == store.path and found.n_tokens == store.n_tokens
    with pytest.raises(UserError, match="unreachable.*holds no token store.*prepare --dataset someone/other .*--dataset DIR/"):
        prepare_source("someone/other", None, TOK, cache, progress=False)
    with pytest.raises(UserError, match="prepare --mix someone/other=WEIGHT .*--mix DIR/FILE=WEIGHT"):  # the flag the user gave
        prepare_source("someone/other", None, TOK, cache, progress=False, mix=True)
    with pytest.raises(UserError, match="prepare --val-dataset someone/other .*--val-dataset DIR/"):
        prepare_source("someone/other", None, TOK, cache, progress=False, val=True)


def hub_store(corpus: Path, name: str, cache: Path, tok=TOK):
    """The store of hub dataset `name` at the hub's commit, with the local corpus's posts (as if downloaded)."""
    from greentext_dist.sources import source_posts

    return store_mod.ensure(name, "post:auto", tok, lambda rev: source_posts(str(corpus), None), cache, progress=False)


def test_hub_commit_is_looked_up_once_and_reused(corpus, tmp_path, hub):
    from greentext_dist.data import hub_revisions

    cache = tmp_path / "cache"
    built = hub_store(corpus, "someone/greentext", cache)
    assert json.loads((built.path / "meta.json").read_text())["key"]["origin"] == f"hub:{SHA}"
    d = data_config("someone/greentext", 16, cache_dir=str(cache), mix=[f"{corpus}=0.2", "hellaswag=0.1"])
    hub.requests.clear()
    revisions = hub_revisions(d)
    assert revisions == {"someone/greentext": SHA, "Rowan/hellaswag": SHA}  # a local source has no commit
    assert hub.dataset_lookups() == ["someone/greentext", "Rowan/hellaswag"]
    hub.requests.clear()
    found = prepare_source("someone/greentext", None, TOK, cache, revision=revisions["someone/greentext"], progress=False)
    assert found.path == built.path and hub.dataset_lookups() == []  # a rank handed the commit asks nothing
    assert prepare_source("someone/greentext", None, TOK, cache, progress=False).path == built.path
    assert hub.dataset_lookups() == ["someone/greentext"]
    with pytest.raises(UserError, match="does not exist"):
        hub_revisions(data_config(str(tmp_path / "missing.jsonl"), 16))  # a path, never sent to the hub
    with pytest.raises(UserError, match="cannot look up dataset 'someone/missing' on the Hugging Face hub.*check the id"):
        hub_revisions(data_config("someone/missing", 16))


MEMORY_PROBE = """
import sys, numpy as np
from greentext_dist.config import DataConfig
from greentext_dist.data import DataState, TrainLoader, training_data
from greentext_dist.tokenizer import bundled_gpt2

def anon_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1])

tok = bundled_gpt2()
cfg = DataConfig(dataset=sys.argv[1], seq_len=256, val_fraction=0.05, cache_dir=sys.argv[2])
before = anon_kib()
train, val = training_data(cfg, tok, 0, progress=False)
loader = TrainLoader(train, DataState(), 8, 0, 1, "cpu")
n = 0
while loader.state.epoch == 0:
    n += loader.next_batch()[0].numel()
for i in range(len(val)):
    val[i]
print(anon_kib() - before, n, train.stores[0].tokens.nbytes)
"""


@pytest.mark.slow
def test_rank_memory_does_not_grow_with_corpus_size(tmp_path):
    """Reading a whole epoch holds the tokens in the page cache (memory map), not in the process: its anonymous
    memory grows by a few bytes per post (the epoch's order), not with the tokens."""
    import random

    cache = tmp_path / "cache"
    small = write_posts(tmp_path / "small.jsonl", n=100)
    rng, words = random.Random(0), "be me go outside see a dog cat pizza mfw tfw the bus job boss code rain".split()
    big = tmp_path / "big.jsonl"  # ~10k posts of ~300 tokens, like the real corpus's long posts
    big.write_text("".join(json.dumps({"text": "\n".join(">" + " ".join(rng.choices(words, k=8)) for _ in range(30))}) + "\n"
                           for _ in range(10_000)))
    for path in (small, big):
        prepare_source(str(path), None, TOK, cache, progress=False)
    grew = {}
    for name, path in (("small", small), ("big", big)):
        p = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(cache)], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        grew[name] = [int(x) for x in p.stdout.split()]
    (small_kib, _, _), (big_kib, big_read, big_bytes) = grew["small"], grew["big"]
    assert big_read > 2_500_000 and big_bytes > 5 << 20  # the big corpus was really read, a whole epoch
    extra = (big_kib - small_kib) * 1024
    assert extra < 64 * 10_000, (small_kib, big_kib, big_bytes)  # the epoch's order: under 64 bytes per post ...
    assert extra < big_bytes / 8  # ... far below the tokens, which stay in the memory map


def test_the_removed_shuffle_buffer_is_explained(tmp_path):
    from greentext_dist.config import parse_args

    with pytest.raises(UserError, match="--shuffle-buffer was removed: each epoch is now a full seeded permutation"):
        parse_args(["--shuffle-buffer", "100"])
    old = tmp_path / "old.toml"
    old.write_text("[data]\nshuffle_buffer = 100\n")
    with pytest.raises(UserError, match="'data.shuffle_buffer' was removed.*delete that line"):
        parse_args(["--config", str(old)])


@pytest.mark.slow  # two training runs: kept out of the fast tier (under 2 min)
def test_resuming_after_the_data_changed_warns(corpus, tmp_path, capsys):
    args = ["--max-steps", "4", "--global-batch-size", "4", "--micro-batch-size", "4"]
    assert run_inprocess(tiny_args(corpus, tmp_path / "out", *args, "--halt-at-step", "2")) == 0
    assert run_inprocess(tiny_args(corpus, tmp_path / "same", *args, "--halt-at-step", "2")) == 0
    assert run_inprocess(tiny_args(corpus, tmp_path / "same", *args)) == 0
    assert "the training data changed" not in capsys.readouterr().err
    with open(corpus, "a") as f:
        f.write(json.dumps({"text": ">be me\n>add a post mid-run"}) + "\n")
    assert run_inprocess(tiny_args(corpus, tmp_path / "out", *args)) == 0
    assert "the training data changed since the checkpoint" in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow
def test_ranks_that_see_different_data_stop_before_training(corpus, tmp_path):
    """Each rank keys its stores itself: if the source changes between their looks (rank 1 sees a newer file here),
    every rank stops with one line instead of training on different data."""
    from conftest import launch
    from faults import launch_env

    args = tiny_args(corpus, tmp_path / "out", "--max-steps", "2", "--global-batch-size", "4", "--micro-batch-size", "2",
                     "--cache-dir", str(tmp_path / "cache"))
    p = launch(args, nproc=2, env=launch_env(source_changed_on_rank=1))
    err = " ".join(p.stderr.split())
    assert p.returncode != 0 and "the training data differs between ranks" in err and "rerun it" in err, p.stderr[-3000:]
    assert not [line for line in p.stderr.splitlines() if line.strip().startswith("File ") and "greentext_dist/" in line]  # no traceback of ours
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert run_inprocess(args) == 0  # nothing left behind (a lock, a half-built store) stops the rerun
