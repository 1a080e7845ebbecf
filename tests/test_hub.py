"""Models and tokenizers from the hub (a local stand-in, tests/fakehub.py): downloaded once per job at one commit,
served from the HF cache offline, and refused with one line when they cannot be used."""

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import launch, run_inprocess, tiny_args, train_losses
from fakehub import SHA
from greentext_dist.errors import UserError
from greentext_dist.hub import download
from greentext_dist.tokenizer import bundled_gpt2

REPO = "someone/tiny-gpt2"


def model_repo(folder: Path) -> Path:
    """What a GPT-2 repo on the hub holds that we read, plus a pickled copy of the weights we must never fetch."""
    from greentext_dist.config import ModelConfig
    from greentext_dist.model import build_model

    build_model(ModelConfig(model="tiny", init="scratch", dropout=0.0), seed=3).save_pretrained(folder, max_shard_size="5MB")
    bundled_gpt2().save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"a pickle: never downloaded")
    return folder


def go_offline(monkeypatch):
    import huggingface_hub.constants as hf_constants

    from greentext_dist.hub import hub_offline

    import datasets.config as ds_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(ds_config, "HF_HUB_OFFLINE", True)
    hub_offline.cache_clear()


def test_a_hub_model_is_downloaded_once_and_then_served_from_the_cache(corpus, tmp_path, hub, monkeypatch):
    from greentext_dist.generate import load

    hub.models[REPO] = model_repo(tmp_path / "repo")
    folder = Path(download(REPO))
    assert folder.name == SHA and not (folder / "pytorch_model.bin").exists()
    assert len(hub.asked(r"/api/models/.*/revision/main")) == 1  # the commit, asked once
    fetched = hub.asked(r"/someone/tiny-gpt2/resolve/.*")
    assert fetched and all(hub.requests.count(("GET", p)) == 1 for p in fetched)
    hub.requests.clear()
    assert download(REPO, revision=SHA) == str(folder) and hub.requests == []  # a pinned commit in the cache: no request

    local, _ = load(str(tmp_path / "repo"), "cpu")
    model, tok = load(REPO, "cpu")  # generate and evaluate take a hub id
    x = torch.tensor([tok.encode(">be me\n>hub")])
    assert torch.equal(model(input_ids=x).logits, local(input_ids=x).logits)
    from greentext_dist.evaluate import main as evaluate

    assert evaluate([REPO, "--task", "val-loss", "--dataset", str(corpus), "--seq-len", "32", "--output", str(tmp_path / "v.json")]) == 0
    assert json.loads((tmp_path / "v.json").read_text())["checkpoint"] == REPO
    assert not hub.asked(r"/someone/tiny-gpt2/resolve/.*")  # the files came from the cache
    hub.requests.clear()

    go_offline(monkeypatch)  # an offline node reads the cache, and says what to do when it lacks the repo
    assert download(REPO) == str(folder) and hub.requests == []
    with pytest.raises(UserError, match="'someone/other' is not cached and the Hugging Face hub is unreachable.*hf download"):
        download("someone/other")


def test_hub_repos_that_cannot_be_used_are_one_line(tmp_path, hub):
    hub.models["someone/pickled"] = pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (pickled / "pytorch_model.bin").write_bytes(b"a pickle")
    with pytest.raises(UserError, match="'someone/pickled' has no .safetensors weights.*safe_serialization=True"):
        download("someone/pickled")
    with pytest.raises(UserError, match="cannot download model 'someone/missing' from the Hugging Face hub.*check the id"):
        download("someone/missing")
    with pytest.raises(UserError, match=r"model \./runs/x/final does not exist.*check the path"):
        download("./runs/x/final")  # a mistyped path is never sent to the hub
    assert not hub.asked(r".*runs/x/final.*")


@pytest.mark.slow
def test_training_from_a_hub_id_equals_training_from_the_same_local_folder(corpus, tmp_path, hub):
    repo = hub.models[REPO] = model_repo(tmp_path / "repo")
    common = ("--max-steps", "3", "--global-batch-size", "4", "--micro-batch-size", "2", "--eval-every", "0")
    assert run_inprocess(tiny_args(corpus, tmp_path / "local", "--model-path", str(repo), "--tokenizer", str(repo), *common)) == 0
    hub_run = tiny_args(corpus, tmp_path / "hub", "--model-path", REPO, "--tokenizer", REPO, *common)
    assert run_inprocess(hub_run + ["--halt-at-step", "2"]) == 0
    hub.requests.clear()
    assert run_inprocess(hub_run) == 0  # the resume reads the checkpoint: the weights are not fetched again
    assert not hub.asked(r"/someone/tiny-gpt2/resolve/.*(safetensors|config.json)")
    assert train_losses(tmp_path / "hub") == train_losses(tmp_path / "local")
    assert REPO in (tmp_path / "hub" / "final" / "README.md").read_text()  # the model card names the base model


