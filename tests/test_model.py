"""The whole model on the toy backbone: upcycling equivalence, generation with routing reuse, teacher forcing,
what trains, save/load, config errors and meta builds of every experiment config.

Batches are real: synthetic shards -> DriveDataModule -> SampleEncoder -> collate, as training sees them.
"""

from __future__ import annotations

import json
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mose_lightning.checkpoint import load_model, save_model
from mose_lightning.config import ConfigError, load_config
from mose_lightning.data.datamodule import DriveDataModule
from mose_lightning.model import build_model
from mose_lightning.moe import ExpertGroupBlock, MoSEBlock, TopKMoEBlock
from mose_lightning.params import parameter_report

PROJECT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 6


def _first_batch(loader):
    return next(iter(loader))


@pytest.fixture(scope="module")
def dense(make_config):
    return build_model(make_config("moe.kind=dense"))


@pytest.fixture(scope="module")
def datamodule(dense):
    return DriveDataModule(dense.cfg.data, dense.adapter, dense.processor, dense.taxonomy)


@pytest.fixture(scope="module")
def batch(datamodule):
    """4 validation samples: images + question + answer, right-padded, with labels and skill labels."""
    b = _first_batch(datamodule.val_dataloader())
    assert b["input_ids"].shape[0] == 4 and "pixel_values" in b
    return b


@pytest.fixture(scope="module")
def gen_batch(datamodule):
    """4 test prompts (images + question, no answer), left-padded for generation."""
    b = _first_batch(datamodule.generation_dataloader("test"))
    assert b["input_ids"].shape[0] == 4 and "labels" not in b
    return b


@pytest.fixture(scope="module")
def dense_outputs(dense, batch, gen_batch):
    with torch.no_grad():
        logits = dense(batch).logits
    return logits, dense.generate(gen_batch, NEW_TOKENS).tokens


def _chain(routes):
    """(layer, level, experts per sample) of each routed layer."""
    return [(r.layer, r.level, r.expert.tolist()) for r in routes]


def _spread_routers(model, batch):
    """Standardise every router's input with the statistics of this batch's router inputs, as router pretraining
    does, so that decisive random routers send the samples to different experts."""
    with torch.no_grad():
        out = model(batch, with_loss=False) if "labels" in batch else model.generate(batch, 1)
    for block, route in zip(model.layout.sequence_routed, out.routes):
        block.router.set_standardisation(block.router.normalise(route.pooled))
    return model


