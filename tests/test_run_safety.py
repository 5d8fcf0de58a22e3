"""What a team sharing machines relies on: one run per folder (locks between real processes), nothing scored on
part of the data without saying so, skipped samples listed, a kill during the final save recovered, evaluation of a
saved model without preparation it does not use, outputs that follow the umask, a refused run stopped before torch
loads.

Runs are the dense toy (configs/experiment/toy_sft.yaml: no routers to pretrain) on the shared synthetic set of
conftest.py, two optimiser steps each; concurrent runs are real `mose` processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path
from typing import List

import pytest

from mose_lightning import cli, locks
from mose_lightning.data.sample import Sample
from mose_lightning.data.shards import ShardWriter, iter_samples, read_manifest

PROJECT = Path(__file__).resolve().parent.parent
DENSE = PROJECT / "configs" / "experiment" / "toy_sft.yaml"
MOSE = str(Path(sys.executable).parent / "mose")
TIMEOUT = 300


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(args: List[str], timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=PROJECT, env=_env(), capture_output=True, text=True, timeout=timeout)


def start(args: List[str], log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    proc = subprocess.Popen(args, cwd=PROJECT, env=_env(), stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)
    handle.close()
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_until_holding(folder: Path, proc: subprocess.Popen, log: Path, then: str = "",
                       deadline_s: float = TIMEOUT) -> None:
    """Until `proc` holds `folder`'s lock (its PID in the lock file) and has written `folder/then`; fails if it
    ends first."""
    lock = folder / locks.LOCK_NAME
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the first process ended before it held {folder}:\n{log.read_text()[-4000:]}")
        try:
            if json.loads(lock.read_text()).get("pid") == proc.pid and (not then or (folder / then).is_file()):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    pytest.fail(f"no lock on {folder} after {deadline_s} s:\n{log.read_text()[-4000:]}")


def dense_overrides(synthetic_dir: Path, toy_dir: Path, run_dir: Path, *extra: str) -> List[str]:
    return [f"backbone.toy_dir={toy_dir}", "backbone.init_checkpoint=null",
            f"data.train_shards={synthetic_dir / 'train'}", f"data.val_shards={synthetic_dir / 'val'}",
            f"data.test_shards={synthetic_dir / 'test'}", "data.batch_size=4", "data.eval_batch_size=8",
            "data.num_workers=0", "data.shuffle_buffer=8", "trainer.log_every_n_steps=1", "trainer.max_steps=2",
            "trainer.val_every_n_steps=2", "trainer.checkpoint_every_n_steps=2", "trainer.limit_val_batches=1",
            f"run_dir={run_dir}", *extra]


def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


UMASK = 0o002  # group-writable: distinguishes "follows the umask" from a fixed 0644


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_dir, toy_dir):
    """A dense toy SFT run of two steps, made in this process under umask 002."""
    run_dir = tmp_path_factory.mktemp("safety") / "sft"
    old = os.umask(UMASK)
    try:
        cli.main(["sft", "--config", str(DENSE), *dense_overrides(synthetic_dir, toy_dir, run_dir)])
    finally:
        os.umask(old)
    return run_dir


# ---- locks -------------------------------------------------------------------------------------------------------
def test_two_converters_into_one_folder_the_second_refuses_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    out = tmp_path / "syn"
    log = tmp_path / "first.log"
    # Far more samples than can be drawn before the second command is done: the two overlap for sure.
    first = start([MOSE, "data", "synthetic", "--out", str(out), "--num", "100000", "--maxcount", "50"], log)
    try:
        wait_until_holding(out, first, log)
        second = run([MOSE, "data", "synthetic", "--out", str(out), "--num", "8", "--seed", "1"])
        assert first.poll() is None, "the first converter ended: the runs did not overlap"
    finally:
        stop(first)
    assert second.returncode == 2, second.stderr
    assert second.stderr.count("\n") == 1 and second.stderr.startswith(f"error: {out} is in use by PID {first.pid} ")
    assert "mose data synthetic" in second.stderr and not (out / "train" / "manifest.json").exists()
    # The killed converter left its lock file (its flock died with it): the next run takes over and finishes.
    assert (out / locks.LOCK_NAME).exists()
    cli.main(["data", "synthetic", "--out", str(out), "--num", "8", "--seed", "1"])
    assert f"taking over the lock left by PID {first.pid}" in capsys.readouterr().err
    assert not (out / locks.LOCK_NAME).exists()
    for split, n in (("train", 8), ("val", 1), ("test", 1)):
        manifest = read_manifest(out / split)
        assert manifest["num_samples"] == n and sum(1 for _ in iter_samples(str(out / split))) == n


@pytest.mark.slow
def test_two_runs_in_one_run_dir_the_second_refuses(tmp_path, synthetic_dir, toy_dir, capsys):
    run_dir = tmp_path / "sft"
    log = tmp_path / "first.log"
    args = [MOSE, "sft", "--config", str(DENSE), *dense_overrides(synthetic_dir, toy_dir, run_dir)]
    first = start(args + ["trainer.max_steps=100000", "trainer.val_every_n_steps=100000", "seed=1"], log)
    try:
        wait_until_holding(run_dir, first, log, then="config.yaml")
        config_before = (run_dir / "config.yaml").read_text()
        second = run(args + ["seed=2"])
        assert first.poll() is None, "the first run ended: the runs did not overlap"
    finally:
        stop(first)
    assert second.returncode == 2, second.stderr[-3000:]
    error = second.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {run_dir} is in use by PID {first.pid} (mose sft")
    assert "run_dir=" in error
    assert (run_dir / "config.yaml").read_text() == config_before  # the refused run wrote nothing
    assert not (run_dir / "metrics.json").exists()
    cli.main(args[1:])
    assert f"taking over the lock left by PID {first.pid}" in capsys.readouterr().err
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] >= 2


def test_ranks_other_than_zero_share_the_run_dir_lock(tmp_path, monkeypatch):
    """Rank 0 of a launch holds the run directory; ranks 1.. (torchrun's RANK, Lightning's LOCAL_RANK/NODE_RANK)
    go on without refusing, while a separate run (rank 0 of its own launch) is refused."""
    from mose_lightning.training import lock_run_dir

    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from mose_lightning import locks
        locks.acquire({str(run_dir)!r}, "mose sft")
        print("held", flush=True)
        time.sleep(120)
    """)], cwd=PROJECT, env=_env(), stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(locks.FolderBusy, match=f"in use by PID {holder.pid}"):
            lock_run_dir(run_dir, "sft")
        for env in ({"RANK": "1"}, {"LOCAL_RANK": "1"}, {"NODE_RANK": "1", "LOCAL_RANK": "0"}, {"SLURM_PROCID": "3"}):
            with monkeypatch.context() as m:
                for key, value in env.items():
                    m.setenv(key, value)
                assert locks.launcher_rank() != 0
                lock_run_dir(run_dir, "sft")  # no FolderBusy
        assert locks.launcher_rank() == 0
    finally:
        stop(holder)


