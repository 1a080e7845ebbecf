"""metrics.jsonl (rank 0): one JSON object per line, train and eval lines."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None, enabled: bool, trackers=None):
        self.path, self.enabled, self.trackers = path, enabled, trackers
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            # Lines after the resumed checkpoint belong to a run that was interrupted; they will be redone.
            kept = [json.dumps(r) for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            path.write_text("".join(l + "\n" for l in kept))

    def write(self, **record) -> None:
        if self.enabled:
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
