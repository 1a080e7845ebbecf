"""Publish a trained model (OUT/final: weights, tokenizer, model card) to the Hugging Face hub.

    python -m greentext_dist.push OUT/final --repo-id you/gpt2-greentext [--private]
"""

from __future__ import annotations

import argparse
import sys

from greentext_dist.errors import OneLineParser, UserError, first_line
from greentext_dist.hub import hub_offline
from greentext_dist.ui import console, fail


def push(folder: str, repo_id: str, private: bool = False) -> str:
    from pathlib import Path

    from greentext_dist.checkpoint import MANIFEST, verify
    from greentext_dist.model import check_gpt2_dir

    check_gpt2_dir(folder, "folder")
    if (Path(folder) / MANIFEST).is_file() and (problem := verify(Path(folder))):  # never publish a damaged model
        raise UserError(f"{folder} is damaged: {problem}", "push another checkpoint (OUT/checkpoints/step-N or best), or export it again")
    if hub_offline():
        raise UserError("the Hugging Face hub is unreachable from this machine",
                        f"copy {folder} to a machine with network access and run this command there (the folder is self-contained)")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.whoami()
    except Exception:  # noqa: BLE001 - no token, an expired token and a bad endpoint all mean "not logged in" here
        raise UserError("not logged in to the Hugging Face hub", "run `hf auth login` (or set HF_TOKEN) and try again") from None
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # a bare NAME becomes USER/NAME
        # The model is the folder's top-level files: a checkpoint's train_state/ (optimizer, RNG) and what is derived
        # from it (universal/, for resuming on another world size) are for resuming here, not for users of the model.
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="greentext_dist: upload fine-tuned GPT-2",
                                 ignore_patterns=["*/*", MANIFEST, ".*"])
    except HfHubHTTPError as e:
        raise UserError(f"the hub refused the upload to {repo_id}: {first_line(e)}",
                        "check the repo id and that your token may write to it") from None
    return getattr(info, "commit_url", f"https://huggingface.co/{repo_id}")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="greentext_dist.push", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a model folder, e.g. OUT/final")
    p.add_argument("--repo-id", required=True, help="NAME or USER/NAME on the hub")
    p.add_argument("--private", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_or_exit(argv)
    try:
        console.print(f"[green]pushed:[/] {push(a.folder, a.repo_id, a.private)}")
        return 0
    except UserError as e:
        fail(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