def _perturb(model, seed=0, expert_std=0.05, router_std=3.0):
    """Make the skill experts differ from each other and the routers decisive, so routing changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.moe_blocks:
            for p in (block.experts.gate_up_proj, block.experts.down_proj):
                p.add_(torch.randn(p.shape, generator=gen) * expert_std)
            if isinstance(block, (MoSEBlock, ExpertGroupBlock)):
                w = block.router.classifier.weight
                w.copy_(torch.randn(w.shape, generator=gen) * router_std)
    return model


# ---- 1. upcycling equivalence ----------------------------------------------------------------------------------


@pytest.mark.parametrize("combine", ["weighted", "sum"])
@pytest.mark.parametrize("kind", ["mose", "topk", "expert_group"])
def test_upcycled_model_computes_the_dense_model(make_config, kind, combine, batch, gen_batch, dense_outputs):
    model = build_model(make_config(f"moe.kind={kind}", f"moe.combine={combine}"))
    block_types = {"mose": MoSEBlock, "topk": TopKMoEBlock, "expert_group": ExpertGroupBlock}
    assert len(model.moe_blocks) == 4 and all(type(b) is block_types[kind] for b in model.moe_blocks)
    dense_logits, dense_tokens = dense_outputs
    with torch.no_grad():
        logits = model(batch).logits
    assert logits.shape == dense_logits.shape
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=1e-5)
    tokens = model.generate(gen_batch, NEW_TOKENS).tokens
    assert torch.equal(tokens, dense_tokens)


# ---- 2. generation: cached routing reuse == re-routing every step ------------------------------------------------


@pytest.mark.parametrize("router_input", ["own_layer", "frozen_backbone"])
@pytest.mark.parametrize("kind", ["mose", "expert_group"])
def test_cached_generation_matches_rerouting_every_step(make_config, gen_batch, dense_outputs, kind, router_input):
    """With the KV cache, routes come from the prompt and decode steps run the slot path; re-routing every step
    runs the whole sequence through the loop kernel each time. Same tokens, same skill chain."""
    model = _perturb(build_model(make_config(f"moe.kind={kind}", f"moe.router_input={router_input}")))
    _spread_routers(model, gen_batch)
    cached = model.generate(gen_batch, NEW_TOKENS)
    rerouted = model.generate(gen_batch, NEW_TOKENS, reroute_every_step=True)

    # The perturbation is strong enough to matter: samples take different experts, and the output is no longer
    # the dense model's (so identical tokens below are not trivially explained by equal experts).
    assert len(cached.routes) == 4
    assert any(len(set(route.expert.tolist())) > 1 for route in cached.routes)
    assert not torch.equal(cached.tokens, dense_outputs[1])

    assert torch.equal(cached.tokens, rerouted.tokens)
    assert _chain(cached.routes) == _chain(rerouted.routes)
    for a, b in zip(cached.routes, rerouted.routes):
        torch.testing.assert_close(a.prob, b.prob, atol=1e-5, rtol=1e-5)


def test_generation_routes_on_the_prompt_only(make_config, gen_batch):
    """The route of a generated batch equals the route of a plain forward over the same prompts."""
    model = _perturb(build_model(make_config("moe.kind=mose", "moe.router_input=own_layer")), seed=1)
    generated = model.generate(gen_batch, 3)
    prompt_only = {k: v for k, v in gen_batch.items() if k != "labels"}
    prompt_only["prompt_mask"] = gen_batch["attention_mask"].bool()
    with torch.no_grad():
        out = model(prompt_only, with_loss=False)
    assert _chain(generated.routes) == _chain(out.routes)


@pytest.mark.parametrize("kind", ["mose", "expert_group", "topk"])
def test_expert_usage_after_generation_is_the_prompts(make_config, gen_batch, kind):
    """What evaluation's expert-usage plot reads after a generation: every block's counts of the prompt's forward
    (prefill), not of the last decode step. MoSE counts samples per expert, the token-routed blocks tokens."""
    model = _perturb(build_model(make_config(f"moe.kind={kind}", "moe.router_input=own_layer")), seed=2)
    prompt = model.generate(gen_batch, 1).expert_counts  # the prefill alone
    after = model.generate(gen_batch, NEW_TOKENS).expert_counts
    batch_size, prompt_len = gen_batch["input_ids"].shape
    per_layer = batch_size if kind == "mose" else batch_size * prompt_len
    assert len(prompt) == len(after) == 4
    for before, counts in zip(prompt, after):
        assert int(before.sum()) == per_layer
        assert torch.equal(before, counts)


# ---- 3. teacher forcing ---------------------------------------------------------------------------------------------


def _expected_router_choice(model, batch, hidden_from=None):
    """Independent expectation: argmax of each MoSE router on the mean of the prompt tokens entering its layer,
    taken from the hidden-state outputs (hidden_states[i] is the input of decoder layer i) of `hidden_from`: the
    model's own backbone, or another model's (the dense model, for routers reading the frozen backbone)."""
    source = hidden_from or model
    inputs = source.adapter.model_inputs(batch)
    source.layout.context.begin(batch["prompt_mask"])
    with torch.no_grad():
        out = source.backbone(**inputs, use_cache=False, output_hidden_states=True)
    expected = []
    for block in model.layout.sequence_routed:
        hidden = out.hidden_states[block.layer_index].float()
        mask = batch["prompt_mask"].float().unsqueeze(-1)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        normed = pooled / pooled.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        normed = (normed - block.router.input_shift) * block.router.input_scale
        logits = normed @ block.router.classifier.weight.float().T + block.router.classifier.bias.float()
        expected.append(logits.argmax(-1).tolist())
    return expected


@pytest.mark.parametrize("router_input", ["own_layer", "frozen_backbone"])
@pytest.mark.parametrize("teacher_forcing", [True, False])
def test_routing_follows_teacher_labels_or_router(make_config, batch, teacher_forcing, router_input, dense):
    """The router decides from the prompt's mean entering its layer: in the model as it is (own_layer) or in the
    dense backbone (frozen_backbone: the experts' perturbation must not change the routing); the labels decide
    where teacher-forced and labelled."""
    model = _perturb(build_model(make_config("moe.kind=mose", f"moe.router_input={router_input}")), seed=2)
    _spread_routers(model, batch)
    labels = batch["skill_labels"].clone()
    assert labels.shape == (4, 3) and (labels >= 0).all()
    labels[0] = -1  # an unannotated sample: the router decides for it even under teacher forcing
    routed = dict(batch, skill_labels=labels)
    with torch.no_grad():
        out = model(routed, route_source="labels" if teacher_forcing else "router")
    chain = _chain(out.routes)
    router_choice = _expected_router_choice(model, batch, dense if router_input == "frozen_backbone" else None)
    assert [level for _, level, _ in chain] == ["perception", "prediction", "planning", "planning"]
    level_index = {"perception": 0, "prediction": 1, "planning": 2}
    for (_, level, expert), from_router in zip(chain, router_choice):
        if teacher_forcing:
            expected = [from_router[0]] + labels[1:, level_index[level]].tolist()
        else:
            expected = from_router
        assert expert == expected, level
    if teacher_forcing:
        # Forcing makes a difference for this batch (else the test would not tell the two apart).
        assert any(e[1:] != c[1:] for (_, _, e), c in zip(chain, router_choice))


def test_generation_routes_by_router_even_for_a_teacher_forced_model(make_config, gen_batch):
    """Test-time skill labels are ground truth: generation must not route by them unless asked to (oracle)."""
    model = _perturb(build_model(make_config("moe.kind=mose", "moe.teacher_forcing=true", "moe.router_input=own_layer")),
                     seed=2)
    labels = gen_batch["skill_labels"]
    assert (labels >= 0).all()
    by_router = [e for _, _, e in _chain(model.generate(gen_batch, 2).routes)]
    oracle = [e for _, _, e in _chain(model.generate(gen_batch, 2, route_source="labels").routes)]
    level_index = {"perception": 0, "prediction": 1, "planning": 2}
    assert oracle == [labels[:, level_index[block.level_name]].tolist() for block in model.layout.sequence_routed]
    assert by_router != oracle
    plain = _perturb(build_model(make_config("moe.kind=mose", "moe.router_input=own_layer")), seed=2)
    assert by_router == [e for _, _, e in _chain(plain.generate(gen_batch, 2).routes)]


# ---- 4. what trains -------------------------------------------------------------------------------------------------


def _backward(model, batch):
    model.train()
    out = model(batch)
    loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
    loss.backward()
    model.eval()
    return dict(model.backbone.named_parameters())


def _has_grad(p):
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


def _check_grads_only_on_trainable(params):
    for name, p in params.items():
        if not p.requires_grad:
            assert p.grad is None, f"frozen {name} got a gradient"
    assert any(_has_grad(p) for p in params.values())


@pytest.mark.parametrize("router_trainable", [False, True])
def test_gradients_reach_only_trainable_parameters(make_config, batch, router_trainable):
    model = build_model(make_config("moe.kind=mose", f"moe.router_trainable={str(router_trainable).lower()}"))
    params = _backward(model, batch)
    _check_grads_only_on_trainable(params)
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all(".mlp." in n for n in trainable)
    routers = {n for n in params if ".mlp.router." in n}
    assert len(routers) == 8  # weight + bias of 4 routers
    for name in routers:
        assert params[name].requires_grad == router_trainable
        assert _has_grad(params[name]) == router_trainable, name
    # Shared experts and the stacked skill experts learn (the chosen experts' slices at least).
    for block_name in [n for n in trainable if n.endswith("experts.gate_up_proj")]:
        assert _has_grad(params[block_name])
    assert all(_has_grad(params[n]) for n in trainable if ".mlp.experts.shared." in n)
    # Nothing outside the MoE blocks has a gradient.
    assert not any(p.grad is not None for n, p in params.items() if ".mlp." not in n)


def test_dense_kind_trains_only_the_chosen_layers_mlp(make_config, batch):
    model = build_model(make_config("moe.kind=dense", "moe.layers=0,2"))
    params = _backward(model, batch)
    _check_grads_only_on_trainable(params)
    trainable = {n for n, p in params.items() if p.requires_grad}
    expected = {f"model.language_model.layers.{i}.mlp.{proj}.weight" for i in (0, 2)
                for proj in ("gate_proj", "up_proj", "down_proj")}
    assert trainable == expected
    assert all(_has_grad(params[n]) for n in expected)


def test_extra_trainable_patterns(make_config, batch):
    model = build_model(make_config("moe.kind=mose", "moe.extra_trainable=['*.language_model.norm.weight','*layers.1.self_attn.q_proj.*']"))
    params = _backward(model, batch)
    _check_grads_only_on_trainable(params)
    extra = {n for n, p in params.items() if p.requires_grad and ".mlp." not in n}
    assert extra == {
        "model.language_model.norm.weight",
        "model.language_model.layers.1.self_attn.q_proj.weight",
        "model.language_model.layers.1.self_attn.q_proj.bias",
    }
    assert all(_has_grad(params[n]) for n in extra)


def test_extra_trainable_pattern_over_the_language_model_keeps_the_reference_ffns_frozen(make_config):
    model = build_model(make_config("moe.kind=mose", "moe.extra_trainable=['model.language_model.*']"), meta=True)
    params = dict(model.backbone.named_parameters())
    reference = [n for n in params if ".reference_ffn." in n]
    assert reference and not any(params[n].requires_grad for n in reference)
    assert params["model.language_model.layers.0.self_attn.q_proj.weight"].requires_grad


def test_extra_trainable_pattern_matching_nothing_is_an_error(make_config):
    with pytest.raises(ConfigError, match="moe.extra_trainable"):
        build_model(make_config("moe.extra_trainable=['no_such_param*']"))


# ---- 5. save / load -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(make_config, tmp_path_factory, batch):
    model = _perturb(build_model(make_config("moe.kind=mose")), seed=3)
    with torch.no_grad():
        logits = model(batch).logits
    directory = save_model(model, tmp_path_factory.mktemp("ckpt") / "model")
    return model, directory, logits


def test_save_load_round_trip_is_bit_identical(saved, batch):
    model, directory, logits = saved
    assert sorted(os.listdir(directory)) == ["config.yaml", "model.json", "weights.safetensors"]
    loaded = load_model(directory, expected=model.cfg)
    with torch.no_grad():
        again = loaded(batch)
        before = model(batch)
    assert torch.equal(again.logits, logits)
    assert _chain(again.routes) == _chain(before.routes)


def test_saving_a_model_whose_layers_are_wrapped_as_under_fsdp(saved, batch, tmp_path):
    """FSDP and activation checkpointing wrap decoder layers and put their wrappers into parameter names; what is
    saved, the backbone fingerprint and the loaded model are the unwrapped model's, given the gathered state."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from mose_lightning.checkpoint import backbone_fingerprint, saved_tensor_names

    model, directory, logits = saved
    wrapped = copy.deepcopy(model)
    layers = wrapped.adapter.decoder_layers(wrapped.backbone)
    for i in range(len(layers)):
        layers[i] = checkpoint_wrapper(layers[i])
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.backbone.named_parameters())
    assert saved_tensor_names(wrapped) == saved_tensor_names(model)
    gathered = copy.deepcopy(model.backbone.state_dict())  # what an FSDP run gathers: clean names
    assert backbone_fingerprint(wrapped, gathered) == backbone_fingerprint(model)
    again = save_model(wrapped, tmp_path / "model", full_state=gathered)
    with torch.no_grad():
        assert torch.equal(load_model(again, expected=model.cfg)(batch).logits, logits)
    incomplete = {k: v for k, v in gathered.items() if not k.endswith("experts.down_proj")}
    with pytest.raises(KeyError, match="missing from its state"):
        save_model(wrapped, tmp_path / "broken", full_state=incomplete)
    assert not (tmp_path / "broken").exists()


