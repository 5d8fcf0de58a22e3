"""The one typed configuration schema of the framework.

Plain dataclasses (litgpt style) merged with OmegaConf: a YAML file, then `key=value` overrides from the command
line. OmegaConf rejects unknown keys and wrong types against the schema; `__post_init__` checks the values that
a type cannot express (enumerations, ranges). Every error is re-raised as `ConfigError` naming the file, the key
and what was expected.

An experiment YAML may start with `base: other.yaml` (resolved relative to the file) to inherit and override.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Literal, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mose_lightning.io import atomic_write_text

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and what was expected."""


def _choice(section: str, key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{key}: expected one of {list(allowed)}, got {value!r}")


def _positive(section: str, key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{section}.{key}: expected a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def _at_least(section: str, key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{section}.{key}: expected an integer >= {low}, got {value!r}")


def _fraction(section: str, key: str, value: float, upper_open: bool = False) -> None:
    if not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        raise ConfigError(f"{section}.{key}: expected a number in [0, 1{')' if upper_open else ']'}, got {value!r}")


_DEVICE_LIST = re.compile(r"^\[?\s*\d+\s*(,\s*\d+\s*)*,?\s*\]?$")


def _devices(value: str) -> None:
    """What Lightning's Trainer accepts as `devices`: auto, a count (-1: all), or device indices."""
    text = str(value).strip()
    if text == "auto" or text == "-1" or (text.isdigit() and int(text) > 0):
        return
    if "," in text or text.startswith("["):
        if _DEVICE_LIST.match(text):
            return
    raise ConfigError(f"trainer.devices: expected a positive number of devices, -1 (all), auto, or device indices "
                      f"like 0,1 or [0,1], got {value!r}")


@dataclass
class ToyBackboneConfig:
    """Architecture of the tiny randomly initialised backbone used on CPU (the real model's class)."""

    # The family the toy is a copy of (every adapter with toy_tokens: tests check the list against them).
    of: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "paligemma", "internvl", "smolvlm"] = "qwen2_vl"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_embed_dim: int = 32
    vision_heads: int = 2
    # The Qwen families' multimodal rope splits head_dim/2 into (temporal, height, width) sections.
    mrope_section: List[int] = field(default_factory=lambda: [2, 3, 3])
    seed: int = 0


@dataclass
class BackboneConfig:
    # An adapter of mose_lightning/backbones (tests check the list against them), or toy: a tiny copy of `toy.of`.
    # Listed here rather than read from the adapters so that reading a config never imports torch.
    name: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "paligemma", "internvl", "smolvlm", "llava", "toy"] = "toy"
    # Local directory with weights, config and processor (all but toy). Never a hub id: nothing is downloaded.
    path: Optional[str] = None
    # A transformers config JSON with the architecture only, used to build the model on the meta device
    # (`mose params`) when no weights are at hand. Relative paths resolve against the project root.
    arch: Optional[str] = None
    # Where the toy backbone (weights + tokenizer + processor) is cached once built.
    toy_dir: str = "artifacts/toy_backbone"
    toy: ToyBackboneConfig = field(default_factory=ToyBackboneConfig)
    # float32 | bfloat16 | float16: dtype the frozen weights are loaded in.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    # Optional checkpoint (a directory written by mose_lightning.checkpoint) whose backbone weights replace the
    # fresh ones, e.g. the toy backbone after a brief dense instruction tuning.
    init_checkpoint: Optional[str] = None
    # Toy only: the experiment config whose dense run creates init_checkpoint when it is missing (empty:
    # configs/experiment/toy_instruct.yaml, instruction tuning on the driving tasks themselves).
    init_config: Optional[str] = None


@dataclass
class MoEConfig:
    # dense | topk | mose | expert_group: the four model variants of the paper's Table 1.
    kind: Literal["dense", "topk", "mose", "expert_group"] = "mose"
    # Which decoder layers get an MoE block: "even" (0, 2, ...), "odd", "all", or an explicit list like "0,4,8".
    layers: str = "even"
    # Consecutive MoE layers per hierarchy level (perception, prediction, planning); must sum to the layer count.
    # Empty: split as evenly as possible, later levels taking the remainder.
    level_allocation: List[int] = field(default_factory=lambda: [4, 5, 5])
    # Skill experts per MoSE block (MoSE) or routed experts (topk).
    num_experts: int = 4
    # Experts per token for topk.
    top_k: int = 1
    shared_expert: bool = True
    # How shared and routed outputs combine (see mose_lightning/moe/blocks.py for why):
    #   weighted: shared_weight * shared(x) + (1 - shared_weight) * expert(x); experts are copies of the dense FFN,
    #             so at initialisation the block computes the dense function exactly.
    #   sum:      shared(x) + expert(x) with the routed experts' down projection starting at zero (a zero delta).
    combine: Literal["weighted", "sum"] = "weighted"
    shared_weight: float = 0.5
    # MoSE training: route by the sample's skill labels instead of the router's choice (where a sample has them).
    # Evaluation always routes by the routers.
    teacher_forcing: bool = False
    router_trainable: bool = False
    # Coefficient of the skill cross-entropy of every skill router during SFT, on the samples that carry skill
    # labels (0: off). Needs router_trainable; keeps the routers on their skills while the experts change.
    router_skill_loss: float = 0.0
    # What the skill routers read (docs/routing.md has the measurements behind the default):
    #   frozen_backbone: T_mean entering their own layer in the backbone as router pretraining saw it, from a no-grad
    #                    pass through the dense FFNs the MoE blocks replaced, before each forward and generation
    #                    (frozen copies of those FFNs; one more forward per training step and per prompt);
    #   own_layer:       T_mean entering their own layer in the model as it is (fine-tuning the MoE blocks of earlier
    #                    layers shifts it away from what the routers were pretrained on);
    #   first_moe_layer: every router reads T_mean entering the first MoSE layer (no extra cost; nothing before
    #                    that layer trains, but the features are shallower).
    router_input: Literal["own_layer", "first_moe_layer", "frozen_backbone"] = "frozen_backbone"
    # Learning rate of the skill routers when they train during SFT (0: optim.lr).
    router_lr: float = 0.0
    # While fine-tuning, each router's input standardisation follows the training batches' mean (an exponential
    # moving average with this momentum; 0: fixed at the router-pretraining statistics).
    router_recentre_momentum: float = 0.0
    # Router pretraining checkpoint (routers.pt) that SFT loads into the MoSE routers.
    router_checkpoint: Optional[str] = None
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    # auto | grouped_mm | loop: expert matmul dispatch. auto takes the per-expert loop, and grouped_mm on CUDA bf16
    # SM90+ for more than 8 experts (see mose_lightning/moe/experts.py for the measurements).
    dispatch: Literal["auto", "grouped_mm", "loop"] = "auto"
    # Extra parameters to train besides the MoE blocks: fnmatch patterns over parameter names.
    extra_trainable: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _positive("moe", "router_skill_loss", self.router_skill_loss, allow_zero=True)
        _positive("moe", "router_lr", self.router_lr, allow_zero=True)
        if not 0.0 <= self.router_recentre_momentum < 1.0:
            raise ConfigError(f"moe.router_recentre_momentum: expected a number in [0, 1), got {self.router_recentre_momentum!r}")
        if self.router_skill_loss > 0 and not self.router_trainable:
            raise ConfigError("moe.router_skill_loss > 0 trains the skill routers: set moe.router_trainable=true too")
        if not 0.0 <= self.shared_weight < 1.0:
            raise ConfigError(f"moe.shared_weight: expected a number in [0, 1), got {self.shared_weight!r}")
        if self.num_experts < 1:
            raise ConfigError(f"moe.num_experts: expected >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"moe.top_k: expected 1 <= top_k <= num_experts ({self.num_experts}), got {self.top_k}")
        _positive("moe", "aux_loss_coef", self.aux_loss_coef, allow_zero=True)
        _positive("moe", "z_loss_coef", self.z_loss_coef, allow_zero=True)
        if any(n <= 0 for n in self.level_allocation):
            raise ConfigError(f"moe.level_allocation: expected positive layer counts, got {list(self.level_allocation)}")


@dataclass
class SkillsConfig:
    # YAML file with the hierarchy levels and their skills (configs/skills/driving.yaml).
    taxonomy: str = "configs/skills/driving.yaml"


@dataclass
class SyntheticSetConfig:
    """Size, seed and image size of a procedurally generated set (data_recipes/synthetic.py) that the toy make
    targets create when it is missing."""

    out_dir: str = "artifacts/data/synthetic"
    num_train: int = 1200
    num_val: int = 150
    num_test: int = 150
    seed: int = 0
    image_width: int = 224
    image_height: int = 126

    # Which config section this is, for error messages.
    _section = "data.synthetic"

    def __post_init__(self) -> None:
        for key in ("num_train", "num_val", "num_test"):
            _at_least(self._section, key, getattr(self, key), 0)
        if self.image_width < 64 or self.image_height < 36:
            raise ConfigError(f"{self._section}.image_width/image_height: expected at least 64x36 (objects must stay "
                              f"readable), got {self.image_width}x{self.image_height}")


@dataclass
class SyntheticConfig(SyntheticSetConfig):
    """The single-view driving set."""

    # Add each scene's future ego trajectory, ego state, navigation command and scenario label (the `planning`
    # field, see data_recipes/synthetic.py); the planner stage needs it.
    trajectories: bool = False
    # Question family (data_recipes/synthetic.py): driving (the CODA-LM-style tasks, annotated with skills) or
    # perception (what is where in the same scenes, no skills; the miniature's backbone preparation).
    family: Literal["driving", "perception"] = "driving"


@dataclass
class DataConfig:
    # Shard lists: a path, a brace pattern (data/train-{000000..000009}.tar), a comma-separated list, or any URL
    # WebDataset opens. Empty train_shards with the toy default means "create the synthetic set".
    train_shards: str = ""
    val_shards: str = ""
    test_shards: str = ""
    # Images are resized to (width, height) before the processor (paper: 800x450).
    image_width: int = 800
    image_height: int = 450
    # Tokens per sample after the processor; longer samples follow `overlong`.
    max_length: int = 2048
    # skip: drop and count the sample | truncate_prompt: cut question text tokens from the left (never the
    # answer, never image tokens) until it fits, counted.
    overlong: Literal["skip", "truncate_prompt"] = "skip"
    batch_size: int = 4
    eval_batch_size: int = 8
    num_workers: int = 0
    shuffle_buffer: int = 256
    # Samples each rank draws per training epoch (resampled shards keep ranks in step). 0: the dataset size / world.
    samples_per_epoch: int = 0
    # Ablation: every view replaced by a uniform gray image, i.e. a model that cannot see (the synthetic task's
    # check that answers need the image).
    blank_images: bool = False
    # Train on the first N training samples only (data-scaling experiments, paper Fig. 8). 0: all.
    train_limit: int = 0
    seed: int = 0
    # Use the red-box image encoding for regional questions (the sample already carries it when converted).
    system_prompt: str = "You are a careful driving assistant."
    # Check each shard's sha256 against its manifest before reading it: eval (validation, evaluation and router
    # inputs) | always (training too) | never. Sample counts are always checked.
    verify_checksums: Literal["eval", "always", "never"] = "eval"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        for key in ("image_width", "image_height", "max_length", "batch_size", "eval_batch_size"):
            _positive("data", key, getattr(self, key))
        for key in ("num_workers", "shuffle_buffer", "samples_per_epoch", "train_limit"):
            _at_least("data", key, getattr(self, key), 0)


@dataclass
class OptimConfig:
    # AdamW (the paper's), with a warm-up and a schedule.
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    # cosine | constant | linear, after a linear warm-up.
    scheduler: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _positive("optim", "lr", self.lr)
        _positive("optim", "weight_decay", self.weight_decay, allow_zero=True)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas: expected two numbers in [0, 1) like [0.9, 0.999], got {list(self.betas)}")
        _fraction("optim", "warmup_ratio", self.warmup_ratio)
        _fraction("optim", "min_lr_ratio", self.min_lr_ratio)


@dataclass
class TrainerConfig:
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = "auto"
    devices: str = "1"
    num_nodes: int = 1
    # auto | ddp | ddp_spawn | fsdp | deepspeed is not supported on purpose (see README).
    strategy: Literal["auto", "ddp", "ddp_spawn", "fsdp", "single_device"] = "auto"
    # 32-true | bf16-mixed | 16-mixed | bf16-true
    precision: str = "32-true"
    max_steps: int = 200
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 1.0
    log_every_n_steps: int = 10
    val_every_n_steps: int = 100
    limit_val_batches: int = 0
    checkpoint_every_n_steps: int = 50
    activation_checkpointing: bool = False
    # stop | skip: what a non-finite loss does.
    nonfinite: Literal["stop", "skip"] = "stop"
    seed: int = 0
    # torch intra-op threads per process; 0 keeps torch's default. Tiny models (the toy) run faster on one thread.
    num_threads: int = 0
    # Training on a CPU: huge pages for large allocations and glibc keeping freed memory for reuse
    # (mose_lightning/cpu_memory.py has what each costs). Applied by the command line before the model is built;
    # never for evaluation or on GPUs.
    cpu_allocator_tuning: bool = True

    def __post_init__(self) -> None:
        _devices(self.devices)
        _choice("trainer", "precision", self.precision, ["32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"])
        _positive("trainer", "max_steps", self.max_steps)
        for key in ("num_nodes", "accumulate_grad_batches", "log_every_n_steps", "val_every_n_steps",
                    "checkpoint_every_n_steps"):
            _at_least("trainer", key, getattr(self, key), 1)
        for key in ("limit_val_batches", "num_threads"):
            _at_least("trainer", key, getattr(self, key), 0)
        _positive("trainer", "gradient_clip_val", self.gradient_clip_val, allow_zero=True)
        if self.strategy == "fsdp" and self.precision == "bf16-true" and str(self.devices) == "1" and self.num_nodes == 1:
            # Measured on an H100 (torch 2.11): FSDP on one device runs unsharded, and its parameter views then
            # break on the tied embeddings of Qwen2-VL after the first forward. bf16-mixed runs there.
            raise ConfigError(
                "trainer.strategy=fsdp with trainer.precision=bf16-true on one device fails inside torch FSDP "
                "(unsharded flat parameters with tied embeddings): use trainer.precision=bf16-mixed, or "
                "trainer.strategy=auto on a single GPU"
            )


@dataclass
class RouterPretrainConfig:
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    # Train on per-feature standardised router inputs, folded into the saved Linear afterwards (see
    # RouterPretrainModule): much faster convergence; the saved router computes the same function either way.
    standardize: bool = True
    # Fraction of the training samples held out for accuracy/confusion when no val_shards are given.
    holdout_fraction: float = 0.0
    # Limit the annotated samples used (the paper finds ~2000 enough). 0: all.
    max_samples: int = 0
    cache_dir: str = "artifacts/router_cache"

    def __post_init__(self) -> None:
        _at_least("router_pretrain", "epochs", self.epochs, 1)
        _at_least("router_pretrain", "batch_size", self.batch_size, 1)
        _at_least("router_pretrain", "max_samples", self.max_samples, 0)
        _positive("router_pretrain", "lr", self.lr)
        _positive("router_pretrain", "weight_decay", self.weight_decay, allow_zero=True)
        _fraction("router_pretrain", "holdout_fraction", self.holdout_fraction, upper_open=True)


@dataclass
class LLMClientConfig:
    """An OpenAI-compatible chat endpoint (OpenAI itself, a local vLLM, ...)."""

    model: str = "gpt-4o"
    base_url: Optional[str] = None
    # Name of the environment variable holding the key; the key itself never enters a config or a log.
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 512
    max_concurrency: int = 8
    max_retries: int = 5
    timeout_s: float = 60.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0
    cache_dir: str = "artifacts/llm_cache"

    def check(self, section: str) -> None:
        """Range checks, named under `section` (the same client config sits under eval.judge and annotate)."""
        _positive(section, "temperature", self.temperature, allow_zero=True)
        _at_least(section, "max_tokens", self.max_tokens, 1)
        _at_least(section, "max_concurrency", self.max_concurrency, 1)
        _at_least(section, "max_retries", self.max_retries, 0)
        _positive(section, "timeout_s", self.timeout_s)
        _positive(section, "backoff_base_s", self.backoff_base_s, allow_zero=True)
        _positive(section, "backoff_max_s", self.backoff_max_s, allow_zero=True)


@dataclass
class JudgeConfig:
    enabled: bool = False
    client: LLMClientConfig = field(default_factory=lambda: LLMClientConfig(model="gpt-4o-2024-05-13"))
    # Directory with system prompts (general.txt, regional.txt, suggestion.txt, drivelm.txt) and few-shot JSON
    # files; the shipped defaults live in mose_lightning/resources/judge.
    prompts_dir: Optional[str] = None
    # Times an unparsable reply is asked again before it counts as a failure.
    parse_retries: int = 2
    # An unreachable judge (connection refused, timeouts after every retry) stops the evaluation with an error
    # naming client.base_url; true: evaluate without the judge's scores (results.md says why they are missing).
    allow_unreachable: bool = False


@dataclass
class AnnotateConfig:
    # rule | gpt
    annotator: Literal["rule", "gpt"] = "rule"
    client: LLMClientConfig = field(default_factory=LLMClientConfig)
    use_image: bool = False
    # Annotate only this many samples (sampled with `seed`); 0: all.
    sample: int = 0
    seed: int = 0
    # The maintained annotation rules given to the LLM annotator, one sentence each.
    rules: List[str] = field(
        default_factory=lambda: [
            "A question about the whole scene uses the perception skill for whole-scene key objects.",
            "A question about one marked region or one tagged object uses the region/object skill.",
            "Questions about traffic lights, signs or lane markings use the traffic-control perception skill.",
            "Moving vehicles, cyclists and pedestrians whose motion or intent matters use the dynamic-agents prediction skill.",
            "Cones, barriers, construction zones and debris use the static-hazards prediction skill.",
            "Asking which objects matter most or in what order uses the importance prediction skill.",
            "An answer that tells the ego car to stop, wait or yield uses the stop-or-yield planning skill.",
            "Lane changes, detours, overtaking and turns use the manoeuvre planning skill.",
            "Slowing down, keeping distance or driving carefully uses the caution planning skill.",
            "When no rule clearly applies to a level, use that level's general skill.",
        ]
    )

    def __post_init__(self) -> None:
        _at_least("annotate", "sample", self.sample, 0)


@dataclass
class EvalConfig:
    # Which shards to evaluate: test (data.test_shards) or val.
    split: Literal["test", "val"] = "test"
    max_new_tokens: int = 128
    batch_size: int = 8
    # Cap on evaluated samples (0: all), for quick looks.
    limit: int = 0
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    # Samples shown in the HTML report.
    html_samples: int = 50
    # Fewer samples scored than the split's manifests hold (damaged shards, undecodable samples) is an error;
    # true: score the rest, recorded as partial in scores.json and results.md with the missing keys and shards.
    allow_partial: bool = False
    # What picks the skill experts while generating (MoSE, expert groups): router (the model's own routing),
    # labels (oracle routing: the samples' skill labels), shuffled (a control: each sample takes the routes of
    # another sample of its batch, a seeded derangement: the same route frequencies, the wrong samples' skills).
    route_source: Literal["router", "labels", "shuffled"] = "router"
    shuffle_seed: int = 0

    def __post_init__(self) -> None:
        _at_least("eval", "max_new_tokens", self.max_new_tokens, 1)
        _at_least("eval", "batch_size", self.batch_size, 1)
        for key in ("limit", "html_samples"):
            _at_least("eval", key, getattr(self, key), 0)
        _at_least("eval.judge", "parse_retries", self.judge.parse_retries, 0)
        self.judge.client.check("eval.judge.client")



@dataclass
class PlanConfig:
    """The planner head (a flow-matching action expert in the style of pi0, optionally with an Action MoE in its
    last layers) and the planning stage. See mose_lightning/planning/ and mose_lightning/stages/plan.py."""

    # dense: no MoE (Drive-pi0 style) | token: every horizon token routes itself | trajectory: the token logits
    # averaged over the horizon, one expert set per trajectory for every MoE layer (DriveMoE) | mose_chain: the
    # expert is the planning-level skill the MoSE routers decided on the prompt (top-1, no planner router).
    routing: Literal["dense", "token", "trajectory", "mose_chain"] = "trajectory"
    # Future waypoints (ego frame, metres) at `rate_hz`; nuScenes open loop: 6 at 2 Hz (3 s).
    horizon: int = 6
    rate_hz: float = 2.0
    # Past ego positions fed to the state token (at rate_hz), and whether speed/history/command reach the planner.
    history: int = 4
    use_ego_state: bool = True
    use_command: bool = True
    # Planner transformer. Defaults follow the pi0 / DriveMoE action expert (width 1024, 18 layers, MLP 4096).
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 18
    num_heads: int = 8
    activation: Literal["silu", "gelu", "gelu_pytorch_tanh", "relu"] = "silu"
    # The last `moe_layers` layers carry a shared expert + `num_experts` skill experts, `top_k` per token.
    moe_layers: int = 4
    num_experts: int = 7
    top_k: int = 3
    # Router supervision: drivemoe = the seven DriveMoE scenario classes of `planning.scenario`; planning_skill =
    # the skills of the taxonomy's `chain_level` level (`skills` of the sample). One class per expert.
    scenario_labels: Literal["drivemoe", "planning_skill"] = "drivemoe"
    chain_level: str = "planning"
    # Focal loss on the router logits (alpha = normalised inverse training-set class frequency).
    router_loss_coef: float = 5.0
    focal_gamma: float = 2.0
    # Switch load-balancing loss on the planner router; DriveMoE uses none.
    aux_loss_coef: float = 0.0
    # Which hidden states of the language model the planner attends to (an index into `hidden_states`; -1: the
    # last layer's, after the final norm).
    vlm_layer: int = -1
    # false: the VLM is frozen; true: what the MoE surgery left trainable (MoSE blocks) trains with the planner.
    train_vlm: bool = False
    # With train_vlm: weight of the answer-token loss added to the planner loss (0: planner loss only).
    lm_loss_coef: float = 0.0
    # Frozen VLM only: run it once per sample and train on its cached hidden states (all variants of a comparison
    # share one cache). Costs disk: prompt tokens x hidden size per sample.
    cache_features: bool = False
    cache_dir: str = "artifacts/plan_cache"
    # Action normalisation to [-1, 1] by training-set percentiles: per_dim (x and y over all steps, DriveMoE) or
    # per_step (every waypoint's x and y on their own).
    normalization: Literal["per_dim", "per_step"] = "per_dim"
    percentiles: List[float] = field(default_factory=lambda: [1.0, 99.0])
    # Flow matching (pi0): x_t = (1 - (1 - sigma_min) t) noise + t action, t = t_max (1 - z), z ~ Beta(a, b).
    sigma_min: float = 0.001
    time_beta: List[float] = field(default_factory=lambda: [1.5, 1.0])
    time_max: float = 0.999
    euler_steps: int = 10
    # Evaluation: scenario classes under this share of the training set are reported as rare; samples timed for
    # the planner-latency / prefill table; seed of the sampling noise.
    rare_below: float = 0.15
    latency_samples: int = 16
    eval_seed: int = 0

    def __post_init__(self) -> None:
        for key in ("horizon", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_experts",
                    "euler_steps", "rate_hz"):
            _positive("plan", key, getattr(self, key))
        for key in ("history", "moe_layers", "router_loss_coef", "focal_gamma", "aux_loss_coef", "lm_loss_coef",
                    "latency_samples"):
            _positive("plan", key, getattr(self, key), allow_zero=True)
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"plan.num_heads: expected a divisor of plan.hidden_size ({self.hidden_size}), got {self.num_heads}")
        if self.moe_layers > self.num_layers:
            raise ConfigError(f"plan.moe_layers: expected at most plan.num_layers ({self.num_layers}), got {self.moe_layers}")
        if self.routing in ("token", "trajectory") and not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"plan.top_k: expected 1 <= top_k <= plan.num_experts ({self.num_experts}), got {self.top_k}")
        if self.routing != "dense" and self.moe_layers == 0:
            raise ConfigError(f"plan.moe_layers: plan.routing={self.routing} needs at least one MoE layer, got 0")
        if len(self.percentiles) != 2 or not 0.0 <= self.percentiles[0] < self.percentiles[1] <= 100.0:
            raise ConfigError(f"plan.percentiles: expected [low, high] with 0 <= low < high <= 100, got {list(self.percentiles)}")
        if len(self.time_beta) != 2 or min(self.time_beta) <= 0:
            raise ConfigError(f"plan.time_beta: expected two positive Beta parameters [a, b], got {list(self.time_beta)}")
        if not 0.0 < self.time_max <= 1.0:
            raise ConfigError(f"plan.time_max: expected a number in (0, 1], got {self.time_max!r}")
        if not 0.0 <= self.sigma_min < 1.0:
            raise ConfigError(f"plan.sigma_min: expected a number in [0, 1), got {self.sigma_min!r}")
        if not 0.0 <= self.rare_below <= 1.0:
            raise ConfigError(f"plan.rare_below: expected a fraction in [0, 1], got {self.rare_below!r}")
        if self.lm_loss_coef > 0 and not self.train_vlm:
            raise ConfigError("plan.lm_loss_coef: the answer-token loss trains the VLM; set plan.train_vlm=true or 0")
        if self.cache_features and self.train_vlm:
            raise ConfigError("plan.cache_features: cached hidden states need a frozen VLM; got plan.train_vlm=true")


