"""The stages end to end on CPU with the toy backbone, through the real entry points.

One small synthetic set, one toy backbone and one router cache are shared by the whole file (session-scoped,
under a pytest tmp dir); the stages chain like a user's run: pretrain-router -> sft (finds the routers by the
pipeline's run_dir convention) -> expert-group (starts from the SFT model) -> eval. Multi-process DDP and the
resume-after-SIGKILL tests start real `mose` / `lightning run model` processes with a timeout; FSDP runs in two
CPU processes (gloo) too.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import List

import pytest
import torch

from mose_lightning import cli
from mose_lightning.config import load_config

PROJECT = Path(__file__).resolve().parent.parent
TOY = PROJECT / "configs" / "experiment" / "toy_mose.yaml"
TOY_EG = PROJECT / "configs" / "experiment" / "toy_mose_expert_group.yaml"
BIN = Path(sys.executable).parent
MOSE = str(BIN / "mose")
LIGHTNING = str(BIN / "lightning")
SIZES = {"train": 96, "val": 24, "test": 24}
SUBPROCESS_TIMEOUT = 300


# ---- helpers ---------------------------------------------------------------------------------------------
def base_overrides(root: Path) -> List[str]:
    """Small and fast: the shared synthetic set, toy backbone and router cache; no instruct-tuned init."""
    return [
        f"data.synthetic.out_dir={root / 'syn'}",
        f"data.synthetic.num_train={SIZES['train']}",
        f"data.synthetic.num_val={SIZES['val']}",
        f"data.synthetic.num_test={SIZES['test']}",
        f"backbone.toy_dir={root / 'toy'}",
        "backbone.init_checkpoint=null",
        f"router_pretrain.cache_dir={root / 'cache'}",
        "router_pretrain.epochs=5",
        "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=1",
        "data.num_workers=0",
    ]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_cmd(args: List[str], timeout: int = SUBPROCESS_TIMEOUT) -> str:
    """Run a command to completion (own process group, killed on timeout); returns stdout+stderr."""
    proc = subprocess.Popen(args, cwd=PROJECT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(args)}\n{out[-6000:]}")
    assert proc.returncode == 0, f"rc={proc.returncode}: {' '.join(args)}\n{out[-6000:]}"
    return out


def run_in_process(stage: str, config: Path, overrides: List[str]) -> None:
    cli.main([stage, "--config", str(config), *overrides])


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def tb_scalars(run_dir: Path, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def shard_keys(split_dir: Path) -> List[str]:
    keys = set()
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys |= {name.split(".", 1)[0] for name in tar.getnames()}
    return sorted(keys)


def level_names() -> List[str]:
    from mose_lightning.skills import load_taxonomy

    return list(load_taxonomy(load_config(TOY).skills.taxonomy).level_names)


# ---- shared session state ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def root(tmp_path_factory) -> Path:
    # MOSE_TEST_STAGES_DIR=DIR keeps the shared data, toy backbone and router cache between sessions (for
    # iterating on one test); run directories are made fresh per session inside it.
    keep = os.environ.get("MOSE_TEST_STAGES_DIR")
    if keep:
        import shutil

        path = Path(keep)
        for child in path.glob("*"):
            if child.name not in ("syn", "toy", "cache"):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="session")
def routers(root):
    """`mose pretrain-router` in process: creates the synthetic data, the toy backbone and the router cache."""
    run_dir = root / "pretrain_router"
    run_in_process("pretrain-router", TOY, base_overrides(root) + [f"run_dir={run_dir}"])
    return run_dir


@pytest.fixture(scope="session")
def sft_run(root, routers):
    """`mose sft` as a user types it; run_dir's sibling pretrain_router/ holds the routers the pipeline reuses."""
    run_dir = root / "sft"
    out = run_cmd([MOSE, "sft", "--config", str(TOY), *base_overrides(root), f"run_dir={run_dir}",
                   "trainer.max_steps=24", "trainer.val_every_n_steps=24", "optim.lr=3e-3"])
    return run_dir, out


@pytest.fixture(scope="session")
def eg_run(root, sft_run):
    run_dir = root / "expert_group"
    out = run_cmd([MOSE, "expert-group", "--config", str(TOY_EG), *base_overrides(root), f"run_dir={run_dir}",
                   f"init_from={sft_run[0]}", "trainer.max_steps=4", "trainer.val_every_n_steps=4"])
    return run_dir, out


