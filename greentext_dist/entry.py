"""Console scripts. The Ctrl-C handler goes in before the heavy imports, so an early Ctrl-C is one line too."""

import os
import signal
import sys


def train() -> None:
    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("error: interrupted outside the training steps; checkpoints on disk "
                                                            "are intact. Fix: rerun the same command to resume\n"), os._exit(130)))
    from greentext_dist.train import run_cli

    run_cli()