def test_a_refused_stage_command_stops_before_importing_torch(tmp_path):
    """The lock is taken before any preparation: a run directory in use is reported without torch, Lightning or the
    toy pipeline having been imported (the seconds-not-minutes promise of the command line)."""
    run_dir = tmp_path / "run"
    locks.acquire(run_dir, "mose sft")
    try:
        probe = textwrap.dedent(f"""
            import sys
            from mose_lightning import cli, locks
            take = locks.lock_run_dir
            def lock_run_dir(run_dir, stage):
                loaded = [m for m in ("torch", "lightning", "mose_lightning.pipeline") if m in sys.modules]
                print("loaded before the lock:", loaded, flush=True)
                take(run_dir, stage)
            locks.lock_run_dir = lock_run_dir
            cli.main(["sft", "--config", {str(DENSE)!r}, "run_dir={run_dir}"])
        """)
        result = run([sys.executable, "-c", probe])
    finally:
        locks.release(run_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "loaded before the lock: []" in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {run_dir} is in use by PID {os.getpid()}")


# ---- evaluation counts what it scored ----------------------------------------------------------------------------
def _cut_shard(shard: Path, keep: int) -> None:
    """Cut a shard at the 512-byte record boundary where the member after its first `keep` samples starts."""
    with tarfile.open(shard) as tar:
        end = tar.getmembers()[2 * keep].offset
    data = shard.read_bytes()[:end]
    shard.chmod(0o644)
    shard.write_bytes(data)


def _eval(trained: Path, synthetic_dir: Path, toy_dir: Path, run_dir: Path, test_shards: Path, *extra: str):
    # backbone.init_checkpoint names a folder that does not exist: evaluating a saved model must not need (or make) it.
    args = ["eval", "--config", str(DENSE), *dense_overrides(synthetic_dir, toy_dir, run_dir),
            f"backbone.init_checkpoint={run_dir.parent / 'never' / 'model'}", f"checkpoint={trained}",
            f"data.test_shards={test_shards}", "eval.limit=0", "eval.max_new_tokens=2", "eval.html_samples=2", *extra]
    cli.main(args)


def test_eval_of_a_shard_cut_at_a_record_boundary_fails_then_is_recorded_as_partial(
        trained, synthetic_dir, toy_dir, tmp_path, capsys):
    test = tmp_path / "test"
    shutil.copytree(synthetic_dir / "test", test)
    shards = sorted(test.glob("*.tar"))
    assert len(shards) == 2 and read_manifest(test)["num_samples"] == 16
    _cut_shard(shards[1], 5)
    run_dir = tmp_path / "eval"
    # Evaluation checks the sha256 by default: the cut shard is not read at all.
    with pytest.raises(SystemExit) as exit_info:
        _eval(trained, synthetic_dir, toy_dir, run_dir, test)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert err.startswith("error: evaluation scored 8 of the 16 samples the manifests of data.test_shards list")
    assert f"damaged shard(s) {shards[1].name} (8 samples lost)" in err and "eval.allow_partial=true" in err
    assert not (run_dir / "scores.json").exists()
    assert len(read_jsonl(run_dir / "predictions.jsonl")) == 8
    assert not (run_dir.parent / "never").exists()
    # Without the checksum the count still tells: the shard holds 5 of its 8 samples.
    with pytest.raises(SystemExit):
        _eval(trained, synthetic_dir, toy_dir, run_dir, test, "data.verify_checksums=never")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: evaluation scored 13 of the 16 samples")
    assert f"{shards[1].name} (3 samples lost)" in err

    _eval(trained, synthetic_dir, toy_dir, run_dir, test, "eval.allow_partial=true", "data.verify_checksums=never")
    meta = json.loads((run_dir / "scores.json").read_text())["meta"]
    assert (meta["n_samples"], meta["n_expected"]) == (13, 16)
    partial = meta["partial"]
    assert (partial["expected"], partial["scored"], partial["missing"]) == (16, 13, 3)
    assert [(Path(d["shard"]).name, d["samples_lost"]) for d in partial["damaged_shards"]] == [(shards[1].name, 3)]
    results = (run_dir / "results.md").read_text()
    assert "**Partial evaluation: 13 of 16 samples scored**" in results and shards[1].name in results
    (skipped,) = read_jsonl(run_dir / "skipped.jsonl")
    assert (skipped["reason"], Path(skipped["shard"]).name, skipped["key"], skipped["samples"]) == (
        "damaged shard", shards[1].name, None, 3)


def _with_broken_images(source: Path, out: Path, broken: int) -> List[str]:
    """A copy of a shard directory (same shard layout) whose first `broken` samples have undecodable images."""
    samples = list(iter_samples(str(source)))
    keys = [s.key for s in samples[:broken]]
    with ShardWriter(out, prefix="test", maxcount=8) as writer:
        for s in samples:
            if s.key in keys:
                s = Sample(**{**s.__dict__, "images": [b"\xff\xd8\xff\xe0 not a jpeg"]})
            writer.write(s)
    return keys


def test_eval_with_undecodable_images_names_the_samples(trained, synthetic_dir, toy_dir, tmp_path, capsys):
    test = tmp_path / "test"
    keys = _with_broken_images(synthetic_dir / "test", test, 2)
    run_dir = tmp_path / "eval"
    with pytest.raises(SystemExit):
        _eval(trained, synthetic_dir, toy_dir, run_dir, test)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: evaluation scored 14 of the 16 samples") and all(k in err for k in keys)
    _eval(trained, synthetic_dir, toy_dir, run_dir, test, "eval.allow_partial=true")
    out = capsys.readouterr().out
    assert "skipped 2 sample(s): undecodable 2" in out
    partial = json.loads((run_dir / "scores.json").read_text())["meta"]["partial"]
    assert partial["missing_keys"] == {"undecodable": sorted(keys)} and partial["skipped"] == {"undecodable": 2}
    listed = read_jsonl(run_dir / "skipped.jsonl")
    assert sorted((r["reason"], r["key"]) for r in listed) == [("undecodable", k) for k in sorted(keys)]
    assert all(Path(r["shard"]).parent == test for r in listed)
    assert all(k in (run_dir / "results.md").read_text() for k in keys)


def test_complete_eval_is_not_partial(trained, synthetic_dir, toy_dir, tmp_path):
    run_dir = tmp_path / "eval"
    _eval(trained, synthetic_dir, toy_dir, run_dir, synthetic_dir / "test")
    meta = json.loads((run_dir / "scores.json").read_text())["meta"]
    assert (meta["n_samples"], meta["n_expected"]) == (16, 16) and "partial" not in meta
    assert not (run_dir / "skipped.jsonl").exists() and "Partial" not in (run_dir / "results.md").read_text()


def test_eval_of_a_saved_model_prepares_no_toy_backbone(trained, make_config, monkeypatch, tmp_path):
    """The eval config's backbone.init_checkpoint is missing: the toy pipeline would instruction-tune it (minutes),
    though the saved model is rebuilt from its own config."""
    from mose_lightning import pipeline
    from mose_lightning.stages import router_pretrain, sft

    def no_training(*args, **kwargs):
        raise AssertionError("evaluating a saved model started a training run")

    monkeypatch.setattr(sft, "run_sft", no_training)
    monkeypatch.setattr(sft, "run_expert_group", no_training)
    monkeypatch.setattr(router_pretrain, "run_router_pretrain", no_training)
    cfg = make_config(f"backbone.init_checkpoint={tmp_path / 'instruct' / 'model'}", f"init_from={trained}")
    pipeline.prepare(cfg, "eval")
    assert not (tmp_path / "instruct").exists()


# ---- skipped training samples --------------------------------------------------------------------------------------
def test_training_lists_distinct_skipped_samples_by_reason(synthetic_dir, toy_dir, tmp_path, capsys):
    samples = list(iter_samples(str(synthetic_dir / "train")))[:12]
    bad_skill, undecodable = samples[1].key, samples[6].key
    train = tmp_path / "train"
    with ShardWriter(train, prefix="train", maxcount=6) as writer:
        for s in samples:
            if s.key == bad_skill:
                s = Sample(**{**s.__dict__, "skills": {**s.skills, "planning": "no_such_skill"}})
            elif s.key == undecodable:
                s = Sample(**{**s.__dict__, "images": [b"\xff\xd8\xff\xe0 not a jpeg"]})
            writer.write(s)
    run_dir = tmp_path / "sft"
    # 6 steps of 4: 24 samples drawn from 10 good ones, so each bad sample is met at least twice.
    cli.main(["sft", "--config", str(DENSE), *dense_overrides(synthetic_dir, toy_dir, run_dir),
              f"data.train_shards={train}", "trainer.max_steps=6", "trainer.val_every_n_steps=6"])
    out = capsys.readouterr().out
    assert "skipped 2 sample(s): bad skill 1, undecodable 1" in out
    listed = read_jsonl(run_dir / "skipped.jsonl")
    assert sorted((r["reason"], r["key"]) for r in listed) == [("bad skill", bad_skill), ("undecodable", undecodable)]
    assert all(Path(r["shard"]).parent == train for r in listed)
    assert "no_such_skill" in next(r["detail"] for r in listed if r["reason"] == "bad skill")
    assert json.loads((run_dir / "metrics.json").read_text())["skipped"] == {"bad skill": 1, "undecodable": 1}


# ---- a kill during the final save --------------------------------------------------------------------------------
KILL_DURING_SAVE = """
import os, signal, sys
import mose_lightning.checkpoint as checkpoint
from mose_lightning import cli

real = checkpoint.save_file

def save_then_die(state, path, *args, **kwargs):
    real(state, path, *args, **kwargs)  # the weights are in the temporary folder, the rest is not
    os.kill(os.getpid(), signal.SIGKILL)

checkpoint.save_file = save_then_die
cli.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_kill_during_the_final_save_is_recovered_by_the_rerun(trained, synthetic_dir, toy_dir, tmp_path):
    run_dir = tmp_path / "sft"
    args = ["sft", "--config", str(DENSE), *dense_overrides(synthetic_dir, toy_dir, run_dir)]
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *args], cwd=PROJECT, env=_env(),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [p.name for p in run_dir.glob(".model.*")], "the kill did not leave a temporary model folder"
    assert not (run_dir / "model").exists() and not (run_dir / "metrics.json").exists()

    cli.main(args)
    # The same run as `trained` (same config and seed, CPU, one thread): the same final metrics.
    expected = json.loads((trained / "metrics.json").read_text())
    got = json.loads((run_dir / "metrics.json").read_text())
    assert set(got) == set(expected) and got["steps"] == 2
    assert all(got[k] == pytest.approx(expected[k], rel=1e-5) for k in expected)
    assert not list(run_dir.glob(".model.*")) and (run_dir / "model" / "weights.safetensors").is_file()


# ---- permissions -------------------------------------------------------------------------------------------------
def test_run_outputs_follow_the_umask(trained, tmp_path):
    from mose_lightning.io import atomic_write_text

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    files = [trained / "metrics.json", trained / "config.yaml", trained / "checkpoints" / "last.ckpt",
             trained / "model" / "config.yaml", trained / "model" / "weights.safetensors"]
    assert {p.name: oct(mode(p)) for p in files} == {p.name: oct(0o666 & ~UMASK) for p in files}
    assert oct(mode(trained / "model")) == oct(0o777 & ~UMASK)
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with ShardWriter(tmp_path / "shards") as writer:
            writer.write(_tiny_sample())
    finally:
        os.umask(old)
    assert oct(mode(tmp_path / "a.txt")) == oct(0o644)
    assert {oct(mode(p)) for p in (tmp_path / "shards").iterdir()} == {oct(0o644)}


def _tiny_sample() -> Sample:
    from PIL import Image

    from mose_lightning.data.sample import encode_jpeg

    return Sample(key="k", dataset="coda_lm", task="general", question="What?", answer="This.", views=["front"],
                  images=[encode_jpeg(Image.new("RGB", (8, 8)))], source={})