# ---- 1. each stage through the real entry point ----------------------------------------------------------
def test_pretrain_router_outputs(routers):
    metrics = read_json(routers / "metrics.json")
    levels = level_names()
    for level in levels:
        acc = metrics[f"router/acc/{level}"]
        assert 0.0 <= acc <= 1.0, (level, acc)
    assert metrics["router/acc/mean"] == pytest.approx(sum(metrics[f"router/acc/{l}"] for l in levels) / len(levels))
    assert metrics["backbone_forwards"] == SIZES["train"] + SIZES["val"]
    state = torch.load(routers / "routers.pt", weights_only=True)
    assert state and all(k.startswith("layer") for k in state)
    confusion = read_json(routers / "confusion.json")
    assert set(confusion) == set(levels)
    for level in levels:
        matrix = confusion[level]["matrix"]
        assert len(matrix) == len(confusion[level]["skills"]) and all(len(r) == len(matrix) for r in matrix)
        assert sum(map(sum, matrix)) > 0
    assert (routers / "confusion.md").is_file()
    assert list((routers / "tb").glob("events.out.tfevents.*"))


def test_pretrain_router_reuses_cache(root, routers, capsys):
    run_dir = root / "pretrain_router_again"
    run_in_process("pretrain-router", TOY, base_overrides(root) + [f"run_dir={run_dir}"])
    out = capsys.readouterr().out
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["backbone_forwards"] == 0
    assert out.count("cache hit") == 2
    assert out.strip().splitlines()[-1] == f"run dir: {run_dir}"
    # Same cached inputs, same seed -> the same held-out accuracy.
    first = read_json(routers / "metrics.json")
    assert metrics["router/acc/mean"] == pytest.approx(first["router/acc/mean"])


def test_sft_outputs(sft_run, routers):
    run_dir, out = sft_run
    assert out.strip().splitlines()[-1] == f"run dir: {run_dir}"
    assert "pretraining the routers first" not in out  # the routers of pretrain_router/ were reused
    saved = load_config(run_dir / "config.yaml")
    assert Path(saved.moe.router_checkpoint) == routers / "routers.pt"
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["steps"] == 24
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    assert (run_dir / "model" / "weights.safetensors").is_file()
    assert (run_dir / "model" / "config.yaml").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_sft_starts_from_pretrained_routers(sft_run, routers):
    """The SFT run's saved config points at routers.pt, and building from it puts those weights in the routers."""
    from mose_lightning.checkpoint import model_from_config
    from mose_lightning.surgery import skill_routers

    run_dir, _ = sft_run
    cfg = load_config(run_dir / "config.yaml")
    model = model_from_config(cfg)
    state = torch.load(routers / "routers.pt", weights_only=True)
    for idx, router in skill_routers(model.layout).items():
        for name, value in router.state_dict().items():
            torch.testing.assert_close(value.float(), state[f"layer{idx}.{name}"].float())


def test_sft_loss_falls(sft_run):
    run_dir, _ = sft_run
    losses = [v for _, v in tb_scalars(run_dir, "train/loss")]
    assert len(losses) == 24, losses
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    # Measured: about 6.6 -> 6.0 over 24 steps from a random toy backbone (only the experts train).
    assert last < first - 0.25, (first, last, losses)


def test_expert_group_starts_from_sft_and_trains(eg_run, sft_run):
    run_dir, out = eg_run
    assert out.strip().splitlines()[-1] == f"run dir: {run_dir}"
    saved = load_config(run_dir / "config.yaml")
    assert saved.moe.kind == "expert_group"
    assert Path(saved.init_from) == sft_run[0]
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["steps"] == 4 and math.isfinite(metrics["train/loss"])
    meta = read_json(run_dir / "model" / "meta.json") if (run_dir / "model" / "meta.json").is_file() else None
    if meta is not None:
        assert meta.get("kind") == "expert_group"
    # It trained from the SFT model, not from scratch: the first loss is about where SFT ended.
    sft_losses = [v for _, v in tb_scalars(sft_run[0], "train/loss")]
    eg_losses = [v for _, v in tb_scalars(run_dir, "train/loss")]
    assert len(eg_losses) == 4
    assert eg_losses[0] < sft_losses[0]