CAMERAS = ["CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT"]
VIEW_NONE = "NONE"


@dataclass
class ViewPretrainConfig:
    """The view router's pretraining on cached router inputs (one vision pass per sample, then epochs on the cache)."""

    epochs: int = 100
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    # Fraction of the training samples held out when there are no val_shards (0: 0.1).
    holdout_fraction: float = 0.0
    cache_dir: str = "artifacts/view_router_cache"


@dataclass
class ViewSyntheticConfig(SyntheticSetConfig):
    """The multi-view synthetic set the toy view configs create when it is missing."""

    out_dir: str = "artifacts/data/synthetic_views"
    _section = "views.synthetic"


@dataclass
class ViewsConfig:
    """Camera-view routing (DriveMoE's Scene-Specialized Vision MoE): the `kept` views are always encoded; a router
    reading their visual tokens and the question picks `top_k` of the other views, and only those are encoded and
    placed in the prompt. See mose_lightning/moe/view_routing.py."""

    enabled: bool = False
    # Every view the model knows, in prompt order; a sample may lack some candidates (they are never chosen).
    names: List[str] = field(default_factory=lambda: list(CAMERAS))
    # Always in the prompt; the router reads their tokens. The other names are the candidates.
    kept: List[str] = field(default_factory=lambda: ["CAM_FRONT"])
    top_k: int = 1
    # What a question that names no candidate view needs: NONE (the kept views only: the router has a class for
    # "no extra view") or a candidate view name (DriveMoE: CAM_BACK, every sample then shows top_k views).
    fallback: str = VIEW_NONE
    # How the prompt tells the views apart: embedding (a learned vector added to a candidate view's tokens,
    # zero at start) | name (the camera name as text before each image) | both | none.
    marker: Literal["embedding", "name", "both", "none"] = "embedding"
    # Which candidates a training forward shows: teacher_forcing (the labelled ones; DriveMoE stage 1) | gumbel
    # (every candidate encoded, hard Gumbel-softmax top-k with straight-through gradients; stage 2) | router
    # (the router's top-k, no gradient through the choice).
    train_mode: Literal["teacher_forcing", "gumbel", "router"] = "teacher_forcing"
    # What evaluation shows: routed (the router's top-k, only those encoded) | all | kept | labels (oracle).
    eval_mode: Literal["routed", "all", "kept", "labels"] = "routed"
    # Teacher forcing: each other available candidate is also shown with this probability, so the language model
    # learns to find the view that matters among several (and all-views prompts stay in its training distribution).
    extra_view_prob: float = 0.0
    # Weight of the router's focal loss in the model's aux_loss, on samples with view labels (0: off).
    loss_coef: float = 1.0
    focal_gamma: float = 2.0
    # Focal loss alpha: inverse_frequency (of the training set's labels, DriveMoE) | uniform.
    class_weights: Literal["inverse_frequency", "uniform"] = "inverse_frequency"
    gumbel_tau: float = 1.0
    router_heads: int = 8
    # Width of the router's MLP head (0: hidden_size // 2, as DriveMoE).
    router_hidden: int = 0
    router_dropout: float = 0.1
    router_trainable: bool = True
    # A view-router pretraining output (view_router.pt) loaded before fine-tuning.
    router_checkpoint: Optional[str] = None
    # Navigation commands the samples may carry (sample field `command`); each gets a learned context vector.
    commands: List[str] = field(default_factory=list)
    pretrain: ViewPretrainConfig = field(default_factory=ViewPretrainConfig)
    synthetic: ViewSyntheticConfig = field(default_factory=ViewSyntheticConfig)

    @property
    def candidates(self) -> List[str]:
        return [name for name in self.names if name not in self.kept]

    @property
    def classes(self) -> List[str]:
        """The router's output classes: the candidate views, then NONE when that is the fallback."""
        return self.candidates + ([VIEW_NONE] if self.fallback == VIEW_NONE else [])

    def __post_init__(self) -> None:
        if not self.names or len(set(self.names)) != len(self.names) or not all(isinstance(n, str) and n for n in self.names):
            raise ConfigError(f"views.names: expected distinct non-empty view names, got {list(self.names)}")
        if VIEW_NONE in self.names:
            raise ConfigError(f"views.names: {VIEW_NONE!r} is reserved for the no-extra-view class")
        unknown = [v for v in self.kept if v not in self.names]
        if not self.kept or unknown:
            raise ConfigError(f"views.kept: expected at least one of views.names {list(self.names)}, got {list(self.kept)}")
        if not self.candidates:
            raise ConfigError(f"views.kept: every view of views.names is kept ({list(self.names)}); nothing to route")
        if self.fallback != VIEW_NONE and self.fallback not in self.candidates:
            raise ConfigError(f"views.fallback: expected {VIEW_NONE} or one of the candidate views {self.candidates}, "
                              f"got {self.fallback!r}")
        if not 1 <= self.top_k <= len(self.candidates):
            raise ConfigError(f"views.top_k: expected 1 <= top_k <= {len(self.candidates)} (the candidate views "
                              f"{self.candidates}), got {self.top_k}")
        if not 0.0 <= self.extra_view_prob <= 1.0:
            raise ConfigError(f"views.extra_view_prob: expected a probability in [0, 1], got {self.extra_view_prob!r}")
        _positive("views", "loss_coef", self.loss_coef, allow_zero=True)
        _positive("views", "focal_gamma", self.focal_gamma, allow_zero=True)
        _positive("views", "gumbel_tau", self.gumbel_tau)
        _positive("views", "router_heads", self.router_heads)
        _positive("views", "router_hidden", self.router_hidden, allow_zero=True)
        if not 0.0 <= self.router_dropout < 1.0:
            raise ConfigError(f"views.router_dropout: expected a number in [0, 1), got {self.router_dropout!r}")
        if len(set(self.commands)) != len(self.commands):
            raise ConfigError(f"views.commands: expected distinct command names, got {list(self.commands)}")


