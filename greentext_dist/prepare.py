"""Tokenise a dataset once into a token store that every later run, rank and node reads (see store.py).

    python -m greentext_dist.prepare --dataset DarwinAnim8or/greentext
    python -m greentext_dist.prepare --dataset posts.jsonl --mix other.jsonl=0.2 --cache-dir /shared/greentext-cache

Training builds a missing store itself; run this on a login node before a SLURM job so the job starts at once, or to
check a store (--verify) or rebuild it (--rebuild). Pass train.py the same --cache-dir (or set GREENTEXT_CACHE).
"""

from __future__ import annotations

import argparse
import logging
import sys

from greentext_dist.config import DataConfig, ModelConfig
from greentext_dist.errors import OneLineParser, UserError
from greentext_dist.ui import fail, results, setup_logging

log = logging.getLogger("greentext_dist")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="greentext_dist.prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d, m = DataConfig(), ModelConfig()
    p.add_argument("--dataset", default=d.dataset,
                   help=f"hub id, local file (.jsonl .json .txt .parquet .csv .arrow) or folder, also a save_to_disk one (default: {d.dataset})")
    p.add_argument("--text-field", default=None, help="column holding the post (default: text, or prompt+completion)")
    p.add_argument("--val-dataset", default=None, help="a separate validation set to prepare as well")
    p.add_argument("--mix", action="append", default=[], metavar="NAME_OR_PATH=WEIGHT", help="a --mix source to prepare as well (repeatable)")
    p.add_argument("--tokenizer", default=m.tokenizer, help=f"tokenizer hub id or local directory (default: {m.tokenizer})")
    p.add_argument("--cache-dir", default=None, help="where stores live (default: $GREENTEXT_CACHE, else ~/.cache/greentext_dist/tokens)")
    p.add_argument("--rebuild", action="store_true", help="tokenise again even if a store exists")
    p.add_argument("--verify", action="store_true", help="also check every file's checksum (reads the whole store)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_or_exit(argv)
    from greentext_dist.data import cache_dir, parse_mix, prepare_source
    from greentext_dist.tokenizer import load_tokenizer

    setup_logging(0)
    try:
        tokenizer = load_tokenizer(a.tokenizer)
        cache = cache_dir(a.cache_dir)
        todo = [(a.dataset, a.text_field, False)] + ([(a.val_dataset, a.text_field, False)] if a.val_dataset else [])
        todo += [(name, None, True) for name, _ in parse_mix(a.mix)]
        for name, field, mix in todo:
            store = prepare_source(name, field, tokenizer, cache, mix=mix, repair=True, rebuild=a.rebuild)
            if a.verify:
                store.verify()
            size = sum(f["bytes"] for f in store.meta["files"].values())
            results.print(f"{name}: {store.n_posts:,} posts, {store.n_tokens:,} tokens, {size / 2**20:,.1f} MiB"
                          f"{', verified' if a.verify else ''} -> {store.path}")
    except UserError as e:
        fail(str(e))
        return 2
    except KeyboardInterrupt:
        fail("interrupted; nothing half-written was kept. Fix: rerun the same command")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
