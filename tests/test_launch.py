"""`lightning run model` rests on Lightning Fabric's private command-line group: these tests fail loudly if a
Lightning release changes what the shim (mose_lightning/launch.py) relies on."""

from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mose_lightning"
# The launcher flags the README documents for `lightning run model`.
DOCUMENTED = {"--accelerator", "--strategy", "--devices", "--num-nodes", "--node-rank", "--main-address", "--precision"}


def test_fabric_private_cli_still_has_the_run_command_and_flags_the_shim_hands_over():
    import click
    from lightning.fabric import cli

    assert isinstance(cli._main, click.Group), "lightning.fabric.cli._main is no longer a click group"
    run = cli._main.commands.get("run")
    assert run is not None, "lightning.fabric.cli._main has no `run` command any more"
    options = {opt for param in run.params for opt in param.opts}
    assert DOCUMENTED <= options, f"Fabric's run command lost {sorted(DOCUMENTED - options)}"
    assert [p.name for p in run.params if isinstance(p, click.Argument)] == ["script", "script_args"]


def test_only_the_shim_touches_lightnings_private_cli():
    users = [p.name for p in PACKAGE.rglob("*.py") if "lightning.fabric.cli" in p.read_text()]
    assert users == ["launch.py"]


def test_shim_refuses_anything_but_run_model(capsys):
    from mose_lightning.launch import main

    for argv in ([], ["run"], ["fit", "model", "x.py"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "usage: lightning run model SCRIPT" in capsys.readouterr().err
