"""Rich console output on rank 0: logging, the start summary and the progress bar."""

from __future__ import annotations

import logging
import os
import sys
import time

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True, highlight=False)  # progress, logs, errors
results = Console(highlight=False)  # what a command produces (samples, scores): stdout, so it can be piped
# Written to a file (a SLURM log, CI, a pipe), a line is never wrapped at 80 columns or cut with an ellipsis: paths stay whole.
console.soft_wrap = not console.is_terminal
results.soft_wrap = not results.is_terminal


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    prefix = f"[rank {rank}] " if rank else ""
    if console.is_terminal:
        handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
        handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    else:  # one unwrapped line per message, as RichHandler looks, in files
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)-8s " + prefix + "%(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("datasets", "transformers", "huggingface_hub", "DeepSpeed", "torch.distributed", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # datasets logs a reader's traceback before raising it; we turn those errors into one line ourselves.
    logging.getLogger("datasets.packaged_modules").setLevel(logging.CRITICAL)
    import transformers

    # Not imported here (~1 s): a run whose token store exists never needs `datasets`. The variable is read at its import.
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def print_summary_table(title: str, rows: list[tuple[str, str]]) -> None:
    """The start summary: a table on a terminal; in a file, one unwrapped `key  value` line per row."""
    if console.is_terminal:
        console.print(summary_table(title, rows))
        return
    width = max(len(k) for k, _ in rows)
    console.print(title + "\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows), markup=False)


def summary_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    return table


class LiveProgress:
    """A live bar on a terminal; plain log lines everywhere else (SLURM logs, CI, pipes)."""

    def __init__(self, enabled: bool, *columns):
        self.enabled = enabled
        self.live = enabled and console.is_terminal and not os.environ.get("GREENTEXT_PLAIN_LOG")
        self.progress = Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not self.live)

    def __enter__(self):
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.progress.stop()


class TrainProgress(LiveProgress):
    def __init__(self, total: int, start: int, enabled: bool):
        super().__init__(enabled, TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[stats]}"))
        self.task = self.progress.add_task("train", total=total, completed=start, stats="")

    def update(self, step: int, stats: str | None = None) -> None:
        if not self.enabled:
            return
        if stats is not None:
            self.progress.update(self.task, stats=stats)
            if not self.live:
                console.print(f"step {step}/{self.progress.tasks[0].total}  {stats}")
        self.progress.update(self.task, completed=step)

    def note(self, text: str) -> None:
        if self.enabled:
            console.print(text)


class BuildProgress(LiveProgress):
    """Posts, posts/s, tokens/s and an ETA while a token store is built; a log line every 30 s without a terminal."""

    def __init__(self, total: int | None, enabled: bool):
        super().__init__(enabled, TextColumn("[bold]tokenising"), BarColumn(), TextColumn("{task.completed:,.0f} posts  {task.fields[rate]}"))
        self.task = self.progress.add_task("prepare", total=total, rate="")
        self.t0 = self.last_log = time.perf_counter()
        self.posts = self.tokens = 0

    def advance(self, posts: int, tokens: int) -> None:
        self.posts, self.tokens = self.posts + posts, self.tokens + tokens
        now = time.perf_counter()
        rate = f"{self.posts / (now - self.t0):,.0f} posts/s  {self.tokens / (now - self.t0) / 1e3:,.0f}k tokens/s"
        self.progress.update(self.task, advance=posts, rate=rate)
        if self.enabled and not self.live and now - self.last_log > 30:
            self.last_log = now
            logging.getLogger("greentext_dist").info(f"tokenising: {self.posts:,} posts, {rate}")


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    sys.stderr.flush()