@dataclass
class ExperimentConfig:
    name: str = "toy_mose"
    # Everything a run writes goes here. Empty: runs/<name>/<stage>.
    run_dir: str = ""
    # A previous stage's checkpoint directory (expert-group starts from MoSE SFT; eval loads it). Empty with the
    # toy default: the make targets create it.
    init_from: str = ""
    seed: int = 0
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    skills: SkillsConfig = field(default_factory=SkillsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    router_pretrain: RouterPretrainConfig = field(default_factory=RouterPretrainConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)

    def __post_init__(self) -> None:
        self.annotate.client.check("annotate.client")


def _read_yaml_with_bases(path: Path, seen: tuple = ()) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"{path}: `base` chain loops back to itself ({' -> '.join(map(str, seen + (path,)))})")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry line numbers; keep them
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not OmegaConf.is_dict(node):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = node.pop("base", None)
    if base is None:
        return node
    parent = _read_yaml_with_bases((path.parent / str(base)).resolve(), seen + (path,))
    return OmegaConf.merge(parent, node)


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    if key:
        return f"key `{key}`: {msg}"
    return msg


# Keys that configs written by earlier versions hold (saved runs' config.yaml) and that no longer vary: dropped when
# such a file is read, with their only possible value.
RETIRED_KEYS = {("moe", "group_size"): 2, ("optim", "name"): "adamw"}


