"""--mix: other text sources interleaved into the training stream by weight, resumable like one source."""

import itertools
import json
import re

import pytest

from conftest import data_config, run_inprocess, tiny_args, train_losses
from greentext_dist.data import DataState, open_mix_source, parse_mix, training_data
from greentext_dist.errors import UserError
from greentext_dist.tokenizer import bundled_gpt2

TOK = bundled_gpt2()


def write(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t}) + "\n" for t in texts))
    return path


@pytest.fixture
def sources(tmp_path):
    main = write(tmp_path / "main.jsonl", [f">main post {i}" for i in range(600)])
    other = write(tmp_path / "other.jsonl", [f"other post {i}" for i in range(2000)], key="content")
    docs = [{"activity_label": "Cooking", "ctx": f"A man cooks dish {i}. he", "endings": ["sings.", "eats it.", "flies.", "sleeps."], "label": 1}
            for i in range(2000)]
    hs = tmp_path / "hs.jsonl"
    hs.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return main, other, hs


def mixed_data(main, mix, seq_len=64, seed=3):
    return training_data(data_config(main, seq_len, mix=mix), TOK, seed, progress=False)[0]


def epoch_texts(train, e):
    ep = train.epoch(e)
    return [TOK.decode(ep.piece(i)[:-1]) for i in range(len(ep))]


def test_observed_shares_follow_the_weights(sources):
    main, other, hs = sources
    train = mixed_data(main, [f"{other}=0.3", f"{hs}=0.1"])
    texts = epoch_texts(train, 0)
    n = len(texts)
    share = lambda prefix: sum(t.startswith(prefix) for t in texts) / n  # noqa: E731
    assert sorted(t for t in texts if t.startswith(">main")) == sorted(f">main post {i}" for i in range(600))  # an epoch: each --dataset post once
    assert share(">main") == pytest.approx(0.6, abs=0.04)
    assert share("other post") == pytest.approx(0.3, abs=0.04)
    assert share("Cooking:") == pytest.approx(0.1, abs=0.03)
    cooking = [t for t in texts if t.startswith("Cooking:")]
    assert all(re.fullmatch(r"Cooking: A man cooks dish \d+\. he eats it\.", t) for t in cooking)  # HellaSwag schema: context + gold ending
    assert len(set(cooking)) == len(cooking)  # a source bigger than its share: no post twice in an epoch
    assert epoch_texts(train, 1) != texts  # a new epoch, a new interleaving


def test_mixture_resumes_at_the_same_position(sources):
    main, other, _ = sources
    stream = mixed_data(main, [f"{other}=0.3"])
    full = list(itertools.islice(stream.rows(DataState()), 240))  # crosses an epoch
    assert len({s.epoch for _, s in full}) >= 2
    for k in (0, 17, 80, 200):
        resumed = mixed_data(main, [f"{other}=0.3"])  # a new process
        state = DataState.from_dict(json.loads(json.dumps(full[k][1].to_dict())))
        assert [r.tolist() for r, _ in itertools.islice(resumed.rows(state), 240 - k - 1)] == [r.tolist() for r, _ in full[k + 1:]]


def test_bad_mix_specs_are_clear():
    for spec, msg in [(["x"], "NAME_OR_PATH=WEIGHT"), (["x=1.5"], "between 0 and 1"), (["a=0.6", "b=0.5"], "add up to 1.1")]:
        with pytest.raises(UserError, match=msg):
            parse_mix(spec)
    with pytest.raises(UserError, match="unreachable"):  # HF_HUB_OFFLINE=1 in the tests
        open_mix_source("hellaswag", None)


def test_training_with_mix_halts_and_resumes_exactly(sources, tmp_path):
    main, other, _ = sources
    args = ["--mix", f"{other}=0.25", "--max-steps", "6", "--global-batch-size", "4", "--micro-batch-size", "2", "--text-field", "text"]
    assert run_inprocess(tiny_args(main, tmp_path / "straight", *args)) == 0
    assert run_inprocess(tiny_args(main, tmp_path / "halted", *args, "--halt-at-step", "3")) == 0
    assert run_inprocess(tiny_args(main, tmp_path / "halted", *args)) == 0
    assert train_losses(tmp_path / "halted") == pytest.approx(train_losses(tmp_path / "straight"), abs=1e-6)
