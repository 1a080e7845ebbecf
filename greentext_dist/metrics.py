"""metrics.jsonl (rank 0): one JSON object per line, train and eval lines."""

from __future__ import annotations

import json
from pathlib import Path

from greentext_dist.checkpoint import atomic_write_text


class MetricsLog:
    """Created at its first line (no empty samples.jsonl when nothing is sampled). On resume, the lines after the
    resumed step are dropped (they will be redone); on a fresh start, the file is emptied. Both atomically."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool, trackers=None):
        self.path, self.enabled, self.trackers = path, enabled, trackers
        if not enabled or not path.exists():
            return
        kept = [] if resume_step is None else [json.dumps(r) for r in read_metrics(path) if r.get("step", 0) <= resume_step]
        atomic_write_text(path, "".join(l + "\n" for l in kept))

    def write(self, **record) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.trackers:
                self.trackers.log(record)


def read_metrics(path: Path) -> list[dict]:
    """The records; a line cut short by a killed process is skipped (its step is redone after resume)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
