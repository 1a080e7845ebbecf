"""Experiment tracking (--report-to): the metrics.jsonl lines also go to TensorBoard and/or Weights & Biases,
from rank 0 only, with the resolved config as the run's hyper-parameters."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from greentext_dist.errors import UserError, first_line

log = logging.getLogger(__name__)
KINDS = ("tensorboard", "wandb")


def parse_report_to(value: str) -> list[str]:
    kinds = [k.strip() for k in value.split(",") if k.strip() and k.strip() != "none"]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UserError(f"--report-to {value}: unknown tracker {', '.join(unknown)}", f"use none or a comma list of {', '.join(KINDS)}")
    return kinds


class TensorBoard:
    def __init__(self, out: Path, config_text: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--report-to tensorboard needs the tensorboard package", "pip install tensorboard (or drop --report-to tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "```\n" + config_text + "\n```", 0)

    def log(self, metrics: dict, step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """Online when W&B credentials are set up (WANDB_API_KEY or WANDB_MODE=online), else offline into OUT/wandb
    (`wandb sync` uploads it later). One W&B run per output dir: a resumed run continues it."""

    def __init__(self, out: Path, config: dict, name: str):
        try:
            import wandb
        except ImportError:
            raise UserError("--report-to wandb needs the wandb package", "pip install wandb (or drop --report-to wandb)") from None
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "greentext_dist"), name=name, id=run_id, resume="allow",
                                  dir=str(out), config=config, mode=mode)
        except Exception as e:  # noqa: BLE001 - wandb raises many kinds (auth, network, usage)
            raise UserError(f"wandb could not start a {mode} run: {first_line(e)}",
                            "check `wandb login` / WANDB_API_KEY, or set WANDB_MODE=offline and `wandb sync` later") from None
        if mode == "offline":
            log.info(f"wandb: offline run in {out / 'wandb'}; upload it later with `wandb sync {out / 'wandb'}/offline-run-*`")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers of this run (none on ranks other than 0). `log` takes one metrics.jsonl record."""

    def __init__(self, kinds: list[str], out: Path, config: dict, config_text: str, enabled: bool):
        self.backends = []
        if enabled:
            for kind in kinds:
                self.backends.append(TensorBoard(out, config_text) if kind == "tensorboard" else WandB(out, config, out.name))

    def log(self, record: dict) -> None:
        numbers = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers and "step" in record:
            for b in self.backends:
                b.log(numbers, record["step"])

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []
