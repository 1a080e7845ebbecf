"""Regenerate the outputs README.md and docs/evaluation.md show, from the commands they show, so they cannot go stale:
the demo's samples (scripts/demo.sh's training and sampling), and the demo model's val-loss and robustness results.

    python scripts/doc_outputs.py            # run the commands, rewrite the pages' output blocks
    python scripts/doc_outputs.py --check    # run them, exit 1 naming each block that no longer matches (tests/test_docs.py)

~3 min on 2 CPU cores. The HellaSwag line is a measurement on the 10,042 validation items, which are not in the repo:
it is kept as measured, with its date.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the clone's package, installed or not
README, EVALUATION = ROOT / "README.md", ROOT / "docs" / "evaluation.md"


def demo_commands(out: Path) -> tuple[list[str], list[str]]:
    """scripts/demo.sh's training and sampling commands, as it runs them (its text is the one source)."""
    text = (ROOT / "scripts" / "demo.sh").read_text().replace("\\\n", " ")
    values = {"$PY": sys.executable, '"$OUT"': str(out), "$OUT": str(out), '"${DEMO_STEPS:-200}"': "200"}

    def command(module: str) -> list[str]:
        line = next(l for l in text.splitlines() if f"-m greentext_dist.{module}" in l)
        for k, v in values.items():
            line = line.replace(k, v)
        return shlex.split(line.replace('"' + sys.executable + '"', sys.executable))

    return command("train"), command("generate")


def run(cmd: list[str], env: dict | None = None) -> str:
    # scripts/demo.sh's two threads (the test suite runs everything else on one): the outputs follow from the exact sums
    env = {**(env or os.environ), "OMP_NUM_THREADS": "2"}
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return p.stdout


def shown_command(page: Path, task: str) -> list[str]:
    """The evaluate command a page shows for `task` (a console block's `$ ` line and its continuation)."""
    text = page.read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if l.startswith("$ python -m greentext_dist.evaluate") and f"--task {task}" in l)
    return shlex.split(line[2:], comments=True)


def outputs(work: Path) -> dict[str, str]:
    """name -> the text a page's block must hold."""
    out = work / "demo"
    train, generate = demo_commands(out)
    run(train)
    env = {**os.environ, "COLUMNS": "64"}  # the width the README's sample rules were printed at
    samples = run(generate, env=env).splitlines()
    third = next(i for i, l in enumerate(samples) if "sample 3" in l)
    got = {"samples": "\n".join(samples[:third] + ["..."])}

    def evaluate(task: str) -> list[str]:
        cmd = [sys.executable, *shown_command(EVALUATION, task)[1:]]
        return [a.replace("runs/demo", str(out)) for a in cmd]

    result = json.loads(run(evaluate("val-loss")))
    got["val-loss"] = (f'{{"task": "val-loss", "val_loss": {result["val_loss"]:.4f}, "perplexity": {result["perplexity"]:.3f}, '
                       f'"tokens": {result["tokens"]}, "seq_len": {result["seq_len"]}, ...}}')
    run(evaluate("robustness"))
    report = json.loads((out / "robustness.json").read_text())
    from greentext_dist.evaluate import robustness_markdown

    table = [l for l in robustness_markdown(report, "x").splitlines() if re.match(r"\| (prompts|greentext|deviation) ", l)]
    got["robustness"] = "\n".join(table)
    deviation = next(s for s in report["samples"] if s["kind"] == "deviation")
    got["deviation"] = "\n".join(deviation["text"].split("\n")[:4])
    return got


def blocks(text: str) -> dict[str, tuple[int, int]]:
    """name -> (start, end) of each regenerated block in a page's text."""
    found = {}
    if m := re.search(r"yours will match for the\s+same seed[^`]*?\):\n\n```\n(.*?)\n```", text, re.S):
        found["samples"] = m.span(1)
    if m := re.search(r"^(\{\"task\": \"val-loss\".*)$", text, re.M):
        found["val-loss"] = m.span(1)
    if m := re.search(r"^(\| prompts .*\n\| greentext .*\n\| deviation .*)$", text, re.M):
        found["robustness"] = m.span(1)
    if m := re.search(r"A deviation sample from that report.*?\n\n```\n(.*?)\n```", text, re.S):
        found["deviation"] = m.span(1)
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare instead of rewriting; exit 1 if a page is stale")
    p.add_argument("--work", type=Path, default=None, help="where the demo model goes (default: a temporary folder)")
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="doc-outputs-"))
    got = outputs(work)
    stale = []
    for page, names in ((README, ["samples"]), (EVALUATION, ["val-loss", "robustness", "deviation"])):
        text = page.read_text()
        spans = blocks(text)
        missing = [n for n in names if n not in spans]
        if missing:
            sys.exit(f"{page.relative_to(ROOT)} has no block for {missing}: the page's layout changed; update scripts/doc_outputs.py")
        for name in sorted(names, key=lambda n: -spans[n][0]):  # from the end, so earlier spans stay valid
            start, end = spans[name]
            if text[start:end] != got[name]:
                stale.append(f"{page.relative_to(ROOT)} [{name}]:\n  shows:  {text[start:end]!r}\n  prints: {got[name]!r}")
                text = text[:start] + got[name] + text[end:]
        if not a.check:
            page.write_text(text)
    if stale and a.check:
        print("stale (run python scripts/doc_outputs.py to rewrite):\n" + "\n".join(stale))
        return 1
    print("\n".join(stale) if stale else "every shown output matches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
