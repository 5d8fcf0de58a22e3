"""The `lightning` console script: `lightning run model SCRIPT [--accelerator ...] [--devices N] ...`.

Lightning 2.5.1 removed the `lightning run model` command (its successor is `fabric run`), but users and older
docs still type it. This hands the command over to Lightning Fabric's own launcher, which sets LT_ACCELERATOR /
LT_DEVICES / LT_STRATEGY / LT_NUM_NODES / LT_PRECISION and starts the script under torchrun; the script
(mose_lightning/run.py) maps those variables onto the Trainer.
"""

from __future__ import annotations

import sys
from typing import List, Optional

USAGE = "usage: lightning run model SCRIPT [--accelerator A] [--devices N] [--strategy S] [--num-nodes N] [--precision P] [SCRIPT_ARGS ...]"


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "run" or argv[1] != "model":
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    from lightning.fabric.cli import _main

    _main(args=["run", *argv[2:]], prog_name="lightning run model")


if __name__ == "__main__":
    main()
