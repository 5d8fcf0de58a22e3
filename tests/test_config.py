"""Config values that would crash later, far from their key, are refused when the config is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from mose_lightning.config import ConfigError, load_config

TOY = Path(__file__).resolve().parent.parent / "configs" / "experiment" / "toy_mose.yaml"


@pytest.mark.parametrize("override, key", [
    ("trainer.devices=abc", "trainer.devices"),
    ("trainer.devices=0", "trainer.devices"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
    ("trainer.accelerator=gpus", "trainer.accelerator"),
    ("trainer.num_nodes=0", "trainer.num_nodes"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
    ("trainer.val_every_n_steps=0", "trainer.val_every_n_steps"),
    ("trainer.checkpoint_every_n_steps=0", "trainer.checkpoint_every_n_steps"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
    ("trainer.num_threads=-2", "trainer.num_threads"),
    ("optim.warmup_ratio=1.5", "optim.warmup_ratio"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.verify_checksums=sometimes", "data.verify_checksums"),
    ("router_pretrain.epochs=0", "router_pretrain.epochs"),
    ("router_pretrain.holdout_fraction=1", "router_pretrain.holdout_fraction"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens"),
    ("eval.judge.client.max_concurrency=0", "eval.judge.client.max_concurrency"),
    ("eval.judge.client.timeout_s=0", "eval.judge.client.timeout_s"),
    ("annotate.client.max_retries=-1", "annotate.client.max_retries"),
    ("data.synthetic.num_test=-5", "data.synthetic.num_test"),
])
def test_bad_values_are_refused_naming_the_key(override, key):
    # A checked value ("<key>: expected ...") or a Literal field ("key `<key>`: Invalid value ..., expected one of").
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}`?: .*expected"):
        load_config(TOY, [override])


@pytest.mark.parametrize("devices", ["auto", "1", "2", "-1", "0,1", "[0,1]"])
def test_devices_lightning_accepts_are_accepted(devices):
    assert load_config(TOY, [f"trainer.devices='{devices}'"]).trainer.devices == devices


@pytest.mark.parametrize("command", [["sft", "--config", str(TOY)], ["demo"], ["reproduce-toy"]])
def test_the_command_line_prints_a_config_error_as_one_line(capsys, command):
    from mose_lightning import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "trainer.devices=abc"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and "trainer.devices: expected" in err and "'abc'" in err


def test_a_saved_config_with_retired_keys_loads_and_a_value_they_never_had_is_an_error(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("moe:\n  group_size: 2\n  num_experts: 6\noptim:\n  name: adamw\n")
    cfg = load_config(path)
    assert cfg.moe.num_experts == 6 and not hasattr(cfg.moe, "group_size") and not hasattr(cfg.optim, "name")
    path.write_text("optim:\n  name: sgd\n")
    with pytest.raises(ConfigError, match=r"optim\.name: no longer a setting \(always 'adamw'\), got 'sgd'"):
        load_config(path)
