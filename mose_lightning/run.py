"""Run script for launchers: `lightning run model mose_lightning/run.py stage=sft config=FILE key=value ...`
(or `fabric run mose_lightning/run.py ...`, or plain `python mose_lightning/run.py ...`).

The launcher's LT_* variables become trainer overrides (command-line `key=value` pairs still win), so the Trainer
asks for exactly the processes torchrun started.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

LAUNCHER_VARIABLES = {
    "LT_ACCELERATOR": "trainer.accelerator",
    "LT_DEVICES": "trainer.devices",
    "LT_STRATEGY": "trainer.strategy",
    "LT_NUM_NODES": "trainer.num_nodes",
    "LT_PRECISION": "trainer.precision",
}
PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}


def launcher_overrides(environ=os.environ) -> List[str]:
    out = []
    for variable, key in LAUNCHER_VARIABLES.items():
        value = environ.get(variable)
        if value:
            if variable == "LT_PRECISION":
                value = PRECISION_ALIASES.get(value, value)
            out.append(f"{key}={value}")
    return out


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage, config, overrides = None, None, []
    for arg in argv:
        if arg.startswith("stage="):
            stage = arg.split("=", 1)[1]
        elif arg.startswith("config="):
            config = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    if stage is None or config is None:
        print("usage: run.py stage=pretrain-router|sft|expert-group|eval config=FILE [key=value ...]", file=sys.stderr)
        raise SystemExit(2)
    from mose_lightning.cli import _take_debug_flag, errors_as_one_line, run_stage_command

    overrides, debug = _take_debug_flag(overrides)
    with errors_as_one_line(debug):
        run_stage_command(stage.replace("_", "-"), config, launcher_overrides() + overrides)


if __name__ == "__main__":
    main()