def test_eval_outputs(root, sft_run):
    run_dir = root / "eval"
    out = run_cmd([MOSE, "eval", "--config", str(TOY), *base_overrides(root), f"run_dir={run_dir}",
                   f"checkpoint={sft_run[0]}", "eval.limit=0", "eval.max_new_tokens=6", "eval.html_samples=5"])
    assert out.strip().splitlines()[-1] == f"run dir: {run_dir}"
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines() if line]
    expected = shard_keys(root / "syn" / "rule" / "test")
    assert len(expected) == SIZES["test"]
    assert sorted(r["key"] for r in records) == expected  # every test sample exactly once
    layers = {len(r["skill_chain"]) for r in records}
    assert len(layers) == 1 and layers.pop() == 4, "one skill per MoE layer (the toy's 4 decoder layers)"
    levels = set(level_names())
    for r in records:
        assert isinstance(r["prediction"], str)
        for step in r["skill_chain"]:
            assert step["level"] in levels and isinstance(step["skill"], str) and 0.0 <= step["prob"] <= 1.0
    scores = read_json(run_dir / "scores.json")
    assert scores
    assert (run_dir / "results.md").is_file() and (run_dir / "report.html").is_file()
    pngs = sorted(p.name for p in run_dir.glob("*.png"))
    assert {"skill_chains.png", "expert_usage.png", "expert_similarity.png"} <= set(pngs), pngs
    for png in pngs:
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- 2. DDP on CPU -------------------------------------------------------------------------------------
DDP_TIMEOUT = 300


@pytest.mark.slow
def test_ddp_lightning_run_model(root, routers):
    run_dir = root / "ddp_run"
    out = run_cmd([LIGHTNING, "run", "model", "mose_lightning/run.py", "--accelerator", "cpu", "--devices", "2",
                   "--strategy", "ddp", "stage=sft", f"config={TOY}", *base_overrides(root),
                   f"moe.router_checkpoint={routers / 'routers.pt'}", "trainer.max_steps=6",
                   "trainer.val_every_n_steps=6", "data.batch_size=2", f"run_dir={run_dir}"], timeout=DDP_TIMEOUT)
    assert out.count("run dir: ") == 1, out[-4000:]
    assert f"run dir: {run_dir}" in out
    assert read_json(run_dir / "metrics.json")["steps"] == 6
    assert (run_dir / "model" / "weights.safetensors").is_file()
    saved = load_config(run_dir / "config.yaml")
    assert saved.trainer.strategy == "ddp" and str(saved.trainer.devices) == "2"


@pytest.mark.slow
def test_ddp_mose_devices_2(root, routers):
    run_dir = root / "ddp_mose"
    out = run_cmd([MOSE, "sft", "--config", str(TOY), *base_overrides(root), "trainer.devices=2",
                   "trainer.strategy=ddp", f"moe.router_checkpoint={routers / 'routers.pt'}", "trainer.max_steps=4",
                   "trainer.val_every_n_steps=4", "data.batch_size=2", f"run_dir={run_dir}"], timeout=DDP_TIMEOUT)
    assert out.count("run dir: ") == 1, out[-4000:]
    assert read_json(run_dir / "metrics.json")["steps"] == 4
    assert (run_dir / "model" / "weights.safetensors").is_file()


# ---- 3. resume after SIGKILL -----------------------------------------------------------------------------
def _ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


