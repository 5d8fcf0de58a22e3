"""Backbone adapters and the toy backbone: CPU only, no weights, a few seconds in all."""

from __future__ import annotations

import dataclasses
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image

from mose_lightning.backbones import BackboneError, get_adapter
from mose_lightning.backbones import toy as toy_mod
from mose_lightning.backbones.toy_tokenizer import IM_END, SPECIAL_TOKENS, build_toy_tokenizer, train_toy_tokenizer
from mose_lightning.config import PROJECT_ROOT, BackboneConfig, ToyBackboneConfig, load_config

QUESTION = "What should the ego car do next, and why?"
ANSWERS = [
    "Slow down: a cyclist is 12 m ahead on the right.",
    "\n Yield to the pedestrian.",  # leading blanks must not break the prefix property
    "Stop.",
    "Überholen ist verboten – keep lane 🚗",  # bytes the corpus never saw still encode
]


def image(seed: int = 0, size=(224, 126)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def toy_cfg(tmp_path_factory) -> BackboneConfig:
    return BackboneConfig(name="toy", toy_dir=str(tmp_path_factory.mktemp("toy") / "toy_backbone"))


@pytest.fixture(scope="module")
def toy(toy_cfg):
    return get_adapter("toy").load(toy_cfg)


# ---- toy: determinism, cache, round trip ------------------------------------------------------------------------


def test_tokenizer_training_is_deterministic():
    # Each training gets fresh hash seeds in the Rust trainer, so two runs in one process exercise tie breaking.
    assert train_toy_tokenizer().to_str() == train_toy_tokenizer().to_str()


def test_tokenizer_is_byte_level_with_qwen_specials():
    tok = build_toy_tokenizer()
    assert 800 <= len(tok) <= 2100
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and all(i is not None for i in ids)
    for text in ANSWERS:
        assert tok.decode(tok(text)["input_ids"]) == text
    # Special tokens are single ids, never split into bytes.
    assert tok("<|im_start|>user<|im_end|>")["input_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.eos_token == IM_END


def test_toy_build_is_deterministic_and_seeded():
    cfg = ToyBackboneConfig()
    before = torch.random.get_rng_state()
    a, _ = toy_mod.build_toy(cfg)
    b, _ = toy_mod.build_toy(cfg)
    assert torch.equal(before, torch.random.get_rng_state()), "building the toy must not move the global RNG"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    c, _ = toy_mod.build_toy(dataclasses.replace(cfg, seed=1))
    assert not torch.equal(sa["model.language_model.layers.0.mlp.up_proj.weight"],
                           c.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"])
    assert 100_000 < n_params(a) < 1_000_000


def test_toy_round_trip_gives_identical_logits(toy, toy_cfg):
    loaded, processor = toy
    fresh, _ = toy_mod.build_toy(toy_cfg.toy)
    batch = processor(text=[get_adapter("toy").build_prompt(processor, QUESTION, 1)[0]], images=[image()],
                      return_tensors="pt")
    inputs = get_adapter("toy").model_inputs(batch)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, loaded(**inputs).logits)
        again, _ = get_adapter("toy").load(toy_cfg)  # from the cache this time
        assert torch.equal(again(**inputs).logits, loaded(**inputs).logits)
    leftovers = [p for p in os.listdir(os.path.dirname(toy_cfg.toy_dir)) if ".building-" in p]
    assert not leftovers


def test_toy_config_token_ids_match_tokenizer(toy):
    model, processor = toy
    tok = processor.tokenizer
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") == processor.image_token_id
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.text_config.eos_token_id == tok.convert_tokens_to_ids(IM_END)
    assert cfg.text_config.pad_token_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert cfg.text_config.vocab_size == len(tok)


def test_killed_build_leaves_no_toy_dir(tmp_path, monkeypatch):
    cfg = BackboneConfig(name="toy", toy_dir=str(tmp_path / "toy"))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-build")

    monkeypatch.setattr(toy_mod, "toy_processor", crash)
    with pytest.raises(KeyboardInterrupt):
        toy_mod.ensure_toy_dir(cfg)
    assert os.listdir(tmp_path) == []


def test_cached_toy_of_other_sizes_is_refused(toy, toy_cfg):
    other = dataclasses.replace(toy_cfg, toy=dataclasses.replace(toy_cfg.toy, num_layers=2))
    with pytest.raises(BackboneError, match="backbone.toy_dir"):
        get_adapter("toy").load(other)


def test_invalid_toy_sizes_name_the_key():
    bad = BackboneConfig(name="toy", toy=ToyBackboneConfig(mrope_section=[4, 4, 4]))
    with pytest.raises(BackboneError, match=r"backbone\.toy\.mrope_section"):
        get_adapter("toy").build_meta(bad)


# ---- toy: processor, forward, generate, prompts --------------------------------------------------------------


@pytest.mark.parametrize("num_images", [1, 2])
def test_forward_with_images(toy, num_images):
    model, processor = toy
    adapter = get_adapter("toy")
    prompt, full = adapter.build_prompt(processor, QUESTION, num_images, "You drive carefully.", ANSWERS[0])
    batch = processor(text=[full], images=[image(i) for i in range(num_images)], return_tensors="pt")
    inputs = adapter.model_inputs(batch)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"}
    image_tokens = int((inputs["input_ids"] == adapter.image_token_id(model)).sum())
    assert image_tokens == 32 * num_images  # 224x126 -> 112x224 pixels -> 8x16 patches -> 32 merged tokens
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(out.logits).all()


def test_batched_generate(toy):
    model, processor = toy
    adapter = get_adapter("toy")
    prompts = [adapter.build_prompt(processor, q, 1)[0] for q in ("Short?", "A much longer question about the cones?")]
    batch = processor(text=prompts, images=[image(0), image(1)], padding=True, return_tensors="pt")
    out = model.generate(**adapter.model_inputs(batch), max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and 1 <= out.shape[1] - batch["input_ids"].shape[1] <= 4
    assert all(isinstance(t, str) for t in processor.batch_decode(out[:, batch["input_ids"].shape[1]:]))


def test_processor_pickles(toy):
    # DataLoader workers and spawned ranks receive the processor by pickle.
    import pickle

    _, processor = toy
    clone = pickle.loads(pickle.dumps(processor))
    prompt, _ = get_adapter("toy").build_prompt(clone, QUESTION, 1)
    a = processor(text=[prompt], images=[image()], return_tensors="pt")
    b = clone(text=[prompt], images=[image()], return_tensors="pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("num_images", [0, 1, 2])
@pytest.mark.parametrize("answer", ANSWERS)
def test_prompt_is_token_prefix_of_full_text(toy, num_images, answer):
    _, processor = toy
    prompt, full = get_adapter("toy").build_prompt(processor, QUESTION, num_images, "Be careful.", answer)
    assert full.startswith(prompt) and full.endswith(IM_END)
    images = [image(i) for i in range(num_images)] or None
    p_ids = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"][0].tolist()
    f_ids = processor(text=[full], images=images, return_tensors="pt")["input_ids"][0].tolist()
    assert f_ids[: len(p_ids)] == p_ids and len(f_ids) > len(p_ids)
    assert processor.tokenizer.decode(f_ids[len(p_ids):]) == answer.lstrip() + IM_END


def test_prompt_layout(toy):
    _, processor = toy
    prompt, full = get_adapter("toy").build_prompt(processor, "Q?", 2, None, None)
    assert full is None
    # Qwen2-VL-Instruct's layout, default system prompt included when none is given.
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + "<|vision_start|><|image_pad|><|vision_end|>" * 2
        + "Q?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_llava_default_prompt_prefix_property():
    # Without a chat template LLaVA uses MoE-LLaVA's StableLM layout; any byte-level BPE shows the prefix property.
    tok = build_toy_tokenizer()
    stand_in = types.SimpleNamespace(tokenizer=tok, image_token="<image>", chat_template=None)
    prompt, full = get_adapter("llava").build_prompt(stand_in, QUESTION, 2, None, ANSWERS[0])
    assert prompt.endswith("ASSISTANT:") and prompt.count("<image>\n") == 2
    p_ids, f_ids = tok(prompt)["input_ids"], tok(full)["input_ids"]
    assert f_ids[: len(p_ids)] == p_ids


def test_llava_templated_prompt_prefix_property(toy):
    # A LLaVA processor that carries a chat template renders both turns with it; the toy's (Qwen) template serves.
    _, processor = toy
    prompt, full = get_adapter("llava").build_prompt(processor, QUESTION, 1, "Be careful.", ANSWERS[0])
    assert full.startswith(prompt) and ANSWERS[0] in full
    p_ids = processor.tokenizer(prompt)["input_ids"]
    assert processor.tokenizer(full)["input_ids"][: len(p_ids)] == p_ids

def test_model_inputs_needs_mm_token_type_ids_with_images():
    adapter = get_adapter("qwen2_vl")
    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3),
             "pixel_values": torch.zeros(4, 1176), "image_grid_thw": torch.tensor([[1, 2, 2]]), "labels": None,
             "skill_labels": torch.zeros(1, 3)}
    with pytest.raises(BackboneError, match="mm_token_type_ids"):
        adapter.model_inputs(batch)
    batch["mm_token_type_ids"] = torch.zeros(1, 3, dtype=torch.long)
    assert set(adapter.model_inputs(batch)) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                                "mm_token_type_ids"}


# ---- real architectures on the meta device -----------------------------------------------------------------------


def qwen2_vl_2b_param_count() -> int:
    """Hand count of Qwen2-VL-2B from its published sizes (the model card says 2.2B)."""
    h, inter, layers, heads, kv, vocab = 1536, 8960, 28, 12, 2, 151936
    head_dim = h // heads
    attn = (h * h + h) + 2 * (h * kv * head_dim + kv * head_dim) + h * h  # q, k, v with bias; o without
    text = vocab * h + layers * (attn + 3 * h * inter + 2 * h) + h  # tied LM head adds nothing
    e, depth, merge = 1280, 32, 2
    patch = 3 * 2 * 14 * 14 * e  # Conv3d over (temporal 2, 14, 14) patches, no bias
    block = 2 * 2 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * 4 * e + 4 * e) + (4 * e * e + e)
    m = e * merge * merge
    merger = 2 * e + (m * m + m) + (m * h + h)
    return text + patch + depth * block + merger


