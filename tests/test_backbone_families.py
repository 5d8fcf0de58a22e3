"""The toy of every backbone family beside Qwen2-VL (whose toy tests/test_model.py and test_stages.py cover in
depth): the same guarantees on each real transformers class.

Per family: upcycling equivalence (logits and generated tokens equal the dense model's), skill routing from the
frozen backbone's and from the model's own hidden states, generation with routing reuse equal to re-routing every
step, images encoded once for the reference pass and the forward, a save/load round trip, one `mose sft` step
through the CLI, and label masking from the processor's own image-token expansion. Batches come from the shared synthetic shards through
the DataModule; two or four samples, a few new tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mose_lightning import cli
from mose_lightning.checkpoint import load_model, save_model
from mose_lightning.data.datamodule import DriveDataModule
from mose_lightning.model import build_model
from mose_lightning.moe import MoSEBlock

from test_model import _chain, _perturb, _spread_routers

TOY_YAML = Path(__file__).resolve().parent.parent / "configs" / "experiment" / "toy_mose.yaml"
FAMILIES = ["qwen2_5_vl", "qwen3_vl", "paligemma", "internvl", "smolvlm"]
NEW_TOKENS = 4


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, make_config, tmp_path_factory):
    """Everything the tests of one family share: its config maker, the dense toy, batches and dense outputs."""
    of = request.param
    toy_dir = tmp_path_factory.mktemp(f"toy_{of}") / "toy"
    overrides = [f"backbone.toy.of={of}", f"backbone.toy_dir={toy_dir}", "data.batch_size=2",
                 "data.eval_batch_size=4"]

    def config(*more):
        return make_config(*overrides, *more)

    dense = build_model(config("moe.kind=dense"))
    dm = DriveDataModule(dense.cfg.data, dense.adapter, dense.processor, dense.taxonomy)
    batch = next(iter(dm.val_dataloader()))
    gen_batch = next(iter(dm.generation_dataloader("test")))
    with torch.no_grad():
        logits = dense(batch).logits
    tokens = dense.generate(gen_batch, NEW_TOKENS).tokens
    return {"of": of, "config": config, "overrides": overrides, "dense": dense, "batch": batch,
            "gen_batch": gen_batch, "logits": logits, "tokens": tokens}


def test_toy_is_the_real_class(family):
    import transformers

    dense = family["dense"]
    assert type(dense.backbone) is getattr(transformers, dense.adapter.model_class_name)
    assert dense.adapter.model_type == dense.backbone.config.model_type
    assert type(dense.processor).__name__.endswith("ImageTextProcessor")


def test_labels_cover_exactly_the_answer(family):
    """The prompt length comes from the processor's expansion of the image placeholders (tile markers and
    <img> frames included): the unmasked labels are the answer and the end of turn, nothing of the prompt (SmolVLM's
    answer turn starts with the blank after "Assistant:")."""
    batch, tok = family["batch"], family["dense"].processor.tokenizer
    for row, meta in enumerate(batch["meta"]):
        answer = batch["labels"][row] != -100
        assert tok.decode(batch["labels"][row][answer]).lstrip() == meta["answer"].strip() + tok.eos_token
        assert not batch["prompt_mask"][row][answer].any()


def test_upcycled_toy_computes_the_dense_model(family):
    model = build_model(family["config"]("moe.kind=mose"))
    assert len(model.moe_blocks) == 4 and all(type(b) is MoSEBlock for b in model.moe_blocks)
    assert all(b.experts.activation == model.adapter.mlp_activation(model.backbone) for b in model.moe_blocks)
    with torch.no_grad():
        logits = model(family["batch"]).logits
    torch.testing.assert_close(logits, family["logits"], atol=1e-5, rtol=1e-5)
    assert torch.equal(model.generate(family["gen_batch"], NEW_TOKENS).tokens, family["tokens"])


@pytest.mark.parametrize("family", ["paligemma"], indirect=True)
@pytest.mark.parametrize("kind", ["topk", "expert_group"])
def test_every_block_kind_upcycles_geglu_exactly(family, kind):
    """Gemma's tanh-GELU experts take the per-expert loop (not the fused silu kernel) in every block kind."""
    model = build_model(family["config"](f"moe.kind={kind}"))
    assert all(b.experts.activation == "gelu_pytorch_tanh" for b in model.moe_blocks)
    with torch.no_grad():
        torch.testing.assert_close(model(family["batch"]).logits, family["logits"], atol=1e-5, rtol=1e-5)
    assert torch.equal(model.generate(family["gen_batch"], NEW_TOKENS).tokens, family["tokens"])


def test_encoded_images_give_the_forward_the_same_features(family):
    """The reference pass and the forward share one run of the vision tower (adapter.encode_images): the inner
    model's hidden states equal those of a forward that encodes `pixel_values` itself."""
    dense = family["dense"]
    inputs = dense.adapter.model_inputs(family["batch"])
    encoded = dense.adapter.encode_images(dense.backbone, dict(inputs))
    assert "pixel_values" not in encoded and "mm_encoder_outputs" in encoded
    inner = dense.adapter.inner_model(dense.backbone)
    assert inner is not dense.backbone and dense.adapter.decoder_layers(dense.backbone)[0] in inner.modules()
    with torch.no_grad():
        own = inner(**inputs, use_cache=False).last_hidden_state
        shared = inner(**encoded, use_cache=False).last_hidden_state
    torch.testing.assert_close(shared, own, atol=1e-6, rtol=1e-6)


