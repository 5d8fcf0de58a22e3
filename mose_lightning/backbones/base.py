"""What the rest of the framework needs to know about a vision-language backbone, behind one interface.

Surgery, the DataModule, FSDP wrapping and `mose params` talk to `BackboneAdapter` only, so a backbone is added by
writing one subclass: where the decoder layers live, which batch keys the forward takes, how a prompt is laid out.
Nothing here downloads: weights come from a local directory, architectures from a config JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Set, Tuple, Type

import torch
from torch import nn

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


def submodule(model: nn.Module, candidates: Iterable[str], what: str) -> nn.Module:
    """The first dotted path that exists; transformers moved these between major versions."""
    candidates = list(candidates)
    for name in candidates:
        try:
            return model.get_submodule(name)
        except AttributeError:
            continue
    raise BackboneError(f"{type(model).__name__}: cannot find the {what}; looked for {candidates}")


class BackboneAdapter:
    """One per backbone family; stateless, so `get_adapter` hands out shared instances."""

    name: str = ""

    # ---- construction -------------------------------------------------------------------------------------
    def load(self, cfg: BackboneConfig) -> Tuple[nn.Module, Any]:
        """(model, processor) with real weights from the local `backbone.path`, in eval mode."""
        raise NotImplementedError

    def build_meta(self, cfg: BackboneConfig) -> nn.Module:
        """The model on the meta device from `backbone.arch` (or `backbone.path`'s config.json); no weights."""
        raise NotImplementedError

    def model_class(self) -> type:
        raise NotImplementedError

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

    # ---- structure ----------------------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The language model's decoder layers; each has `.mlp` with gate_proj / up_proj / down_proj."""
        raise NotImplementedError

    def vision_layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

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
        return model.config.text_config

    def mlp_activation(self, model: nn.Module) -> str:
        """Name of the SwiGLU gate activation (a key of transformers' ACT2FN), e.g. "silu"."""
        return str(self.text_config(model).hidden_act)

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
    # Keys of a processor output that the model's forward takes; the rest (labels, skill ids, metadata) is the
    # LightningModule's business.
    input_keys: Tuple[str, ...] = ("input_ids", "attention_mask", "pixel_values")

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
        prefix of tokenising full_text, so label masking can cut at len(prompt tokens)."""
        raise NotImplementedError

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