def test_loading_into_a_different_architecture_names_the_key(saved, make_config):
    _, directory, _ = saved
    with pytest.raises(ConfigError, match=r"moe\.num_experts: checkpoint 4 vs config 8"):
        load_model(directory, expected=make_config("moe.kind=mose", "moe.num_experts=8"))
    with pytest.raises(ConfigError, match=r"moe\.kind"):
        load_model(directory, expected=make_config("moe.kind=topk"))


def test_loading_a_directory_without_weights_is_a_clear_error(saved, tmp_path):
    import shutil

    _, directory, _ = saved
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    (broken / "weights.safetensors").unlink()
    with pytest.raises(ConfigError, match="missing weights.safetensors"):
        load_model(broken)
    with pytest.raises(ConfigError, match="not a saved model directory"):
        load_model(tmp_path / "nothing_here")


# ---- 6. config errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("moe.no_such_key=1", r"moe\.no_such_key"),
        ("no_section.key=1", r"no_section"),
        ("moe.num_experts=many", r"moe\.num_experts"),
        ("data.batch_size=1.5", r"data\.batch_size"),
        ("moe.kind=sparse", r"key `moe\.kind`: Invalid value 'sparse', expected one of \['dense', 'topk', 'mose', 'expert_group'\]"),
        ("moe.combine=mean", r"moe\.combine"),
        ("data.overlong=crop", r"data\.overlong"),
        ("moe.top_k=5", r"moe\.top_k"),
    ],
)
def test_bad_override_names_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(PROJECT / "configs/experiment/toy_mose.yaml", [override])