def llava_stablelm_param_count() -> int:
    h, inter, layers, vocab = 2048, 5632, 24, 100352
    attn = 3 * (h * h + h) + h * h  # qkv bias, no o bias, full multi-head
    text = 2 * vocab * h + layers * (attn + 3 * h * inter + 4 * h) + 2 * h  # untied head; LayerNorms with bias
    v, v_layers, v_inter, n_pos = 1024, 24, 4096, (336 // 14) ** 2 + 1
    vision = v + 3 * 14 * 14 * v + n_pos * v + 2 * v + v_layers * (4 * (v * v + v) + (v * v_inter + v_inter)
                                                                   + (v_inter * v + v) + 4 * v) + 2 * v
    projector = (v * h + h) + (h * h + h)
    return text + vision + projector


@pytest.mark.parametrize(
    "yaml_name, expected, low, high, n_layers, wrap",
    [
        # Qwen2-VL-2B: 1.54B language model + 0.67B vision tower = 2,208,985,600.
        ("qwen2_vl_2b", qwen2_vl_2b_param_count(), 2.20e9, 2.22e9, 28, {"Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"}),
        # StableLM-2-1.6B (1.64B) + CLIP ViT-L/14-336 (0.30B) + projector = 1,954,318,336.
        ("llava_stablelm_1_6b", llava_stablelm_param_count(), 1.94e9, 1.97e9, 24,
         {"StableLmDecoderLayer", "CLIPEncoderLayer"}),
    ],
)
def test_meta_build_of_real_architectures(yaml_name, expected, low, high, n_layers, wrap):
    cfg = load_config(PROJECT_ROOT / "configs" / "backbone" / f"{yaml_name}.yaml").backbone
    adapter = get_adapter(cfg.name)
    model = adapter.build_meta(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    count = n_params(model)
    assert count == expected and low < count < high
    layers = adapter.decoder_layers(model)
    tc = adapter.text_config(model)
    assert len(layers) == tc.num_hidden_layers == n_layers
    for layer in layers:
        assert layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features == tc.intermediate_size
        assert layer.mlp.down_proj.out_features == tc.hidden_size
    assert adapter.mlp_activation(model) == "silu"
    assert adapter.image_token_id(model) < tc.vocab_size
    assert {c.__name__ for c in adapter.fsdp_wrap_classes(model)} == wrap


def test_qwen2_vl_arch_values():
    cfg = load_config(PROJECT_ROOT / "configs/backbone/qwen2_vl_2b.yaml").backbone
    c = get_adapter("qwen2_vl").build_meta(cfg).config
    assert (c.text_config.hidden_size, c.text_config.intermediate_size, c.text_config.num_attention_heads,
            c.text_config.num_key_value_heads, c.text_config.vocab_size) == (1536, 8960, 12, 2, 151936)
    assert c.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert c.text_config.rope_parameters["rope_theta"] == 1e6
    assert c.tie_word_embeddings and (c.image_token_id, c.vision_start_token_id) == (151655, 151652)
    assert (c.vision_config.depth, c.vision_config.embed_dim, c.vision_config.hidden_size) == (32, 1280, 1536)


def test_toy_meta_matches_built_toy(toy):
    model, _ = toy
    meta = get_adapter("toy").build_meta(BackboneConfig(name="toy"))
    assert n_params(meta) == n_params(model)
    assert len(get_adapter("toy").decoder_layers(meta)) == ToyBackboneConfig().num_layers


def unique_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize(
    "yaml_name, published, n_layers, inter, act, wrap",
    [
        # Totals as the model cards / safetensors indexes state them (rounded to 10M).
        ("qwen2_5_vl_3b", 3.75e9, 36, 11008, "silu", {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"}),
        ("qwen3_vl_2b", 2.13e9, 28, 6144, "silu", {"Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"}),
        ("paligemma_3b", 2.92e9, 18, 16384, "gelu_pytorch_tanh", {"GemmaDecoderLayer", "SiglipEncoderLayer"}),
        ("internvl3_2b", 2.09e9, 28, 8960, "silu", {"Qwen2DecoderLayer", "InternVLVisionLayer"}),
        ("smolvlm2_2b", 2.25e9, 24, 8192, "silu", {"LlamaDecoderLayer", "SmolVLMEncoderLayer"}),
    ],
)
def test_meta_build_of_new_backbones(yaml_name, published, n_layers, inter, act, wrap):
    cfg = load_config(PROJECT_ROOT / "configs" / "backbone" / f"{yaml_name}.yaml").backbone
    adapter = get_adapter(cfg)
    model = adapter.build_meta(cfg)
    assert abs(unique_params(model) - published) < 0.01e9
    layers, tc = adapter.decoder_layers(model), adapter.text_config(model)
    assert len(layers) == tc.num_hidden_layers == n_layers
    assert all(layer.mlp.up_proj.out_features == inter == tc.intermediate_size for layer in layers)
    assert adapter.mlp_activation(model) == act
    assert adapter.image_token_id(model) < tc.vocab_size
    assert {c.__name__ for c in adapter.fsdp_wrap_classes(model)} == wrap
    # The vision blocks are the tower's transformer layers, not the language model's.
    tower = {id(m) for m in model.get_encoder(modality="image").modules()}
    vision = adapter.vision_layers(model)
    assert len(vision) > 1 and all(id(block) in tower for block in vision)


@pytest.mark.parametrize("of", ["qwen2_5_vl", "qwen3_vl", "paligemma", "internvl", "smolvlm"])
def test_toy_of_each_family_meta_matches_the_built_toy(of):
    toy = ToyBackboneConfig(of=of)
    model, processor = toy_mod.build_toy(toy)
    cfg = BackboneConfig(name="toy", toy=toy)
    meta = get_adapter(cfg).build_meta(cfg)
    assert type(meta) is type(model) and unique_params(meta) == unique_params(model)
    assert 100_000 < unique_params(model) < 1_000_000
    # The toy tokenizer carries the real processor's placeholder: the model and processor agree on its id.
    assert get_adapter(cfg).image_token_id(model) == get_adapter(cfg).image_token_id(processor)
    assert model.config.get_text_config().vocab_size == len(processor.tokenizer)


@pytest.mark.parametrize("of", ["qwen2_5_vl", "qwen3_vl", "paligemma", "internvl", "smolvlm"])
def test_prompt_is_token_prefix_of_full_text_for_each_family(of):
    _, processor = toy_mod.build_toy(ToyBackboneConfig(of=of))
    adapter = get_adapter(BackboneConfig(name="toy", toy=ToyBackboneConfig(of=of)))
    prompt, full = adapter.build_prompt(processor, QUESTION, 1, "Be careful.", ANSWERS[1])
    p_ids = processor(text=[prompt], images=[image()], return_tensors="pt")["input_ids"][0].tolist()
    f_ids = processor(text=[full], images=[image()], return_tensors="pt")["input_ids"][0].tolist()
    assert f_ids[: len(p_ids)] == p_ids
    tail = processor.tokenizer.decode(f_ids[len(p_ids):])
    assert tail.lstrip() == ANSWERS[1].strip() + processor.tokenizer.eos_token


def test_toy_adapters_pickle_to_the_shared_instance():
    import pickle

    adapter = get_adapter(BackboneConfig(name="toy", toy=ToyBackboneConfig(of="internvl")))
    assert pickle.loads(pickle.dumps(adapter)) is adapter and adapter.name == "toy"


def test_a_vlm_whose_ffn_is_not_gated_names_what_is_missing():
    """A user's VLM whose language model has GPT-style FFNs (fc1 / fc2): experts cannot be upcycled from them, and
    the error says where it looked and what it found."""
    from torch import nn

    class FFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = nn.Linear(8, 8), FFN()

    class TextModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

    class VLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = TextModel()

        def get_decoder(self):
            return self.language_model

    with pytest.raises(BackboneError, match=r"VLM: cannot find the language model's decoder layers: looked in "
                                            r"language_model \(TextModel.*gate_proj / up_proj / down_proj.*found "
                                            r"blocks \(2 x Block, \.mlp FFN with \['fc1', 'act', 'fc2'\]\)"):
        get_adapter("qwen2_vl").decoder_layers(VLM())
    with pytest.raises(BackboneError, match="cannot find the vision tower"):
        get_adapter("qwen2_vl").vision_layers(VLM())


def test_an_ffn_computing_another_activation_than_its_config_is_refused():
    cfg = BackboneConfig(name="toy", toy=ToyBackboneConfig(of="paligemma"))
    adapter = get_adapter(cfg)
    model = adapter.build_meta(cfg)
    adapter.decoder_layers(model)[2].mlp.act_fn = torch.nn.SiLU()
    with pytest.raises(BackboneError, match=r"decoder layer 2's FFN computes SiLU.*'gelu_pytorch_tanh'"):
        adapter.mlp_activation(model)


def test_box_formats():
    from mose_lightning.backbones.boxes import convert_box, region_text

    box, size = [80, 40, 160, 120], (800, 400)  # corners (80, 40) - (240, 160)
    assert convert_box(box, size, "pixels") == [80, 40, 240, 160]
    assert convert_box(box, size, "norm1000") == [100, 100, 300, 400]
    assert convert_box(box, size, "input_pixels", input_size=(400, 300)) == [40, 30, 120, 120]
    # y before x, relative coordinates in 1024 bins: 0.1, 0.1, 0.4, 0.3 of 1023.
    assert region_text(box, size, "loc1024") == "<loc0102><loc0102><loc0409><loc0307>"
    assert region_text(box, size, "norm1000") == "[100, 100, 300, 400]"
    # A box a little past the border is clipped to the image.
    assert convert_box([790, 390, 20, 20], size, "norm1000") == [988, 975, 1000, 1000]
    with pytest.raises(ValueError, match="input_pixels needs"):
        convert_box(box, size, "input_pixels")


@pytest.mark.parametrize("of", ["qwen2_5_vl", "qwen3_vl"])
def test_region_placeholder_is_written_in_the_backbones_coordinates(of, tmp_path):
    """Qwen2.5-VL reads absolute pixels of the image as its processor resized it (checked against the patch grid
    the processor reports), Qwen3-VL 0-1000 of the image."""
    from mose_lightning.data.encode import EncodeSettings, SampleEncoder
    from mose_lightning.data.sample import Sample, encode_jpeg
    from mose_lightning.skills import load_taxonomy

    cfg = BackboneConfig(name="toy", toy=ToyBackboneConfig(of=of), toy_dir=str(tmp_path / "toy"))
    adapter = get_adapter(cfg)
    _, processor = adapter.load(cfg)
    # Stored at 224x126; the region is in pixels of the 448x252 original the converter resized.
    sample = Sample(key="k", dataset="coda_lm", task="regional", question="What is in <region>?", answer="A cone.",
                    views=["front"], images=[encode_jpeg(image())], region=[112, 56, 224, 112],
                    source={"image_size": [448, 252]})
    encoder = SampleEncoder(adapter, processor, load_taxonomy("configs/skills/driving.yaml"),
                            EncodeSettings(224, 126, 512, "skip", None, with_answer=False))
    item = encoder(sample)
    text = processor.tokenizer.decode(item["input_ids"])
    if of == "qwen2_5_vl":
        _, grid_h, grid_w = item["image_grid_thw"][0].tolist()
        w, h = grid_w * 14, grid_h * 14
        expected = [round(0.25 * w), round(56 / 252 * h), round(0.75 * w), round(168 / 252 * h)]
    else:
        expected = [250, round(56 / 252 * 1000), 750, round(168 / 252 * 1000)]
    assert "What is in [" + ", ".join(map(str, expected)) + "]?" in text


# ---- errors and configs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])
def test_missing_path_is_a_clear_error(name, tmp_path):
    with pytest.raises(BackboneError, match=r"backbone\.path: .*not set"):
        get_adapter(name).load(BackboneConfig(name=name))
    with pytest.raises(BackboneError, match=r"backbone\.path: .*not a directory"):
        get_adapter(name).load(BackboneConfig(name=name, path=str(tmp_path / "nowhere")))
    with pytest.raises(BackboneError, match=r"backbone\.path: .*no config\.json"):
        get_adapter(name).load(BackboneConfig(name=name, path=str(tmp_path)))


def test_meta_without_arch_or_path_is_a_clear_error():
    with pytest.raises(BackboneError, match=r"backbone\.arch"):
        get_adapter("qwen2_vl").build_meta(BackboneConfig(name="qwen2_vl"))


def test_arch_of_wrong_family_is_refused():
    cfg = BackboneConfig(name="qwen2_vl", arch="configs/backbone/arch/llava_stablelm_1_6b.json")
    with pytest.raises(BackboneError, match="model_type is 'llava'"):
        get_adapter("qwen2_vl").build_meta(cfg)


def test_unknown_adapter():
    with pytest.raises(BackboneError, match="backbone.name"):
        get_adapter("gpt5")


def test_backbone_yamls_are_valid():
    for path in sorted((PROJECT_ROOT / "configs" / "backbone").glob("*.yaml")):
        cfg = load_config(path)
        assert get_adapter(cfg.backbone).name == cfg.backbone.name


def test_toy_of_an_unknown_family_names_the_key():
    from mose_lightning.config import ConfigError

    with pytest.raises(ConfigError, match=r"key `backbone\.toy\.of`: Invalid value 'gpt5', expected one of \[.*'paligemma'.*\]"):
        load_config(PROJECT_ROOT / "configs" / "experiment" / "toy_mose.yaml", ["backbone.toy.of=gpt5"])


def test_the_configs_backbone_names_are_the_adapters():
    import typing

    from mose_lightning.backbones import ADAPTERS, TOY
    from mose_lightning.config import BackboneConfig, ToyBackboneConfig

    names = typing.get_args(typing.get_type_hints(BackboneConfig)["name"])
    assert sorted(names) == sorted(list(ADAPTERS) + [TOY])
    toys = typing.get_args(typing.get_type_hints(ToyBackboneConfig)["of"])
    assert sorted(toys) == sorted(n for n, a in ADAPTERS.items() if a.toy_tokens is not None)