def _layer_inputs(model, batch):
    """The hidden states entering each decoder layer in a plain forward of `model` (forward pre-hooks)."""
    seen = {}

    def record(index):
        def hook(module, args, kwargs):
            seen.setdefault(index, (args[0] if args else kwargs["hidden_states"]).detach())
        return hook

    layers = model.adapter.decoder_layers(model.backbone)
    hooks = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(batch, with_loss=False)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _expected_choice(model, hidden, prompt_mask):
    """Independent expectation: argmax of each router on the RMS-normalised, standardised mean of the prompt
    tokens entering its layer."""
    expected = []
    mask = prompt_mask.float().unsqueeze(-1)
    for block in model.layout.sequence_routed:
        pooled = (hidden[block.layer_index].float() * mask).sum(1) / mask.sum(1)
        normed = pooled / pooled.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        normed = (normed - block.router.input_shift) * block.router.input_scale
        logits = normed @ block.router.classifier.weight.float().T + block.router.classifier.bias.float()
        expected.append(logits.argmax(-1).tolist())
    return expected


@pytest.mark.parametrize("router_input", ["frozen_backbone", "own_layer"])
def test_routers_read_the_frozen_backbone_or_their_own_layer(family, router_input):
    """frozen_backbone (the default): the routers read the dense model's hidden states, so perturbed experts do not
    move them; own_layer: the hidden states of the model as it is."""
    batch = family["batch"]
    model = _spread_routers(_perturb(build_model(family["config"]("moe.kind=mose", f"moe.router_input={router_input}")),
                                     seed=2), batch)
    with torch.no_grad():
        chain = _chain(model(batch, with_loss=False).routes)
    source = family["dense"] if router_input == "frozen_backbone" else model
    expected = _expected_choice(model, _layer_inputs(source, batch), batch["prompt_mask"])
    assert [expert for _, _, expert in chain] == expected
    assert [level for _, level, _ in chain] == ["perception", "prediction", "planning", "planning"]
    if router_input == "own_layer":
        # The perturbed experts move the later layers' inputs: the two sources are told apart.
        dense_inputs, own_inputs = _layer_inputs(family["dense"], batch), _layer_inputs(model, batch)
        assert not torch.allclose(dense_inputs[3], own_inputs[3])


@pytest.fixture(scope="module")
def perturbed(family):
    model = _spread_routers(_perturb(build_model(family["config"]("moe.kind=mose"))), family["gen_batch"])
    with torch.no_grad():
        logits = model(family["batch"]).logits
    return model, logits


def test_cached_generation_matches_rerouting_every_step(family, perturbed):
    model, logits = perturbed
    # The perturbed experts change the model's function, so equal tokens below are not explained by equal experts.
    assert (logits - family["logits"]).abs().max() > 1e-3
    cached = model.generate(family["gen_batch"], NEW_TOKENS)
    rerouted = model.generate(family["gen_batch"], NEW_TOKENS, reroute_every_step=True)
    assert len(cached.routes) == 4
    assert torch.equal(cached.tokens, rerouted.tokens)
    assert _chain(cached.routes) == _chain(rerouted.routes)


def test_save_load_round_trip_is_bit_identical(family, perturbed, tmp_path):
    model, logits = perturbed
    loaded = load_model(save_model(model, tmp_path / "model"), expected=model.cfg)
    assert type(loaded.backbone) is type(model.backbone)
    with torch.no_grad():
        assert torch.equal(loaded(family["batch"]).logits, logits)


def test_one_sft_step_through_the_cli(family, tmp_path):
    run_dir = tmp_path / "sft"
    data = family["dense"].cfg.data
    shards = [f"data.{split}_shards={getattr(data, f'{split}_shards')}" for split in ("train", "val", "test")]
    # Teacher-forced routing: the step needs no router pretraining first.
    cli.main(["sft", "--config", str(TOY_YAML), *family["overrides"], *shards, "backbone.init_checkpoint=null",
              "moe.router_checkpoint=null", "moe.teacher_forcing=true", f"run_dir={run_dir}", "trainer.max_steps=1",
              "trainer.val_every_n_steps=1", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
              "data.num_workers=0", "data.shuffle_buffer=8"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 1 and math.isfinite(metrics["train/loss"])
    trained = load_model(run_dir / "model")
    assert trained.cfg.backbone.toy.of == family["of"]
    before = build_model(family["config"]("moe.kind=mose")).moe_blocks[0].experts.down_proj
    assert not torch.equal(trained.moe_blocks[0].experts.down_proj, before)


@pytest.mark.parametrize("family", ["paligemma"], indirect=True)
def test_paligemma_prefix_is_bidirectional_and_the_answer_causal(family):
    """PaliGemma's token_type_ids come from the prompt mask: changing the last answer tokens changes no logit
    before them (with the processor's all-zero token types the whole sequence would be one bidirectional prefix
    and the answer would see its own future)."""
    model, batch = family["dense"], family["batch"]
    changed = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}
    row = 0
    answer = (batch["labels"][row] != -100).nonzero().flatten()
    cut = int(answer[-2])  # the answer's last two tokens (its end and <eos>) get other ids
    changed["input_ids"][row, cut:int(answer[-1]) + 1] = 5
    with torch.no_grad():
        a, b = model(batch).logits[row], model(changed).logits[row]
    assert torch.equal(a[:cut], b[:cut])
    assert not torch.equal(a[cut:], b[cut:])