@pytest.mark.slow
def test_ranks_share_one_hub_download(corpus, tmp_path, hub):
    """Every rank needs the pretrained weights, the tokenizer and the hub dataset's commit (to find its token store):
    rank 0 downloads or asks once and pins the commit, the other rank takes that commit from the cache. Hundreds of
    ranks asking the hub at once would be rate-limited, and could each see a different commit."""
    from greentext_dist import store
    from greentext_dist.sources import source_posts

    hub.models[REPO] = model_repo(tmp_path / "repo")
    tokens = tmp_path / "tokens"  # the hub dataset's store at the hub's commit, with the local corpus's posts (as if downloaded)
    store.ensure("someone/greentext", "post:auto", bundled_gpt2(), lambda rev: source_posts(str(corpus), None), tokens, progress=False)
    hub.requests.clear()
    args = tiny_args("someone/greentext", tmp_path / "out", "--model-path", REPO, "--tokenizer", REPO, "--max-steps", "2",
                     "--global-batch-size", "4", "--micro-batch-size", "2")
    p = launch(args, nproc=2, env={**hub.env, "GREENTEXT_CACHE": str(tokens)})
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(hub.asked(r"/api/models/someone/tiny-gpt2/revision/main")) == 2  # rank 0 only: the weights and the tokenizer
    assert hub.dataset_lookups() == ["someone/greentext"]
    fetched = hub.asked(r"/someone/tiny-gpt2/resolve/.*")
    assert fetched and all(hub.requests.count(("GET", p)) == 1 for p in fetched), hub.requests
    assert os.path.isdir(tmp_path / "out" / "final")


def test_push_publishes_a_model_that_loads_back(corpus, tmp_path, hub):
    """push uploads OUT/final (weights, tokenizer, model card) and nothing that is only for resuming here; what it
    uploaded downloads as the same model."""
    from greentext_dist import push
    from greentext_dist.checkpoint import step_dirs
    from greentext_dist.generate import load

    out = tmp_path / "run"
    assert run_inprocess(tiny_args(corpus, out, "--max-steps", "2", "--global-batch-size", "4", "--micro-batch-size", "2")) == 0
    assert push.main([str(out / "final"), "--repo-id", "greentext"]) == 0  # a bare name goes to the user's namespace
    published = sorted(p.name for p in hub.models["me/greentext"].iterdir())
    assert published == sorted(p.name for p in (out / "final").iterdir() if p.name != "manifest.json") and "README.md" in published
    x = torch.tensor([[15496, 995, 50256, 29, 1350]])
    theirs, mine = load("me/greentext", "cpu")[0], load(str(out / "final"), "cpu")[0]
    assert torch.equal(theirs(input_ids=x).logits, mine(input_ids=x).logits)

    step = step_dirs(out / "checkpoints")[-1][1]
    (step / "universal" / "zero").mkdir(parents=True)  # as a DeepSpeed checkpoint resumed on another world size has
    (step / "universal" / "zero" / "optimizer_state.pt").write_bytes(b"state")
    assert push.main([str(step), "--repo-id", "me/greentext-step"]) == 0
    published = {p.name for p in hub.models["me/greentext-step"].iterdir()}
    assert "train_state" not in published and "universal" not in published  # optimizer state stays home


def test_a_hub_dataset_streams_into_a_store_that_offline_nodes_reuse(tmp_path, hub, monkeypatch):
    """The default path of a first run: --dataset is a hub id. `prepare` streams it from the hub (where the login
    node has the network) into a token store; an offline compute node then trains from that store without asking
    the hub anything, on exactly the posts of the same data read from a local file."""
    from conftest import write_posts
    from greentext_dist.prepare import main as prepare

    repo = tmp_path / "dataset-repo"
    repo.mkdir()
    posts = write_posts(repo / "greentexts.jsonl")
    hub.datasets["someone/greentext"] = repo
    cache = tmp_path / "tokens"
    assert prepare(["--dataset", "someone/greentext", "--cache-dir", str(cache)]) == 0
    (meta,) = [json.loads(p.read_text()) for p in cache.glob("*/meta.json")]
    assert meta["key"]["origin"] == f"hub:{SHA}" and meta["posts"] == 60
    assert hub.asked(r"/datasets/someone/greentext/resolve/.*/greentexts.jsonl")  # streamed from the hub

    go_offline(monkeypatch)
    hub.requests.clear()
    common = ("--max-steps", "2", "--global-batch-size", "4", "--micro-batch-size", "2", "--eval-every", "0", "--cache-dir", str(cache))
    assert run_inprocess(tiny_args("someone/greentext", tmp_path / "offline", *common)) == 0
    assert hub.requests == []
    assert run_inprocess(tiny_args(posts, tmp_path / "local", *common)) == 0
    assert train_losses(tmp_path / "offline") == train_losses(tmp_path / "local")
