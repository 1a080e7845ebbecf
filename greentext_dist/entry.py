"""Console scripts. The Ctrl-C handler goes in before the heavy imports, so an early Ctrl-C is one line too, and the
command line is answered before them (launch.early)."""

import sys


def train() -> None:
    from greentext_dist.launch import early, interrupt_early

    interrupt_early()
    early(sys.argv[1:])
    from greentext_dist.train import run_cli

    run_cli()