def _drop_retired(layer: Any, source: str) -> Any:
    for (section, key), only in RETIRED_KEYS.items():
        node = layer.get(section) if isinstance(layer, DictConfig) else None
        if isinstance(node, DictConfig) and key in node:
            if node[key] != only:
                raise ConfigError(f"{source}: {section}.{key}: no longer a setting (always {only!r}), got {node[key]!r}")
            del node[key]
    return layer


def load_config(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Schema defaults <- YAML file (with its `base` chain) <- `key=value` overrides, validated."""
    schema = OmegaConf.structured(ExperimentConfig)
    layers = []
    source = "defaults"
    if path is not None:
        source = str(path)
        layers.append(_drop_retired(_read_yaml_with_bases(Path(path).resolve()), source))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r}: expected key=value")
    try:
        merged = OmegaConf.merge(schema, *layers)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {_describe(err)}") from err
    # `key=` means the empty string (OmegaConf would read it as null, which a str field rejects).
    overrides = [o + "''" if o.endswith("=") else o for o in overrides]
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"command-line override: {_describe(err)}") from err
    except yaml.YAMLError as err:  # the value part of key=value is parsed as YAML
        raise ConfigError(f"command-line override: a value is not valid YAML: {str(err).splitlines()[0]}") from err
    try:
        cfg = OmegaConf.to_object(merged)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {_describe(err)}") from err
    assert isinstance(cfg, ExperimentConfig)
    return cfg


def config_to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: ExperimentConfig, run_dir: str | os.PathLike) -> Path:
    """Write the fully resolved config next to a run's outputs."""
    out = Path(run_dir) / "config.yaml"
    atomic_write_text(out, to_yaml(cfg))
    return out


def run_dir_for(cfg: ExperimentConfig, stage: str) -> Path:
    """Where a stage of this experiment writes: `run_dir`, or runs/<name>/<stage> (a planner evaluation: the
    evaluated run's eval/)."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    if stage == "plan_eval" and cfg.init_from:
        return Path(cfg.init_from) / "eval"
    return Path("runs") / cfg.name / stage


def resolve_path(path: str | os.PathLike) -> Path:
    """Paths in configs are relative to the current directory if they exist there, else to the project root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    candidate = PROJECT_ROOT / p
    return candidate if candidate.exists() else p