def test_single_device_fsdp_in_bf16_true_is_refused_with_the_alternatives():
    toy = PROJECT / "configs/experiment/toy_mose.yaml"
    with pytest.raises(ConfigError, match=r"trainer\.strategy=fsdp with trainer\.precision=bf16-true.*bf16-mixed"):
        load_config(toy, ["trainer.strategy=fsdp", "trainer.precision=bf16-true"])
    for ok in (["trainer.strategy=fsdp", "trainer.precision=bf16-mixed"],
               ["trainer.strategy=fsdp", "trainer.precision=bf16-true", "trainer.devices=8"]):
        assert load_config(toy, ok).trainer.strategy == "fsdp"


def test_bad_yaml_value_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {PROJECT / 'configs/experiment/toy_mose.yaml'}\nmoe:\n  kind: sparse\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*moe\.kind"):
        load_config(bad)
    bad.write_text("moe:\n  num_expertz: 4\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*num_expertz"):
        load_config(bad)


TAXONOMY = """
levels:
  - name: perception
    skills:
      - {name: general, expert: 0}
      - {name: region_object, expert: 1}
  - name: prediction
    skills:
      - {name: general, expert: 0}
  - name: planning
    skills:
      - {name: general, expert: 0}
"""


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda t: t.replace("{name: region_object, expert: 1}", "{name: general, expert: 1}"),
         r"duplicate skill name 'general' in level 'perception'"),
        (lambda t: t.replace("{name: general, expert: 0}\n  - name: planning", "{name: other, expert: 0}\n  - name: planning"),
         r"level 'prediction' must have exactly one skill named 'general'"),
        (lambda t: t.replace("expert: 1}", "expert: 0}"), r"expert 0 already serves another skill"),
        (lambda t: t.replace("name: planning", "name: perception"), r"duplicate level name 'perception'"),
    ],
)
def test_taxonomy_errors_name_the_file(make_config, tmp_path, edit, pattern):
    path = tmp_path / "skills.yaml"
    path.write_text(edit(TAXONOMY))
    with pytest.raises(ConfigError, match=pattern) as info:
        build_model(make_config(f"skills.taxonomy={path}"), meta=True)
    assert str(path) in str(info.value)


