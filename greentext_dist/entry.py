"""Console scripts, and what every way of starting training does first: answer `--help`, a mistyped flag or a bad
setting in well under a second (before torch, transformers and the engines load), and start the ranks for `--nproc N`.
The Ctrl-C handler goes in before the heavy imports, so an early Ctrl-C is one line too."""

import os
import signal
import sys


def interrupt_early() -> None:
    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("error: interrupted outside the training steps; checkpoints on disk "
                                                            "are intact. Fix: rerun the same command to resume\n"), os._exit(130)))


def early(argv: list[str]) -> None:
    """Parse the command line before the heavy imports: exit here for --help (0), a bad setting (2, one line) or a
    `--nproc N` launch (the job's code); return when this process should train."""
    from greentext_dist.config import parse_args_with_sources
    from greentext_dist.errors import UserError
    from greentext_dist.launch import launch, split_nproc

    try:
        n, rest = split_nproc(argv)
        parse_args_with_sources(rest)
    except UserError as e:
        from greentext_dist.ui import fail

        fail(str(e))
        sys.stderr.flush()
        os._exit(2)
    if n is not None:
        sys.stdout.flush()
        os._exit(launch(n, rest))


def train() -> None:
    interrupt_early()
    early(sys.argv[1:])
    from greentext_dist.train import run_cli

    run_cli()