@pytest.mark.slow
def test_resume_after_sigkill(root, routers):
    run_dir = root / "resume"
    last = run_dir / "checkpoints" / "last.ckpt"
    max_steps = 20
    args = [MOSE, "sft", "--config", str(TOY), *base_overrides(root), f"run_dir={run_dir}",
            f"moe.router_checkpoint={routers / 'routers.pt'}", f"trainer.max_steps={max_steps}",
            "trainer.checkpoint_every_n_steps=2", f"trainer.val_every_n_steps={max_steps}", "data.batch_size=2"]
    log = open(root / "resume_first.log", "w")
    proc = subprocess.Popen(args, cwd=PROJECT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    killed_at = None
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if last.is_file():
                try:
                    step = _ckpt_step(last)
                except Exception:  # noqa: BLE001 - replaced between our stat and read
                    step = 0
                if step > 2:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed_at = step
                    break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert killed_at is not None, "the first run ended before it could be killed:\n" + (root / "resume_first.log").read_text()[-4000:]
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()
    step_on_disk = _ckpt_step(last)  # the good checkpoint is readable after the kill
    assert killed_at <= step_on_disk < max_steps

    out = run_cmd(args)
    assert f"Restoring states from the checkpoint path at {last}" in out, out[-4000:]
    assert read_json(run_dir / "metrics.json")["steps"] == max_steps
    assert _ckpt_step(last) == max_steps
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers
    # The global step logged to TensorBoard goes on from the checkpoint instead of starting again at 0.
    steps = [s for s, _ in tb_scalars(run_dir, "train/loss")]
    assert max(steps) >= max_steps - 2
    # Running the finished run again trains nothing and keeps its recorded final metrics (not NaN or missing).
    finished = read_json(run_dir / "metrics.json")
    assert "train/loss" in finished
    run_cmd(args)
    assert read_json(run_dir / "metrics.json") == finished and _ckpt_step(last) == max_steps


def test_atomic_checkpoint_keeps_previous_on_failure(tmp_path, monkeypatch):
    from mose_lightning.training import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 4}, target)

    def broken(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        io.save_checkpoint({"global_step": 6}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=False)["global_step"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ---- 4. non-finite loss ----------------------------------------------------------------------------------
def _poison_step(monkeypatch, step: int, seen: list):
    """The answer loss of the `step`-th training forward (0-based; validation forwards run without gradients and
    do not count) becomes NaN."""
    from mose_lightning.model import MoEVisionLanguageModel

    original = MoEVisionLanguageModel.forward
    calls = []

    def poisoned(self, batch, *args, **kwargs):
        out = original(self, batch, *args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) - 1 == step:
                seen.append([m["key"] for m in batch["meta"]])
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MoEVisionLanguageModel, "forward", poisoned)


def test_nonfinite_stop_names_step_and_batch(root, routers, monkeypatch):
    from mose_lightning.stages.common import NonFiniteLoss

    seen: list = []
    _poison_step(monkeypatch, 1, seen)
    with pytest.raises(NonFiniteLoss) as err:
        run_in_process("sft", TOY, base_overrides(root) + [
            f"run_dir={root / 'nonfinite_stop'}", f"moe.router_checkpoint={routers / 'routers.pt'}",
            "trainer.max_steps=3", "trainer.val_every_n_steps=3", "trainer.nonfinite=stop"])
    message = str(err.value)
    assert "at step 1" in message
    assert seen and all(key in message for key in seen[0])


def test_nonfinite_skip_continues(root, routers, monkeypatch, capsys):
    seen: list = []
    _poison_step(monkeypatch, 1, seen)
    run_dir = root / "nonfinite_skip"
    run_in_process("sft", TOY, base_overrides(root) + [
        f"run_dir={run_dir}", f"moe.router_checkpoint={routers / 'routers.pt'}",
        "trainer.max_steps=3", "trainer.val_every_n_steps=3", "trainer.nonfinite=skip"])
    out = capsys.readouterr().out
    assert "skipping batch: non-finite loss" in out and "at step 1" in out
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["steps"] == 3 and math.isfinite(metrics["train/loss"])
    skipped = tb_scalars(run_dir, "train/skipped_nonfinite")
    assert skipped == [(0, 0.0), (1, 1.0), (2, 0.0)]
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "model" / "weights.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


# ---- 5. FSDP strategy: construction, and real two-process runs on the CPU (gloo) ----------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fsdp_units(rank: int, port: int, overrides: List[str], out: str) -> None:
    """One gloo process: the toy MoSE model wrapped by torch FSDP with the strategy's wrap policy and mixed
    precision; writes which modules became FSDP units (by class name, and whether any lies inside an MoE block's
    experts) to `out`."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from mose_lightning import training
    from mose_lightning.checkpoint import model_from_config

    torch.set_num_threads(1)
    cfg = load_config(TOY, overrides)
    model = model_from_config(cfg)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=1)
    try:
        strategy = training._strategy(cfg, model)
        wrapped = FSDP(model, auto_wrap_policy=strategy.kwargs["auto_wrap_policy"],
                       mixed_precision=strategy.mixed_precision, use_orig_params=True, device_id=torch.device("cpu"))
        units = [type(m.module).__name__ for m in FSDP.fsdp_modules(wrapped)]
        experts = {id(e) for b in model.layout.blocks for e in b.experts.modules()}
        in_experts = [m for m in FSDP.fsdp_modules(wrapped) if id(m.module) in experts]
        Path(out).write_text(json.dumps({"units": units, "in_experts": len(in_experts),
                                         "decoder_layers": len(model.adapter.decoder_layers(model.backbone)),
                                         "vision_blocks": len(model.adapter.vision_layers(model.backbone)),
                                         "routers": len(model.layout.sequence_routed)}))
    finally:
        dist.destroy_process_group()


def test_fsdp_wraps_decoder_layers_vision_blocks_and_routers_never_experts(root, routers, tmp_path):
    """The FSDP strategy's policy on the real model: one FSDP unit per decoder layer and per vision block, one
    float32 unit per skill router (exempt from mixed precision), the root, and none inside the experts."""
    import torch.multiprocessing as mp

    out = tmp_path / "units.json"
    overrides = base_overrides(root) + ["trainer.strategy=fsdp", "trainer.precision=bf16-mixed",
                                        f"moe.router_checkpoint={routers / 'routers.pt'}"]
    mp.start_processes(_fsdp_units, args=(_free_port(), overrides, str(out)), nprocs=1, start_method="spawn")
    found = read_json(out)
    counts = {name: found["units"].count(name) for name in set(found["units"])}
    assert counts == {"MoEVisionLanguageModel": 1, "Qwen2VLDecoderLayer": found["decoder_layers"],
                      "Qwen2VLVisionBlock": found["vision_blocks"], "SequenceSkillRouter": found["routers"]}
    assert found["in_experts"] == 0


def _fsdp_router_logits(rank: int, port: int, overrides: List[str], exempt_routers: bool, out: str) -> None:
    """One of two gloo processes: the toy MoSE model under torch FSDP with the strategy's wrap policy and
    bf16-mixed precision policy (`exempt_routers=False`: Lightning's own policy, the float32 routers flattened into
    their decoder layer's float32 parameter and cast to bf16 with it), a forward on a validation batch, and per
    MoSE layer the largest difference between the router logits FSDP computed and the float32 router's on the same
    pooled input (rank 0 writes them to `out`)."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from mose_lightning import training
    from mose_lightning.checkpoint import model_from_config
    from mose_lightning.data.datamodule import DriveDataModule

    torch.set_num_threads(1)
    cfg = load_config(TOY, overrides + ["trainer.strategy=fsdp", "trainer.precision=bf16-mixed"])
    model = model_from_config(cfg)
    # The same batch on both ranks: read before the process group exists (the loader would split shards by rank).
    batch = next(iter(DriveDataModule(cfg.data, model.adapter, model.processor, model.taxonomy).val_dataloader()))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        blocks = model.layout.sequence_routed
        reference = [(b.router.classifier.weight.detach().clone(), b.router.classifier.bias.detach().clone())
                     for b in blocks]
        strategy = training._strategy(cfg, model)
        policy = strategy.mixed_precision
        if not exempt_routers:
            policy = FSDPPrecision("bf16-mixed").mixed_precision_config
        seen = {}

        def record_input_dtype(block, args):  # the dtype the decoder layer computes in: its MoE block's input
            seen[id(block)] = args[0].dtype

        for block in blocks:
            block.register_forward_pre_hook(record_input_dtype)
        wrapped = FSDP(model, auto_wrap_policy=strategy.kwargs["auto_wrap_policy"], mixed_precision=policy,
                       use_orig_params=True, device_id=torch.device("cpu"))
        with torch.no_grad():
            routes = wrapped(batch, with_loss=False).routes
        result = []
        for block, route, (weight, bias) in zip(blocks, routes, reference):
            expected = F.linear(block.router.features(route.pooled.float()), weight, bias)
            result.append({"layer_dtype": str(seen[id(block)]), "logits_dtype": str(route.logits.dtype),
                           "max_abs_diff": float((route.logits.float() - expected).abs().max()),
                           "logit_scale": float(expected.abs().max())})
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_bf16_mixed_computes_skill_routers_in_float32(root, routers, tmp_path):
    """Under the strategy's FSDP mixed-precision policy the decoder layers compute in bf16 while the skill routers
    compute from their float32 weights: the logits equal the float32 router's on the same input. The control,
    Lightning's plain policy with routers in their layer's flat parameter, shows the error this removes (bf16
    weights: logit errors far above float32 rounding)."""
    import torch.multiprocessing as mp

    overrides = base_overrides(root) + [f"moe.router_checkpoint={routers / 'routers.pt'}",
                                        f"data.val_shards={root / 'syn' / 'rule' / 'val'}", "data.eval_batch_size=4"]
    results = {}
    for exempt in (True, False):
        out = tmp_path / f"exempt_{exempt}.json"
        mp.start_processes(_fsdp_router_logits, args=(_free_port(), overrides, exempt, str(out)), nprocs=2,
                           start_method="spawn")
        results[exempt] = read_json(out)
    exempt, plain = results[True], results[False]
    assert len(exempt) == len(plain) >= 2
    for layer in exempt:
        assert layer["layer_dtype"] == "torch.bfloat16" and layer["logits_dtype"] == "torch.float32"
        assert layer["max_abs_diff"] <= 1e-5 * max(1.0, layer["logit_scale"]), layer
    assert max(layer["max_abs_diff"] for layer in plain) > 1e-3, plain


@pytest.mark.slow
@pytest.mark.parametrize("precision,checkpointing", [("bf16-mixed", True), ("bf16-true", False)])
def test_fsdp_on_two_cpu_processes_trains_resumes_and_saves_float32_routers(root, routers, precision, checkpointing):
    """SFT under FSDP in two CPU processes (gloo), as on GPUs: gradient clipping through the root FSDP module,
    activation checkpointing of the decoder layers (first case), a restarted run resumes from last.ckpt, and the
    saved model gathers every trained tensor in full. The skill routers train and are saved in float32 under both
    precisions (their own FSDP units); the experts are float32 master weights under bf16-mixed and bf16 under
    bf16-true."""
    from safetensors.torch import load_file

    run_dir = root / f"fsdp_cpu_{precision}"
    args = [MOSE, "sft", "--config", str(TOY), *base_overrides(root), f"run_dir={run_dir}",
            f"moe.router_checkpoint={routers / 'routers.pt'}", "moe.router_trainable=true",
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=fsdp", f"trainer.precision={precision}",
            f"trainer.activation_checkpointing={str(checkpointing).lower()}",
            "trainer.gradient_clip_val=1.0", "trainer.checkpoint_every_n_steps=2", "trainer.val_every_n_steps=4",
            "data.batch_size=2"]
    run_cmd(args + ["trainer.max_steps=2"], timeout=DDP_TIMEOUT)
    assert _ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 2
    out = run_cmd(args + ["trainer.max_steps=4"], timeout=DDP_TIMEOUT)
    assert "Restoring states from the checkpoint path" in out, out[-4000:]
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["steps"] == 4 and math.isfinite(metrics["train/loss"])

    weights = load_file(str(run_dir / "model" / "weights.safetensors"))
    for name, tensor in weights.items():
        assert torch.isfinite(tensor.float()).all(), name
    experts = {k: v for k, v in weights.items() if k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    assert experts and {v.dtype for v in experts.values()} == {
        torch.bfloat16 if precision == "bf16-true" else torch.float32}
    # Every router weight is saved in full, in float32, and has trained away from the pretrained routers.
    pretrained = torch.load(routers / "routers.pt", map_location="cpu")
    saved = {}
    for key, value in weights.items():
        match = re.search(r"layers\.(\d+)\..*\.router\.(.+)$", key)
        if match:
            saved[f"layer{match.group(1)}.{match.group(2)}"] = value
    assert set(saved) == set(pretrained)
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert all(saved[k].shape == pretrained[k].shape for k in saved)
    assert any(not torch.equal(saved[k], pretrained[k]) for k in saved if k.endswith("weight"))
    # TensorBoard got the expert-similarity plot, read from the gathered (not the sharded) expert weights.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert "routing/expert_weight_similarity_last_layer" in events.Tags()["images"]


def test_bf16_true_training_keeps_skill_routers_float32(root, routers):
    """precision=bf16-true casts the model to bf16, the skill routers excepted: the saved model holds bf16 experts
    and float32 routers (trained here, so in the optimiser as float32)."""
    from safetensors.torch import load_file

    run_dir = root / "bf16_true"
    run_in_process("sft", TOY, base_overrides(root) + [
        f"run_dir={run_dir}", f"moe.router_checkpoint={routers / 'routers.pt'}", "moe.router_trainable=true",
        "trainer.precision=bf16-true", "trainer.max_steps=2", "trainer.val_every_n_steps=2"])
    weights = load_file(str(run_dir / "model" / "weights.safetensors"))
    router_keys = [k for k in weights if ".router." in k]
    expert_keys = [k for k in weights if k.endswith("experts.gate_up_proj")]
    assert router_keys and expert_keys
    assert {weights[k].dtype for k in router_keys} == {torch.float32}
    assert {weights[k].dtype for k in expert_keys} == {torch.bfloat16}
    assert math.isfinite(read_json(run_dir / "metrics.json")["train/loss"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy,precision,checkpointing", [
    ("fsdp", "bf16-mixed", True), ("fsdp", "bf16-mixed", False), ("auto", "bf16-true", False)])
def test_gpu_sft_trains_resumes_saves_and_evaluates(root, routers, strategy, precision, checkpointing):
    """The GPU paths a user runs: SFT on one GPU under FSDP (with gradient clipping, optionally activation
    checkpointing) or a single device, in bf16; a restarted run resumes from last.ckpt; the saved model holds every
    trained tensor in full (FSDP gathers it) and loads on the CPU; evaluation generates on the GPU from it."""
    from safetensors.torch import load_file

    from mose_lightning.checkpoint import load_model

    run_dir = root / f"gpu_{strategy}_{precision}_{'ckpt' if checkpointing else 'plain'}"
    args = [MOSE, "sft", "--config", str(TOY), *base_overrides(root), f"run_dir={run_dir}",
            f"moe.router_checkpoint={routers / 'routers.pt'}", "moe.router_trainable=true",
            "trainer.accelerator=gpu", "trainer.devices=1", f"trainer.strategy={strategy}",
            f"trainer.precision={precision}", f"trainer.activation_checkpointing={str(checkpointing).lower()}",
            "trainer.gradient_clip_val=1.0", "trainer.checkpoint_every_n_steps=2", "trainer.val_every_n_steps=4"]
    run_cmd(args + ["trainer.max_steps=4"])
    assert _ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 4
    out = run_cmd(args + ["trainer.max_steps=6"])
    assert "Restoring states from the checkpoint path" in out, out[-4000:]
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["steps"] == 6 and math.isfinite(metrics["train/loss"])

    weights = load_file(str(run_dir / "model" / "weights.safetensors"))
    model = load_model(run_dir / "model")  # on the CPU
    trained = {n: p for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trained and set(trained) <= set(weights)
    for name, tensor in weights.items():
        assert torch.isfinite(tensor.float()).all(), name
    experts = [n for n in weights if n.endswith("experts.down_proj")]
    assert experts and all(weights[n].shape == dict(model.backbone.named_parameters())[n].shape for n in experts)
    # Routers stay float32, also under FSDP (their own units, exempt from its mixed precision).
    router_dtypes = {weights[n].dtype for n in weights if ".router." in n}
    assert router_dtypes == {torch.float32}

    eval_dir = run_dir.with_name(run_dir.name + "_eval")
    run_cmd([MOSE, "eval", "--config", str(TOY), *base_overrides(root), f"run_dir={eval_dir}",
             f"checkpoint={run_dir}", "trainer.accelerator=gpu", "trainer.devices=1", f"trainer.precision={precision}",
             "eval.limit=0", "eval.max_new_tokens=6"])
    records = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines() if line]
    assert sorted(r["key"] for r in records) == shard_keys(root / "syn" / "rule" / "test")


# ---- 6. router accuracy with the default toy config ------------------------------------------------------
@pytest.mark.toy_quality
def test_default_toy_routers_are_accurate_after_pretraining_and_stay_on_their_skills_through_sft(tmp_path):
    """Default sizes and settings (the instruction-tuned toy backbone, 1200/150/150 synthetic samples): router
    pretraining reaches >= 0.9 held-out accuracy per level, and after the demo's SFT (120 steps) the fine-tuned
    model still routes the whole validation split by skill: >= 0.85 per level, from the routes it took."""
    paths = [f"data.synthetic.out_dir={tmp_path / 'syn'}", f"backbone.toy_dir={tmp_path / 'toy'}",
             f"backbone.init_checkpoint={tmp_path / 'instruct' / 'model'}",
             f"router_pretrain.cache_dir={tmp_path / 'cache'}"]
    routers = tmp_path / "pretrain_router"
    run_cmd([MOSE, "pretrain-router", "--config", str(TOY), *paths, f"run_dir={routers}"], timeout=900)
    metrics = read_json(routers / "metrics.json")
    accs = {level: metrics[f"router/acc/{level}"] for level in level_names()}
    assert all(acc >= 0.9 for acc in accs.values()), accs

    sft = tmp_path / "sft"
    run_cmd([MOSE, "sft", "--config", str(TOY), *paths, f"run_dir={sft}", "trainer.limit_val_batches=0"], timeout=600)
    metrics = read_json(sft / "metrics.json")
    assert metrics["steps"] == 120
    routed = {level: metrics[f"val/router_acc/{level}"] for level in level_names()}
    assert all(acc >= 0.85 for acc in routed.values()), routed


# ---- mose predict and evaluation under DDP -----------------------------------------------------------------
def test_predict_prints_answer_and_skill_chain(root, sft_run, tmp_path):
    from data_recipes.synthetic import QUESTIONS
    from mose_lightning.data.shards import iter_samples

    sample = next(iter(iter_samples(str(root / "syn" / "rule" / "test"))))
    image = tmp_path / "scene.jpg"
    image.write_bytes(sample.images[0])
    out = run_cmd([MOSE, "predict", "--checkpoint", str(sft_run[0]), "--image", str(image),
                   "--question", QUESTIONS["suggestion"], "--max-new-tokens", "6"])
    lines = out.splitlines()
    assert any(line.startswith("answer: ") for line in lines)
    chain = [line.split() for line in lines if line.startswith("  layer ")]
    # One entry per MoSE layer of the toy (4), with the level of that layer and a skill of that level.
    levels = level_names()
    assert [c[2] for c in chain] == ["perception", "prediction", "planning", "planning"]
    from mose_lightning.skills import load_taxonomy

    taxonomy = load_taxonomy(load_config(TOY).skills.taxonomy)
    assert all(c[3] in taxonomy.level(c[2]).skill_names for c in chain) and len(levels) == 3
    proc = subprocess.run([MOSE, "predict", "--checkpoint", str(sft_run[0]), "--image", str(image),
                           "--question", "Where?", "--box", "200,100,80,80"], cwd=PROJECT, env=_env(),
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 2 and "--box" in proc.stderr and "not inside" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_eval_ddp_generates_each_sample_once(root, sft_run, strategy):
    """Two ranks share the test split; an FSDP training config evaluates data-parallel the same way."""
    run_dir = root / f"eval_{strategy}"
    out = run_cmd([MOSE, "eval", "--config", str(TOY), *base_overrides(root), f"run_dir={run_dir}",
                   f"checkpoint={sft_run[0]}", "eval.limit=0", "eval.max_new_tokens=4", "trainer.devices=2",
                   f"trainer.strategy={strategy}", "data.eval_batch_size=5"])
    assert out.count("run dir:") == 1
    assert ("generates data-parallel (ddp)" in out) == (strategy == "fsdp")
    keys = [json.loads(line)["key"] for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert sorted(keys) == shard_keys(root / "syn" / "rule" / "test")
    assert len(keys) == len(set(keys)) == SIZES["test"]


def test_router_pretraining_standardises_each_router_input_with_the_training_statistics():
    """Router pretraining sets every router's input standardisation from its training features; the router then
    computes its classifier on those standardised inputs, and a router loaded from its state gives the same
    logits."""
    from mose_lightning.moe.routing import SequenceSkillRouter
    from mose_lightning.stages.router_pretrain import RouterPretrainModule

    torch.manual_seed(0)
    cfg = load_config(TOY)
    routers = {1: SequenceSkillRouter(16, 4), 3: SequenceSkillRouter(16, 4)}
    # A big shared component plus small per-sample deviations, like pooled residual streams.
    feats = 5.0 + 0.05 * torch.randn(64, 2, 16)
    feats[:, :, 5] = 2.0
    RouterPretrainModule(routers, [0, 2], ["perception", "prediction", "planning"], 4, cfg, feats)
    for router in routers.values():
        torch.nn.init.normal_(router.classifier.weight)
        torch.nn.init.normal_(router.classifier.bias)
    for j, router in enumerate(routers.values()):
        normed = SequenceSkillRouter.normalise(feats[:, j])
        std = normed.std(0, unbiased=False)
        z = (normed - normed.mean(0)) / std.where(std > 1e-6, torch.ones(16))
        assert abs(float(z.std(0, unbiased=False)[0]) - 1.0) < 1e-3
        with torch.no_grad():
            torch.testing.assert_close(router(feats[:, j]), router.classifier(z), rtol=1e-4, atol=1e-3)
            loaded = SequenceSkillRouter(16, 4)
            loaded.load_state_dict(router.state_dict())
            torch.testing.assert_close(loaded(feats[:, j]), router(feats[:, j]))