def test_more_skills_than_experts_names_num_experts(make_config):
    with pytest.raises(ConfigError, match=r"4 skills but the MoSE blocks have only 3 skill experts \(moe\.num_experts\)"):
        build_model(make_config("moe.num_experts=3"), meta=True)
    # The token-level baseline does not route by skill, so the taxonomy does not bound its experts.
    build_model(make_config("moe.kind=topk", "moe.num_experts=2"), meta=True)


def test_level_allocation_must_cover_the_moe_layers(make_config):
    with pytest.raises(ConfigError, match=r"moe\.level_allocation \[1, 1, 1\] sums to 3"):
        build_model(make_config("moe.level_allocation=[1,1,1]"), meta=True)


def test_missing_taxonomy_file(make_config, tmp_path):
    with pytest.raises(ConfigError, match="skills.taxonomy"):
        build_model(make_config(f"skills.taxonomy={tmp_path / 'nope.yaml'}"), meta=True)


# ---- 7. every experiment config builds on the meta device -----------------------------------------------------------

EXPERIMENTS = sorted((PROJECT / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_config_builds_on_meta(path):
    cfg = load_config(path)
    model = build_model(cfg, meta=True)
    assert all(p.device.type == "meta" for p in model.backbone.parameters())
    report = parameter_report(model)
    assert report["kind"] == cfg.moe.kind
    assert 0 < report["trainable"] <= report["total"]
    assert report["activated"] <= report["total"]
    if cfg.moe.kind == "dense":
        assert report["moe_layers"] == 0 and report["activated"] == report["total"]
    else:
        assert report["moe_layers"] == len(model.moe_blocks) > 0
        assert report["activated"] < report["total"]


def test_coda_mose_parameter_report():
    cfg = load_config(PROJECT / "configs/experiment/coda_mose.yaml")
    report = parameter_report(build_model(cfg, meta=True))
    assert report["moe_layers"] == 14
    assert report["moe_layer_indices"] == list(range(0, 28, 2))
    assert report["levels"] == [4, 5, 5]
    assert report["activated"] < 3e9
    assert report["total"] > report["activated"]


def test_mose_params_cli_json():
    exe = PROJECT / ".venv" / "bin" / "mose"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mose_lightning.cli"]
    proc = subprocess.run(cmd + ["params", "--config", "configs/experiment/coda_mose.yaml", "--json"],
                          cwd=PROJECT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"total", "trainable", "activated", "moe_layers", "levels"} <= set(report)
    assert report["moe_layers"] == 14 and report["levels"] == [4, 5, 5]
    assert report["activated"] < 3e9 and report["trainable"] < report["total"]
    assert report == parameter_report(build_model(load_config(PROJECT / "configs/experiment/coda_mose.yaml"), meta=True))


def test_activation_checkpointing_gives_the_same_gradients(make_config, batch):
    """Decoder layers recomputed in the backward re-run the routing hooks; routes and gradients must not change."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(make_config("moe.kind=mose"))
        _perturb(model)
        model.train()
        if checkpointing:
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_importing_the_package_changes_nothing_in_the_process():
    """No environment variable set, no allocator setting changed: a freed 64 MB tensor is unmapped as glibc does
    by default (the resident size drops by it)."""
    code = (
        "import os, resource, mose_lightning, mose_lightning.cli, mose_lightning.model, torch\n"
        "def resident():\n"
        "    with open('/proc/self/statm') as f:\n"
        "        return int(f.read().split()[1]) * resource.getpagesize()\n"
        "grad = torch.empty(16 * 1024 * 1024).fill_(1.0)\n"
        "held = resident()\n"
        "del grad\n"
        "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), held - resident())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    thp, released = out.stdout.split()
    assert thp == "None" and int(released) >= 56 * 1024 * 1024, out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and Linux page-fault counts")
def test_cpu_allocator_tuning_makes_freed_memory_reused_by_later_steps():
    """After `tune_cpu_allocator()` (what CPU training commands call) huge pages are on and a 64 MB gradient-sized
    tensor freed at the end of a step stays in the process (glibc neither unmaps nor trims it), so later steps'
    tensors reuse its pages instead of faulting fresh ones in; without it glibc unmaps it on free (the resident
    size drops by it) and every step faults in every page again (at least 32: one per 2 MB huge page, more where
    the kernel falls back to 4 KiB pages).

    Which later step first reuses it is glibc's business: it pads a page-aligned request, so a freed chunk can be a
    little too small for the next one until its neighbours are free too. Beside a running test suite, 50 runs of
    16 steps allocated anew for up to seven steps after the first, then reused every step; on an idle machine at
    most the second step allocates anew. So: memory kept on free, and reuse within the 16 steps."""
    code = (
        "import os, resource, sys, torch\n"
        "from mose_lightning.cpu_memory import tune_cpu_allocator\n"
        "if sys.argv[1] == 'tuned':\n"
        "    assert tune_cpu_allocator() == {'huge_pages': True, 'keep_freed_memory': True}\n"
        "    assert os.environ['THP_MEM_ALLOC_ENABLE'] == '1'\n"
        "def resident():\n"
        "    with open('/proc/self/statm') as f:\n"
        "        return int(f.read().split()[1]) * resource.getpagesize()\n"
        "faults, released = [], []\n"
        "for step in range(16):\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    grad = torch.empty(16 * 1024 * 1024).fill_(1.0)\n"
        "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "    held = resident()\n"
        "    del grad\n"
        "    released.append(held - resident())\n"
        "print(*faults[1:])\n"
        "print(*released)\n"
    )
    mib = 1024 * 1024
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    reused = subprocess.run([sys.executable, "-c", code, "tuned"], env=env, capture_output=True, text=True, check=True)
    faults, released = (list(map(int, line.split())) for line in reused.stdout.splitlines())
    assert max(released) < 8 * mib, reused.stdout
    assert min(faults) < 32, reused.stdout
    fresh = subprocess.run([sys.executable, "-c", code, "plain"], env=env, capture_output=True, text=True, check=True)
    faults, released = (list(map(int, line.split())) for line in fresh.stdout.splitlines())
    assert min(released) >= 56 * mib, fresh.stdout
    assert min(faults) >= 32, fresh.stdout


def test_training_commands_apply_the_cpu_allocator_settings_evaluation_does_not(make_config, monkeypatch):
    from mose_lightning import cli, cpu_memory

    calls = []
    monkeypatch.setattr(cpu_memory, "tune_cpu_allocator", lambda: calls.append(1))
    cli.apply_cpu_training_settings(make_config("trainer.accelerator=cpu"))
    assert calls == [1]
    cli.apply_cpu_training_settings(make_config("trainer.accelerator=cpu", "trainer.cpu_allocator_tuning=false"))
    cli.apply_cpu_training_settings(make_config("trainer.accelerator=gpu"))
    assert calls == [1]
