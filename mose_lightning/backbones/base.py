"""What the rest of the framework needs to know about a vision-language backbone, behind one interface.

Surgery, the DataModule, FSDP wrapping and `mose params` talk to `BackboneAdapter` only. Its defaults discover the
structure from the transformers model itself, so a backbone is mostly declarations (see the README's "Adding a
backbone"):
  decoder layers  the language model (`model.get_decoder()`) holds an nn.ModuleList whose items each have an
                  `.mlp` with gate_proj / up_proj / down_proj Linears: the FFNs MoE blocks replace;
  vision blocks   the vision tower (`model.get_encoder("image")`) holds the longest nn.ModuleList of one class;
  activation      the language model's config (`hidden_activation`, else `hidden_act`), checked against the
                  dense FFN's own act_fn, so the experts compute what the FFN they replace computed;
  image token     `config.image_token_id` / `image_token_index` (the processor's `image_token_id`);
  FSDP units      the classes of the decoder layers and vision blocks;
  prompt layout   the processor's chat template.
What a subclass declares: the transformers model class, its config's model_type, the processor class, the batch
keys the forward takes, and the box format the backbone reads (mose_lightning/backbones/boxes.py).
Nothing here downloads: weights come from a local directory, architectures from a config JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Set, Tuple, Type

import torch
from torch import nn

from mose_lightning.backbones.boxes import region_text
from mose_lightning.config import BackboneConfig, resolve_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BackboneError(ValueError):
    """A backbone cannot be loaded or built as configured; the message names the config key and the fix."""


def torch_dtype(cfg: BackboneConfig) -> torch.dtype:
    try:
        return DTYPES[cfg.dtype]
    except KeyError:
        raise BackboneError(f"backbone.dtype: expected one of {list(DTYPES)}, got {cfg.dtype!r}") from None


def local_weights_dir(cfg: BackboneConfig) -> Path:
    """`backbone.path` as an existing local directory with a config.json; anything else is a clear error."""
    if not cfg.path:
        raise BackboneError(
            f"backbone.path: backbone {cfg.name!r} needs a local directory with its weights, config and processor "
            "(e.g. a `huggingface-cli download` of the model); it is not set. Nothing is downloaded at run time. "
            "Use backbone.name=toy for the built-in CPU backbone, or backbone.arch for a weightless meta build."
        )
    path = resolve_path(cfg.path)
    if not path.is_dir():
        raise BackboneError(f"backbone.path: {cfg.path!r} (resolved to {path}) is not a directory")
    if not (path / "config.json").is_file():
        raise BackboneError(f"backbone.path: {path} has no config.json; expected a transformers model directory")
    return path


def read_config_dict(cfg: BackboneConfig) -> Tuple[Dict[str, Any], str]:
    """The architecture dict for a meta build: `backbone.arch` if set, else `backbone.path`/config.json."""
    if cfg.arch:
        path = resolve_path(cfg.arch)
        key = "backbone.arch"
        if not path.is_file():
            raise BackboneError(f"backbone.arch: {cfg.arch!r} (resolved to {path}) is not a file")
    elif cfg.path:
        path = local_weights_dir(cfg) / "config.json"
        key = "backbone.path"
    else:
        raise BackboneError(
            f"backbone.arch: backbone {cfg.name!r} needs an architecture to build on the meta device; set "
            "backbone.arch to a config JSON (configs/backbone/arch/*.json) or backbone.path to a model directory"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BackboneError(f"{key}: cannot read {path} as JSON: {err}") from err
    if not isinstance(data, dict):
        raise BackboneError(f"{key}: {path} must hold a JSON object, got {type(data).__name__}")
    return data, f"{key} ({path})"


def instantiate_on_meta(model_cls: type, config: Any, cfg: BackboneConfig) -> nn.Module:
    """Parameters with shapes and dtype but no storage: a 2B model costs no memory and builds in ~0.1 s."""
    with torch.device("meta"):
        return model_cls._from_config(config, dtype=torch_dtype(cfg), attn_implementation=cfg.attn_implementation)


FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _path_of(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name or "<the model>"
    return "?"


def _is_replaceable_ffn(mlp: Any) -> bool:
    """A gated FFN (gate_proj / up_proj / down_proj Linears), or one that surgery already turned into a block of
    upcycled experts (which has `experts`, as params.py reads it)."""
    if mlp is None:
        return False
    if hasattr(mlp, "experts"):
        return True
    return all(isinstance(getattr(mlp, name, None), nn.Linear) for name in FFN_PROJECTIONS)


def _describe_layers(layers: nn.ModuleList) -> str:
    first = layers[0]
    mlp = getattr(first, "mlp", None)
    if mlp is None:
        inside = f"no .mlp (children: {[n for n, _ in first.named_children()][:8]})"
    else:
        inside = f".mlp {type(mlp).__name__} with {[n for n, _ in mlp.named_children()][:8]}"
    return f"{len(layers)} x {type(first).__name__}, {inside}"


def vision_tower(model: nn.Module) -> nn.Module:
    tower = model.get_encoder(modality="image") if hasattr(model, "get_encoder") else model
    if tower is model:
        raise BackboneError(
            f"{type(model).__name__}: cannot find the vision tower: model.get_encoder(modality='image') found none "
            "of transformers' names for it (vision_tower, visual, vision_model, ...); override vision_layers() in "
            "the adapter"
        )
    return tower


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers: the first nn.ModuleList under `model.get_decoder()` whose items all
    have a replaceable `.mlp`. A model without get_decoder (or whose decoder is the model itself) is searched whole,
    the vision tower left out (Qwen2.5-VL's vision blocks have gated MLPs too)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    excluded = set()
    if decoder is model:
        try:
            excluded = {id(m) for m in vision_tower(model).modules()}
        except BackboneError:
            pass
    seen = []
    for name, module in decoder.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or id(module) in excluded:
            continue
        if all(_is_replaceable_ffn(getattr(layer, "mlp", None)) for layer in module):
            return module
        seen.append(f"{name} ({_describe_layers(module)})")
    where = _path_of(model, decoder)
    raise BackboneError(
        f"{type(model).__name__}: cannot find the language model's decoder layers: looked in {where} "
        f"({type(decoder).__name__}, from model.get_decoder()) for an nn.ModuleList whose items each have an .mlp "
        f"with {' / '.join(FFN_PROJECTIONS)} Linears (a gated FFN, which MoE experts are upcycled from); found "
        f"{'; '.join(seen) if seen else 'no nn.ModuleList'}. Override decoder_layers() in the adapter if the layers "
        "live elsewhere; an FFN of another shape cannot be upcycled into these experts"
    )


def find_vision_layers(model: nn.Module) -> nn.ModuleList:
    """The vision tower's transformer blocks: its longest nn.ModuleList whose items share one class (Qwen3-VL's
    tower also holds a short list of deepstack mergers)."""
    tower = vision_tower(model)
    best = None
    for module in tower.modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise BackboneError(
            f"{type(model).__name__}: cannot find the vision blocks: {_path_of(model, tower)} "
            f"({type(tower).__name__}) has no nn.ModuleList of one block class; override vision_layers() in the adapter"
        )
    return best


class BackboneAdapter:
    """One per backbone family; stateless, so `get_adapter` hands out shared instances.

    A transformers VLM whose layout the discovery above finds needs only the declarations below (see the
    subclasses in this package)."""

    name: str = ""
    # The `model_type` of the config.json this adapter reads, and the transformers class that builds it.
    model_type: str = ""
    model_class_name: str = ""
    # Keys of a processor output that the model's forward takes; the rest (labels, skill ids, metadata) is the
    # LightningModule's business.
    input_keys: Tuple[str, ...] = ("input_ids", "attention_mask", "pixel_values")
    # How this backbone reads a box written into text (mose_lightning/backbones/boxes.py).
    box_format: str = "pixels"
    # The toy of this family (mose_lightning/backbones/toy.py): the special tokens and chat template its tokenizer
    # carries (None: no toy), and whether backbone.toy.mrope_section applies.
    toy_tokens: Optional[Any] = None
    toy_mrope: bool = False

    # ---- construction -------------------------------------------------------------------------------------
    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.model_class_name)

    def processor_class(self) -> type:
        from transformers import AutoProcessor

        return AutoProcessor

    def load(self, cfg: BackboneConfig) -> Tuple[nn.Module, Any]:
        """(model, processor) with real weights from the local `backbone.path`, in eval mode."""
        model, path = self.from_local_weights(cfg)
        processor = self.load_processor(path)
        self.check_pair(model, processor, f"backbone.path ({path})")
        return model.eval(), processor

    def from_local_weights(self, cfg: BackboneConfig) -> Tuple[nn.Module, Path]:
        """The model class's weights from the local `backbone.path` (never the hub), in the configured dtype."""
        path = local_weights_dir(cfg)
        model = self.model_class().from_pretrained(
            str(path),
            dtype=torch_dtype(cfg),
            attn_implementation=cfg.attn_implementation,
            local_files_only=True,
        )
        return model, path

    def load_processor(self, path, key: str = "backbone.path") -> Any:
        cls = self.processor_class()
        try:
            return cls.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise BackboneError(
                f"{key}: cannot load a {self.name} processor ({cls.__name__}: tokenizer + image processor) from "
                f"{path}: {err}"
            ) from err

    def check_pair(self, model: nn.Module, processor: Any, source: str) -> None:
        model_id, proc_id = self.image_token_id(model), self.image_token_id(processor)
        if model_id != proc_id:
            raise BackboneError(
                f"{source}: the processor's image token id {proc_id} differs from the model config's {model_id}; "
                "the tokenizer does not belong to these weights"
            )

    def config_from_dict(self, data: Dict[str, Any], source: str):
        if data.get("model_type") != self.model_type:
            raise BackboneError(f"{source}: model_type is {data.get('model_type')!r}, expected {self.model_type!r}")
        return self.model_class().config_class.from_dict(data)

    def build_meta(self, cfg: BackboneConfig) -> nn.Module:
        """The model on the meta device from `backbone.arch` (or `backbone.path`'s config.json); no weights."""
        data, source = read_config_dict(cfg)
        return instantiate_on_meta(self.model_class(), self.config_from_dict(data, source), cfg)

    def toy_processor(self, tokenizer) -> Any:
        """The real processor class around the toy tokenizer, with an image processor sized for the toy."""
        raise NotImplementedError(f"backbone {self.name!r} has no toy")

    def toy_config(self, toy, tokenizer) -> Any:
        """The family's transformers config at the toy's sizes (`backbone.toy`), token ids the toy tokenizer's."""
        raise NotImplementedError(f"backbone {self.name!r} has no toy")

    # ---- structure ----------------------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The language model's decoder layers; each has `.mlp` with gate_proj / up_proj / down_proj."""
        return find_decoder_layers(model)

    def vision_layers(self, model: nn.Module) -> nn.ModuleList:
        return find_vision_layers(model)

    def inner_model(self, model: nn.Module) -> nn.Module:
        """The vision-language model under the LM head (transformers' `*ForConditionalGeneration.model`): what every
        forward and decode step passes through, and what a pass that needs hidden states only can call."""
        return model.model

    def encode_images(self, model: nn.Module, inputs: Dict[str, Any]) -> Dict[str, Any]:
        """`inputs` with the images run through the vision tower once: `pixel_values` replaced by the
        `mm_encoder_outputs` that transformers' VLM forwards (and `generate`) accept instead, so two passes over one
        batch encode its images once. Unchanged where there are no images or the model takes no encoder outputs."""
        import inspect

        base = self.inner_model(model)
        encode = getattr(base, "get_image_features", None)
        forward_args = inspect.signature(base.forward).parameters
        if inputs.get("pixel_values") is None or encode is None or "mm_encoder_outputs" not in forward_args:
            return inputs
        wanted = [k for k in inspect.signature(encode).parameters if k != "kwargs" and k in inputs]
        encoded = encode(**{k: inputs[k] for k in wanted}, return_dict=True)
        out = {k: v for k, v in inputs.items() if k != "pixel_values"}
        out["mm_encoder_outputs"] = {"image": encoded}
        return out

    def text_config(self, model: nn.Module) -> Any:
        """The language model's config (hidden_size, intermediate_size, num_hidden_layers, hidden_act, ...)."""
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        return decoder.config

    def mlp_activation(self, model: nn.Module) -> str:
        """The gate activation of the decoder FFNs (a key of transformers' ACT2FN): "silu" for SwiGLU,
        "gelu_pytorch_tanh" for Gemma's GeGLU. From the config, checked against the dense FFN's act_fn: experts
        with another activation would break upcycling equivalence silently."""
        from transformers.activations import ACT2FN

        config = self.text_config(model)
        name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        if name not in ACT2FN:
            raise BackboneError(
                f"{type(model).__name__}: the language model's config names no known FFN activation "
                f"(hidden_activation / hidden_act = {name!r})"
            )
        expected = type(ACT2FN[name])
        for index, layer in enumerate(self.decoder_layers(model)):
            act = getattr(layer.mlp, "act_fn", None)
            if act is not None and type(act) is not expected:
                raise BackboneError(
                    f"{type(model).__name__}: decoder layer {index}'s FFN computes {type(act).__name__}, but its "
                    f"config says {name!r} ({expected.__name__}); experts must use the FFN's own activation"
                )
        return str(name)

    def image_token_id(self, model_or_processor: Any) -> int:
        """The placeholder id the processor expands per image and the model fills with vision features."""
        obj = model_or_processor
        config = getattr(obj, "config", obj)
        for attr in ("image_token_id", "image_token_index"):
            value = getattr(config, attr, None)
            if isinstance(value, int):
                return value
        raise BackboneError(
            f"{type(obj).__name__}: has no image_token_id (expected a model, its config or a processor)"
        )

    def fsdp_wrap_classes(self, model: nn.Module) -> Set[Type[nn.Module]]:
        """Whole transformer blocks to shard as units; never single experts (an idle expert would hang FSDP)."""
        classes = {type(layer) for layer in self.decoder_layers(model)}
        classes |= {type(layer) for layer in self.vision_layers(model)}
        return classes

    # ---- data ---------------------------------------------------------------------------------------------
    def model_inputs(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        if "input_ids" not in batch:
            raise BackboneError(f"{self.name}: batch has no input_ids (keys: {sorted(batch)})")
        return {k: batch[k] for k in self.input_keys if k in batch and batch[k] is not None}

    def build_prompt(
        self,
        processor: Any,
        question: str,
        num_images: int,
        system: Optional[str] = None,
        answer: Optional[str] = None,
    ) -> Tuple[str, Optional[str]]:
        """(prompt_text, full_text): the user turn (images first, then the question) up to the generation prompt,
        and prompt_text + answer + end of turn (None without an answer). Tokenising prompt_text gives an exact
        prefix of tokenising full_text, so label masking can cut at len(prompt tokens).

        Laid out by the processor's chat template; the answer turn is rendered by it too and must extend the
        prompt. Leading and trailing blanks of the answer carry nothing (and a leading newline could merge with
        the generation prompt's into one token); what the template writes after the end of turn is cut, since
        the model stops there and should not be trained on it."""
        if num_images < 0:
            raise ValueError(f"num_images: expected >= 0, got {num_images}")
        messages = []
        if system is not None:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if answer is None:
            return prompt, None
        reply = {"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]}
        full = processor.apply_chat_template(messages + [reply], tokenize=False, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise BackboneError(
                f"{self.name}: the processor's chat template renders the answer turn without the generation prompt "
                "as its prefix, so prompt tokens cannot be masked by length; override build_prompt in the adapter"
            )
        return prompt, full.rstrip()

    def input_image_size(self, processor: Any, width: int, height: int) -> Tuple[int, int]:
        """(width, height) of an image of this size as the vision tower sees it (after the processor's resize)."""
        return width, height

    def region_text(self, processor: Any, box: Sequence[float], image_size: Tuple[int, int],
                    encoded_size: Tuple[int, int]) -> str:
        """A region [x, y, w, h] in pixels of an image of `image_size` (the data's convention), written as this
        backbone reads boxes; `encoded_size` is the image's size when it is handed to the processor."""
        return region_text(box, image_size, self.box_format, self.input_image_size(processor, *encoded_size))

    # ---- camera-view routing (mose_lightning/views.py): images encoded on their own, prompts assembled per batch --
    def image_tokens_per_image(self, model: nn.Module, pixel_values: torch.Tensor,
                               grid_thw: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The language-model input tokens of each image, (tokens_i, hidden) per image, from the vision tower."""
        raise BackboneError(f"backbone {self.name!r}: camera-view routing (views.enabled) is not supported; "
                            "use backbone.name=qwen2_vl or toy")

    def view_prompt_pieces(self, processor: Any, question: str, system: Optional[str] = None,
                           answer: Optional[str] = None) -> Dict[str, list]:
        """Token ids of a multi-image prompt around its images: `prefix` (up to the first image), `suffix` (after
        the last image, up to the generation prompt), `answer` (answer + end of turn; empty without an answer), and
        `image_start`, `image_pad`, `image_end`: one image is image_start + image_pad x its tokens + image_end."""
        raise BackboneError(f"backbone {self.name!r}: camera-view routing (views.enabled) is not supported; "
                            "use backbone.name=qwen2_vl or toy")

    def precomputed_image_inputs(self, features: Tuple[torch.Tensor, ...], grid_thw: torch.Tensor) -> Dict[str, Any]:
        """Forward / generate keyword arguments that hand already-encoded image tokens (in placeholder order) to the
        model instead of pixels."""
        raise BackboneError(f"backbone {self.name!r}: camera-view routing (views.enabled) is not supported")

