"""The run configuration: typed, documented, validated; loaded from YAML with `--set` overrides.

Every field carries its one-line help in `description`; `raft-diffusion config-help` prints them.
Unknown keys are rejected, so a typo never silently falls back to a default.

A run's config is shaped like the run: `RunConfig` is a union discriminated by `backend`, a
`DiffusionRunConfig` (images: resolution, steps, guidance, caption dropout, negative_aware) or a
`TextRunConfig` (texts: max_new_tokens, temperature, top_p, GGUF files); `RunConfig.model_validate`
returns the one its `backend` names (diffusion when none is given). Each objective's knobs are a
block of `training` (`training.reward_weighted`, `training.negative_aware`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from .errors import UserError


class _Strict(BaseModel):
    # inf and nan are never a sensible setting: `learning_rate: inf` or `guidance_scale: .nan` would
    # run to the end and write NaN weights.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --- model ---------------------------------------------------------------------------------------


class ModelConfig(_Strict):
    """What both backends' frozen models have."""

    path: str = Field(
        "builtin:tiny-sd",
        description="hub id, local dir, single file (diffusion: .safetensors/.ckpt; text: .gguf), "
        "or builtin:NAME",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="weights dtype of the frozen model (float32 on CPU)"
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    variant: str | None = Field(None, description="hub weights variant, e.g. fp16")


class DiffusionModelConfig(ModelConfig):
    """A diffusion pipeline: a hub id, a diffusers directory, one .safetensors/.ckpt file or builtin:NAME."""

    vae: str | None = Field(
        None,
        description="diffusion: an AutoencoderKL (hub id or local diffusers dir) that replaces the pipeline's VAE, "
        "e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in float16; default: the pipeline's own",
    )

    # what a 24 GB GPU needs for SDXL and FLUX.1; none of them changes a result
    cache_prompt_embeddings: bool = Field(
        True, description="keep each distinct prompt's encodings on the CPU for the whole run, so the text "
        "encoders run once per prompt (each prompt is encoded alone either way: the same bits)")
    offload_text_encoders: bool = Field(
        False, description="keep the text encoders on the CPU, on the GPU only while encoding new prompts "
        "(FLUX.1's T5-XXL: 9.5 GB of bf16 weights)")
    vae_slicing: bool = Field(
        False, description="decode and encode images through the VAE one at a time, not a whole batch at once")
    vae_tiling: bool = Field(
        False, description="decode large images in overlapping tiles (less memory; the seams are blended, so "
        "pixels change slightly)")


class TextModelConfig(ModelConfig):
    """A causal language model, possibly a GGUF file, possibly with the repo's own code."""

    gguf_file: str | None = Field(
        None, description="text: the GGUF file inside model.path (a local dir or hub id), dequantised on load"
    )
    trust_remote_code: bool = Field(False, description="text: allow code from the model repo to run")


# The attention projections of LLaMA-family models: the text backend's default LoRA targets.
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class LoraConfig(_Strict):
    rank: int = Field(4, gt=0, description="LoRA rank r")
    alpha: float = Field(4.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
        description="names (suffixes) of the modules that get a LoRA (text default: q/k/v/o_proj)",
    )


class PromptsConfig(_Strict):
    train: Union[str, list[str]] = Field(
        ..., description="training prompts: a file (one prompt a line) or a list"
    )
    eval: Union[str, list[str], None] = Field(
        None, description="evaluation prompts (file or list); defaults to the training prompts"
    )


# --- experts -------------------------------------------------------------------------------------


class ExpertConfig(_Strict):
    """A source of candidates beside the policy (RAFT's "other pre-trained experts, or even human"):
    another model, sampled and never trained, or a folder of samples; ranked with the policy's own.

    What both backends' experts have; a run's experts are `DiffusionExpertConfig` or `TextExpertConfig`,
    which add the generation settings a model expert may take of its own."""

    model: Optional[str] = Field(
        None, description="another model of the run's backend (hub id, local dir, single file or builtin:NAME)"
    )
    samples: Optional[str] = Field(
        None, description="a folder with samples.jsonl rows {prompt, file} (images) or {prompt, text}, or builtin:NAME"
    )
    lora: Optional[str] = Field(
        None, description="model expert: a LoRA it samples with: a run's final/ (or the run), or one .safetensors "
                          "file, diffusers' or kohya's names; text: a PEFT adapter directory"
    )
    per_prompt: int = Field(..., gt=0, description="candidates this source adds to each prompt's group")
    label: Optional[str] = Field(
        None, min_length=1, description="its name in samples.jsonl (`source`) and metrics (default: expert1, ...)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> "ExpertConfig":
        if (self.model is None) == (self.samples is None):
            raise ValueError("an expert is either a model or a samples folder: give exactly one of them")
        if self.samples is not None:
            own = [f for f in type(self).model_fields if f not in ExpertConfig.model_fields]
            given = [f for f in ("lora", *own) if getattr(self, f) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: a LoRA and generation settings apply to a model expert, "
                                 "not to samples")
        return self

    def __getattr__(self, name: str) -> Any:
        # A plain ExpertConfig (built in code, of either backend) takes the run's generation settings:
        # the backends read its steps, guidance_scale, temperature and top_p as None.
        if type(self) is ExpertConfig and name in _EXPERT_GENERATION_FIELDS:
            return None
        return super().__getattr__(name)


class DiffusionExpertConfig(ExpertConfig):
    steps: Optional[int] = Field(None, gt=0, description="model expert, diffusion: its denoising steps")
    guidance_scale: Optional[float] = Field(None, ge=0, description="model expert, diffusion: its guidance")


class TextExpertConfig(ExpertConfig):
    temperature: Optional[float] = Field(None, gt=0, description="model expert, text: its sampling temperature")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="model expert, text: its nucleus mass")


_EXPERT_GENERATION_FIELDS = ("steps", "guidance_scale", "temperature", "top_p")


# --- generation ----------------------------------------------------------------------------------


def _label_experts(experts: list[ExpertConfig]) -> list[ExpertConfig]:
    for i, expert in enumerate(experts, 1):
        if expert.label is None:
            expert.label = f"expert{i}"
    labels = [e.label for e in experts]
    if len(set(labels)) < len(labels) or "policy" in labels:
        raise ValueError(f"expert labels must differ from each other and from 'policy', got {labels}")
    return experts


_EXPERTS_HELP = ("other sources of candidates, ranked with the policy's own: "
                 "[{model: PATH, per_prompt: N} or {samples: DIR, per_prompt: N}]")


class GenerationBase(_Strict):
    """What both backends' sampling has."""

    samples_per_prompt: int = Field(8, gt=0, description="K: candidates generated per prompt")
    batch_size: int = Field(16, gt=0, description="samples generated per forward pass")


class DiffusionGenerationConfig(GenerationBase):
    """How a diffusion run samples its images."""

    resolution: int = Field(256, gt=0, le=4096, description="image side in pixels, at most 4096")
    steps: int = Field(20, gt=0, description="denoising steps")
    rollout_steps: Optional[int] = Field(
        None, gt=0, description="rank candidates made with these fewer steps, then re-render the trained ones "
        "(same seeds) at `steps` before fine-tuning on them (Sol-RL's cheap pools); off by default")
    guidance_scale: float = Field(7.5, ge=0, description="classifier-free guidance; <= 1 disables it")
    scheduler: Literal["ddim", "dpm_solver"] = Field("ddim", description="sampler")
    eta: float = Field(0.0, ge=0, le=1, description="DDIM eta; 0 is deterministic given the seed")
    negative_prompt: str = Field("", description="negative prompt for guidance")
    experts: list[DiffusionExpertConfig] = Field(default_factory=list, description=_EXPERTS_HELP)

    @field_validator("experts")
    @classmethod
    def _labels(cls, experts: list[ExpertConfig]) -> list[ExpertConfig]:
        return _label_experts(experts)


class TextGenerationConfig(GenerationBase):
    """How a text run samples its responses."""

    max_new_tokens: Union[int, tuple[int, int]] = Field(
        48, description="tokens to generate, or a [min, max] range (each sample's length drawn from its seed)"
    )
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    experts: list[TextExpertConfig] = Field(default_factory=list, description=_EXPERTS_HELP)

    @field_validator("experts")
    @classmethod
    def _labels(cls, experts: list[ExpertConfig]) -> list[ExpertConfig]:
        return _label_experts(experts)

    @field_validator("max_new_tokens")
    @classmethod
    def _positive_range(cls, v: Union[int, tuple[int, int]]) -> Union[int, tuple[int, int]]:
        low, high = (v, v) if isinstance(v, int) else v
        if low < 1 or high < low:
            raise ValueError("must be a positive number of tokens or a [min, max] range with 1 <= min <= max")
        return v


# The image generation config under its old name: `generate`, the toy world and the diffusion
# backend's helpers build it with image fields.
GenerationConfig = DiffusionGenerationConfig


class RewardSpec(_Strict):
    name: str = Field(..., description="registered reward name, or python:module:function")
    label: Optional[str] = Field(
        None, description="name in metrics, samples.jsonl and tables (default: name); tells apart two uses of one reward"
    )
    weight: float = Field(1.0, description="weight in the summed reward")
    normalize: Literal["none", "batch", "per_prompt"] = Field(
        "none", description="z-score this reward over the batch or per prompt before weighting"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="reward-specific options, e.g. clip: {model, pretrained, model_config}"
    )
    timeout: Optional[float] = Field(
        None, gt=0, allow_inf_nan=False,
        description="seconds one call of this reward may take (a remote scorer that hangs); after it, the "
        "call's samples are dropped as failed and the run goes on (default: no limit)"
    )


class FilterSpec(_Strict):
    name: str = Field(..., description="registered filter name (regex, length, blank_image), or python:module:function")
    label: Optional[str] = Field(
        None, description="name in metrics and samples.jsonl (default: name); tells apart two uses of one filter"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="filter-specific options, e.g. regex: {pattern, action}"
    )


class SelectionConfig(_Strict):
    strategy: Literal["per_prompt", "global"] = Field(
        "per_prompt", description="per_prompt: best `top` of each prompt; global: best `fraction`"
    )
    top: int = Field(1, gt=0, description="per_prompt: samples kept per prompt")
    fraction: float = Field(
        0.125, gt=0, le=1, description="global: fraction of all samples kept, in (0, 1]"
    )
    min_spread: Optional[float] = Field(
        None, ge=0, description="drop a prompt's group whose rewards spread (max - min) less than this: no "
        "signal to rank (RAFT++ / Reinforce-Rej); off by default"
    )
    min_reward: Optional[float] = Field(
        None, description="drop a prompt's group none of whose candidates reaches this reward; off by default"
    )


# --- training ------------------------------------------------------------------------------------


class RewardWeightedConfig(_Strict):
    """The knobs of `objective: reward_weighted`."""

    beta: float = Field(1.0, gt=0, description="temperature on the group-normalised reward "
                        "(smaller keeps closer to the best samples)")


class NegativeAwareConfig(_Strict):
    """The knobs of `objective: negative_aware` (DiffusionNFT)."""

    beta: float = Field(1.0, gt=0, description="how far the implicit policies reach past "
                        "the old (EMA) policy")
    advantage_clip: float = Field(2.0, gt=0, description="|A| at which a sample counts as "
                                  "surely good (r = 1) or surely bad (r = 0)")


class TrainingConfig(_Strict):
    """What both backends' fine-tuning has."""

    learning_rate: float = Field(1.0e-4, gt=0, description="AdamW learning rate")
    epochs: int = Field(1, gt=0, description="passes over the selected samples per iteration")
    batch_size: int = Field(8, gt=0, description="micro-batch size")
    gradient_accumulation_steps: int = Field(1, gt=0, description="micro-batches per optimizer step")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null disables it")
    weight_decay: float = Field(1.0e-2, ge=0, description="AdamW weight decay")
    gradient_checkpointing: bool = Field(
        False, description="recompute the denoiser's (or LLM's) blocks in the backward pass instead of keeping "
        "their activations: less memory, about a third more training compute, the same result")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="autocast dtype of the fine-tuning forward passes (the LoRA weights stay float32); "
        "fp16 adds a loss scaler, saved in every checkpoint; works on CPU and CUDA"
    )
    objective: Literal["raft", "reward_weighted", "negative_aware"] = Field(
        "raft", description="what is fine-tuned on: raft = the selected samples, equally; reward_weighted = "
        "every sample, weighted by exp(A / beta) with A its reward z-scored within its prompt; negative_aware "
        "(diffusion, needs ema_decay) = DiffusionNFT's positive and negative implicit policies"
    )
    reward_weighted: RewardWeightedConfig = Field(
        default_factory=RewardWeightedConfig, description="the knobs of objective reward_weighted")
    anchor_weight: float = Field(
        0.0, ge=0, description="weight of a pull towards the base model (adapter off): diffusion, the squared "
        "difference of the predictions; text, the token-level KL; 0 disables it"
    )
    ema_decay: float = Field(
        0.0, ge=0, lt=1, description="sample, evaluate and save an exponential moving average of the LoRA, "
        "updated after each iteration's fine-tuning with this decay (e.g. 0.5); 0 disables it"
    )
    max_drop_fraction: float = Field(
        0.5, ge=0, le=1, description="stop the run when the rewards fail on (drop) more than this share of an "
        "iteration's samples; a reward that fails on every sample always stops it"
    )
    replay: int = Field(
        0, ge=0, description="train each iteration also on what the last N iterations trained on (their "
        "latents or token ids, kept and checkpointed); 0 disables it"
    )
    replay_decay: float = Field(
        1.0, gt=0, le=1, description="weight of a replayed sample per iteration of its age (decay ** age; "
        "1: as much as a new one)"
    )


class DiffusionTrainingConfig(TrainingConfig):
    caption_dropout: float = Field(
        0.0, ge=0, lt=1, description="fraction of training samples whose prompt is replaced by the "
        "empty prompt, so the unconditional branch that guidance subtracts learns alongside"
    )
    negative_aware: NegativeAwareConfig = Field(
        default_factory=NegativeAwareConfig, description="the knobs of objective negative_aware")


class TextTrainingConfig(TrainingConfig):
    """A text run's fine-tuning: the shared fields (negative_aware is built for diffusion only)."""


# The flat names the objectives' knobs had before they moved to their blocks: old -> (block, field).
MOVED_TRAINING_FIELDS = {
    "beta": ("reward_weighted", "beta"),
    "nft_beta": ("negative_aware", "beta"),
    "nft_advantage_clip": ("negative_aware", "advantage_clip"),
}
# Fields added since runs saved their config.yaml: (section, field) -> the default an older run ran with.
ADDED_FIELDS = {
    ("selection", "min_spread"): None, ("selection", "min_reward"): None,  # groups without signal: kept
    ("training", "replay"): 0, ("training", "replay_decay"): 1.0,  # no replay of past winners
    ("generation", "rollout_steps"): None,  # diffusion: candidates at generation.steps
    ("model", "vae"): None,  # diffusion: the pipeline's own VAE
    # diffusion: the memory knobs at today's defaults (they change no result, and a resumed run may switch them)
    ("model", "cache_prompt_embeddings"): True, ("model", "offload_text_encoders"): False,
    ("model", "vae_slicing"): False, ("model", "vae_tiling"): False,
}
# Top-level fields added since: field -> the default an older run ran with.
ADDED_TOP_FIELDS = {"filters": []}


class RaftConfig(_Strict):
    iterations: int = Field(10, gt=0, description="RAFT iterations (sample, rank, fine-tune)")
    prompts_per_iteration: int = Field(16, gt=0, description="b: prompts sampled per iteration")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of prompts, samples and training noise "
                      "(0 to 2**32 - 1, numpy's range)")


class EvalConfig(_Strict):
    every: int = Field(1, ge=0, description="evaluate every N iterations; 0 disables evaluation")
    samples_per_prompt: int = Field(4, gt=0, description="samples per eval prompt (fixed seeds)")
    seed: Optional[int] = Field(None, ge=0, le=2**32 - 1, description="seed of the eval samples (default: "
                                "raft.seed); a dev split takes other seeds than the held-out eval")
    judges: list[RewardSpec] = Field(
        default_factory=list, description="held-out rewards: scored on eval samples, never optimized"
    )


class ReportConfig(_Strict):
    """When the report flags a run (report.py): thresholds of the reward-hacking and collapse signs."""

    judge_drop: float = Field(0.05, ge=0, description="flag a held-out judge that fell by more than this share "
                              "of its base value while the trained reward rose")
    collapse_drop: float = Field(0.2, ge=0, le=1, description="flag an eval metric that ended more than this "
                                 "share of its gain below its own peak (it rose, then fell back)")
    diversity_drop: float = Field(0.25, ge=0, le=1, description="flag a diversity metric (distinct-n, "
                                  "unique-2, MSTTR) that fell by more than this share of its base value")
    perplexity_rise: float = Field(0.5, ge=0, description="flag a perplexity under the base model that rose "
                                   "by more than this share of its base value")


class LoggingConfig(_Strict):
    report_to: list[str] = Field(
        default_factory=list, description="experiment trackers, through accelerate: tensorboard, wandb, mlflow, "
        "... (default none); scalars every iteration, the eval grid or texts at each evaluation")
    project: str = Field("raft-diffusion", min_length=1, description="the trackers' project name "
                         "(TensorBoard writes RUN_DIR/logs/PROJECT)")

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, names: list[str]) -> list[str]:
        from accelerate.utils import LoggerType

        known = [t.value for t in LoggerType if t.value != "all"]
        for name in names:
            if name not in known:
                raise ValueError(f"unknown tracker {name!r}; accelerate knows {', '.join(known)}")
        return list(dict.fromkeys(names))


class CheckpointConfig(_Strict):
    keep_last: int = Field(2, gt=0, description="iteration checkpoints kept on disk")


# --- the run -------------------------------------------------------------------------------------

_HELP = {
    "backend": "what is generated", "model": "the frozen base model", "generation": "sampling",
    "training": "fine-tuning",
}


class RunConfig(_Strict):
    """A run's config: what both backends share. `RunConfig.model_validate(data)` returns the
    `DiffusionRunConfig` or `TextRunConfig` that `data["backend"]` names (diffusion by default)."""

    # The backend's own section models, set by each subclass: section -> model class.
    SECTIONS: ClassVar[dict[str, type[BaseModel]]] = {}
    EXPERT: ClassVar[type[ExpertConfig]] = ExpertConfig

    backend: Literal["diffusion", "text"] = Field("diffusion", description=_HELP["backend"])
    model: Union[DiffusionModelConfig, TextModelConfig] = Field(
        default_factory=DiffusionModelConfig, description=_HELP["model"])
    lora: LoraConfig = Field(default_factory=LoraConfig, description="the trained adapter")
    prompts: PromptsConfig = Field(..., description="prompt sources")
    generation: Union[DiffusionGenerationConfig, TextGenerationConfig] = Field(
        default_factory=DiffusionGenerationConfig, description=_HELP["generation"])
    rewards: list[RewardSpec] = Field(..., min_length=1, description="what RAFT optimizes")
    filters: list[FilterSpec] = Field(
        default_factory=list, description="discard filters: a candidate one rejects is dropped before scoring "
        "(never selected or trained on), e.g. {name: regex, options: {pattern: '#{3,}'}}")
    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="ranking")
    training: Union[DiffusionTrainingConfig, TextTrainingConfig] = Field(
        default_factory=DiffusionTrainingConfig, description=_HELP["training"])
    raft: RaftConfig = Field(default_factory=RaftConfig, description="the outer loop")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="resume")
    report: ReportConfig = Field(default_factory=ReportConfig, description="what the run report flags")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="experiment trackers")
    output_dir: str = Field("runs/raft", min_length=1, description="run directory")

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> "RunConfig":
        if cls is not RunConfig:
            return super().model_validate(obj, **kwargs)
        if isinstance(obj, dict):
            backend = obj.get("backend", "diffusion")
            if not isinstance(backend, str) or backend not in RUN_CONFIGS:
                return super().model_validate(obj, **kwargs)  # pydantic's own error on `backend`
            obj = {**obj, "backend": backend}
        return _ANY_RUN_CONFIG.validate_python(obj, **kwargs)

    @model_validator(mode="before")
    @classmethod
    def _no_fields_of_the_other_backend(cls, data: Any) -> Any:
        # A field only the other backend has would be silently ignored: refuse it. Only a value
        # that differs from that field's default counts: the resolved config.yaml of a run made
        # before the config was split by backend lists every field, defaults included. The old
        # flat names of the objectives' knobs are refused with their new place.
        if cls is RunConfig or not isinstance(data, dict):
            return data
        training = data.get("training")
        if isinstance(training, dict):
            for old in MOVED_TRAINING_FIELDS:
                if old in training:
                    raise _moved(old, training[old], cls)
        return _other_backend_fields(cls, data, refuse=True)

    @model_validator(mode="after")
    def _negative_aware_needs_an_old_policy(self) -> "RunConfig":
        if self.training.objective == "negative_aware":
            if self.backend != "diffusion":
                raise UserError("config training.objective", "negative_aware is built for diffusion only",
                                "use raft or reward_weighted for text")
            if not self.training.ema_decay:
                raise UserError("config training.ema_decay", "negative_aware needs the EMA of the LoRA as its old "
                                "policy", "set training.ema_decay, e.g. 0.9")
        return self

    @model_validator(mode="after")
    def _rollouts_are_cheaper(self) -> "RunConfig":
        rollout = getattr(self.generation, "rollout_steps", None)
        if rollout is not None and rollout >= self.generation.steps:
            raise UserError("config generation.rollout_steps", f"{rollout} is not fewer than generation.steps "
                            f"({self.generation.steps})", "use fewer steps for the rollouts (e.g. a quarter), or "
                            "remove rollout_steps")
        return self

    @model_validator(mode="after")
    def _text_lora_targets(self) -> "RunConfig":
        # The LoRA default names the UNet's attention; a text run that names no targets gets the
        # LLaMA attention projections instead (written out in the resolved config.yaml).
        if self.backend == "text" and "target_modules" not in self.lora.model_fields_set:
            self.lora.target_modules = list(TEXT_LORA_TARGETS)
        return self


class DiffusionRunConfig(RunConfig):
    """A diffusion run: images, a UNet (or MMDiT) LoRA."""

    SECTIONS: ClassVar[dict[str, type[BaseModel]]] = {
        "model": DiffusionModelConfig, "generation": DiffusionGenerationConfig, "training": DiffusionTrainingConfig}
    EXPERT: ClassVar[type[ExpertConfig]] = DiffusionExpertConfig

    backend: Literal["diffusion"] = Field("diffusion", description=_HELP["backend"])
    model: DiffusionModelConfig = Field(default_factory=DiffusionModelConfig, description=_HELP["model"])
    generation: DiffusionGenerationConfig = Field(
        default_factory=DiffusionGenerationConfig, description=_HELP["generation"])
    training: DiffusionTrainingConfig = Field(default_factory=DiffusionTrainingConfig, description=_HELP["training"])


class TextRunConfig(RunConfig):
    """A text run: responses of a causal LM, a LoRA on its attention projections."""

    SECTIONS: ClassVar[dict[str, type[BaseModel]]] = {
        "model": TextModelConfig, "generation": TextGenerationConfig, "training": TextTrainingConfig}
    EXPERT: ClassVar[type[ExpertConfig]] = TextExpertConfig

    backend: Literal["text"] = Field("text", description=_HELP["backend"])
    model: TextModelConfig = Field(default_factory=TextModelConfig, description=_HELP["model"])
    generation: TextGenerationConfig = Field(default_factory=TextGenerationConfig, description=_HELP["generation"])
    training: TextTrainingConfig = Field(default_factory=TextTrainingConfig, description=_HELP["training"])


RUN_CONFIGS: dict[str, type[RunConfig]] = {"diffusion": DiffusionRunConfig, "text": TextRunConfig}
_ANY_RUN_CONFIG = TypeAdapter(Annotated[Union[DiffusionRunConfig, TextRunConfig], Field(discriminator="backend")])


def run_config_class(backend: Any) -> type[RunConfig]:
    """The config class of `backend` (a value of a config's `backend` key): diffusion's by default."""
    return RUN_CONFIGS.get(backend, DiffusionRunConfig) if isinstance(backend, str) else DiffusionRunConfig


def _other_backend(cls: type[RunConfig]) -> type[RunConfig]:
    return next(other for other in RUN_CONFIGS.values() if other is not cls)


def _is_default(model: type[BaseModel], name: str, value: Any) -> bool:
    """Whether `value` is, once validated by `model`, the default of its field `name`."""
    try:
        validated = getattr(model.model_validate({name: value}), name)
    except (ValidationError, UserError, ValueError):
        return False
    return validated == model.model_fields[name].get_default(call_default_factory=True)


def _other_backend_fields(cls: type[RunConfig], data: dict[str, Any], refuse: bool) -> dict[str, Any]:
    """`data` without the fields that only the other backend has, where they hold that backend's
    default; a field at another value is a `UserError` if `refuse`, else kept (validation names it)."""
    other = _other_backend(cls)
    backend, mine = other.model_fields["backend"].default, cls.model_fields["backend"].default
    out = dict(data)
    for section, model in cls.SECTIONS.items():
        part = out.get(section)
        if not isinstance(part, dict):
            continue
        theirs = other.SECTIONS[section]
        part = out[section] = dict(part)
        for name in [n for n in theirs.model_fields if n not in model.model_fields and n in part]:
            if _is_default(theirs, name, part[name]):
                del part[name]
            elif refuse:
                raise UserError(f"config {section}.{name}", f"applies only to backend {backend}, and this run's "
                                f"backend is {mine}", f"remove it, or set backend: {backend}")
    generation = out.get("generation")
    experts = generation.get("experts") if isinstance(generation, dict) else None
    if isinstance(experts, list):
        extra = [n for n in other.EXPERT.model_fields if n not in cls.EXPERT.model_fields]
        generation["experts"] = experts = [dict(e) if isinstance(e, dict) else e for e in experts]
        for i, expert in enumerate(experts):
            for name in [n for n in extra if isinstance(expert, dict) and n in expert]:
                if expert[name] is None:
                    del expert[name]
                elif refuse:
                    raise UserError(f"config generation.experts.{i}.{name}", f"applies only to backend {backend}, "
                                    f"and this run's backend is {mine}", "remove it")
    return out


def _moved(old: str, value: Any, cls: type[RunConfig]) -> UserError:
    """The error of a user's config that still names an objective's knob by its flat name."""
    block, name = MOVED_TRAINING_FIELDS[old]
    if block not in cls.SECTIONS["training"].model_fields:
        fix = f"remove it: training.{block} applies only to backend {_other_backend(cls).model_fields['backend'].default}"
    else:
        try:
            shown = json.dumps(value)
        except (TypeError, ValueError):
            shown = _short(repr(value), 40)
        fix = f"write it under training as {block}: {{{name}: {_short(shown, 40)}}}"
    return UserError(f"config training.{old}", f"moved to training.{block}.{name}", fix)


def migrate_saved_config(data: Any) -> Any:
    """A run's saved config.yaml fields (as read) in today's layout: a run made before the config
    was split by backend lists every field of both backends, defaults included, and the objectives'
    knobs under their flat names (training.beta, nft_beta, nft_advantage_clip). The other backend's
    fields at their defaults are dropped, the knobs moved to their blocks and fields added since
    (`ADDED_FIELDS`) given the default the run had, so that --resume
    compares the run's config with today's; anything else is left for validation to name."""
    if not isinstance(data, dict):
        return data
    backend = data.get("backend", "diffusion")
    if not isinstance(backend, str) or backend not in RUN_CONFIGS:
        return data
    cls = RUN_CONFIGS[backend]
    data = copy.deepcopy(data)
    training = data.get("training")
    if isinstance(training, dict):
        for old, (block, name) in MOVED_TRAINING_FIELDS.items():
            if old not in training:
                continue
            if block not in cls.SECTIONS["training"].model_fields:
                del training[old]  # a text run never read negative_aware's knobs
                continue
            target = training.setdefault(block, {})
            if isinstance(target, dict) and name not in target:
                target[name] = training.pop(old)
    for (section, name), default in ADDED_FIELDS.items():
        fields = data.get(section)
        model = cls.SECTIONS.get(section) or cls.model_fields[section].annotation  # shared sections: selection
        if isinstance(fields, dict) and name in model.model_fields:
            fields.setdefault(name, default)
    for name, default in ADDED_TOP_FIELDS.items():
        data.setdefault(name, copy.deepcopy(default))
    return _other_backend_fields(cls, data, refuse=False)


# --- reading YAML, with limits ---------------------------------------------------------------
# Configs, --set values and a run's config.yaml come from users (or from whoever shared a run
# directory). PyYAML's safe_load shares an alias's value, but validation, copies and the saved
# config.yaml expand it (ten nested aliases of ten are 10**9 values: a "billion laughs"); it builds a
# structure that holds itself from `&o {self: *o}`, recurses once per nesting level (RecursionError
# near 1,000 levels) and keeps the last of two equal keys silently. `read_yaml` refuses each of them
# while the text is composed, before any value is built.

MAX_YAML_BYTES = 8 * 2**20  # a config with thousands of inline prompts stays far below this
MAX_YAML_DEPTH = 100  # nested lists and mappings; a config nests 4 or 5 deep
MAX_ALIAS_VALUES = 100_000  # values that all aliases together repeat (an anchored prompt list reused is fine)
MAX_SET_KEY_PARTS = 32  # dotted parts of one --set key


class YamlRefused(Exception):
    """A YAML text that the limits refuse: `problem`, at 1-based `line`, in the value at dotted `where`."""

    def __init__(self, problem: str, line: int | None = None, where: str = "", fix: str | None = None):
        super().__init__(problem)
        self.problem, self.line, self.where, self.fix = problem, line, where, fix


class _LimitedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that counts while it composes the node tree: nesting depth, the values
    aliases repeat (an alias costs the size of what it names, its own aliases expanded), aliases to
    a node not yet complete (which would hold itself) and duplicate keys of a mapping."""

    def __init__(self, stream, max_depth: int = MAX_YAML_DEPTH):
        super().__init__(stream)
        self._max_depth = max_depth
        self._where: list[str] = []  # the dotted path of the node being composed
        self._depth = 0
        self._open: set[str] = set()  # anchors whose node is still being composed
        self._repeated = [0, 0]  # values and characters repeated by aliases so far
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, characters), aliases expanded

    def _refuse(self, problem: str, mark, fix: str) -> None:
        where = self._where if len(self._where) <= 8 else [*self._where[:6], f"... ({len(self._where)} levels)"]
        raise YamlRefused(problem, mark.line + 1 if mark is not None else None, ".".join(where), fix)

    def compose_node(self, parent, index):
        label = str(index) if isinstance(index, int) else getattr(index, "value", None)
        if not isinstance(label, str):  # a mapping key, the document itself, or a key that is a collection
            label = None
        elif len(label) > 40:  # a key of a megabyte would make the error line that long
            label = label[:40] + "..."
        if label is not None:
            self._where.append(label)
        try:
            return self._compose_counted(parent, index)
        finally:
            if label is not None:
                self._where.pop()

    def _compose_counted(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                self._refuse(f"alias *{event.anchor} names a value that contains it", event.start_mark,
                             "an alias may only repeat a value completed before it")
            node = self.anchors.get(event.anchor)
            if node is not None:  # (an undefined one is PyYAML's own error)
                values, chars = self._sizes.get(id(node), (1, 0))
                self._repeated[0] += values
                self._repeated[1] += chars
                if self._repeated[0] > MAX_ALIAS_VALUES or self._repeated[1] > MAX_YAML_BYTES:
                    self._refuse(f"aliases (here *{event.anchor}) repeat more than {MAX_ALIAS_VALUES} values or "
                                 f"{MAX_YAML_BYTES // 2**20} MiB of text (a YAML bomb)", event.start_mark,
                                 "write the values out, or repeat fewer of them through aliases")
            return super().compose_node(parent, index)
        nested = isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent))
        if nested and self._depth >= self._max_depth:
            self._refuse(f"lists and mappings nested more than {self._max_depth} deep", event.start_mark,
                         "nest fewer levels")
        anchor = event.anchor
        if anchor is not None:
            self._open.add(anchor)
        self._depth += nested
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= nested
            self._open.discard(anchor)
        if isinstance(node, yaml.ScalarNode):
            self._sizes[id(node)] = (1, len(node.value))
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
            sizes = [self._sizes.get(id(child), (1, 0)) for child in children]
            self._sizes[id(node)] = (1 + sum(s[0] for s in sizes), sum(s[1] for s in sizes))
        return node

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], Any] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges: the keys written beside it replace the merged ones on purpose
            first = seen.setdefault((key.tag, key.value), key)
            if first is not key:
                self._where.append(key.value)
                self._refuse(f"duplicate key {key.value!r} (first at line {first.start_mark.line + 1})",
                             key.start_mark, "keep one of them: YAML would silently use the last")
        return node


def read_yaml(text: str, max_depth: int = MAX_YAML_DEPTH) -> Any:
    """The value of a YAML document, read safely and within the limits above (lists and mappings at
    most `max_depth` deep): a `YamlRefused` when the limits refuse it, a `yaml.YAMLError` when it is
    not valid YAML."""
    if len(text) > MAX_YAML_BYTES:
        raise YamlRefused(f"{len(text) / 2**20:.1f} MiB of YAML, more than {MAX_YAML_BYTES // 2**20} MiB")
    loader = _LimitedLoader(text, max_depth)
    try:
        return loader.get_single_data()
    except (ValueError, OverflowError) as e:  # an int of over 4300 digits, which Python refuses to convert
        raise YamlRefused(str(e).split(";")[0]) from None
    finally:
        loader.dispose()


def _yaml_problem(e: Exception) -> str:
    """`problem (at WHERE)` of a refused YAML text, `problem at line N, column M` of an invalid one."""
    if isinstance(e, YamlRefused):
        return e.problem + (f" (at {e.where})" if e.where else "")
    mark = getattr(e, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = (getattr(e, "problem", None) or "invalid YAML").replace("tag:yaml.org,2002:", "!!")
    return f"{problem}{at}"


def read_yaml_file(path: Path, field: str, fix: str, name_the_value: bool = False) -> Any:
    """The value of the YAML file at `path`, read by `read_yaml`; whatever is wrong with it is one
    `UserError` naming `field` (followed by the dotted place of a refused value if `name_the_value`)."""
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise UserError(field, f"{path} is {size / 2**20:.1f} MiB, more than the {MAX_YAML_BYTES // 2**20} "
                            "MiB a YAML file may be", fix)
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(field, f"{path} is not UTF-8 text", "save it as UTF-8") from None
    except OSError as e:
        raise UserError(field, f"cannot read {path}: {e.strerror or e}", fix) from None
    try:
        return read_yaml(text)
    except YamlRefused as e:
        where = f"{path} line {e.line}" if e.line else str(path)
        if name_the_value and e.where:
            raise UserError(f"{field} {e.where}", f"{where}: {e.problem}", e.fix or fix) from None
        raise UserError(field, f"{where}: {_yaml_problem(e)}", e.fix or fix) from None
    except yaml.YAMLError as e:
        raise UserError(field, f"YAML syntax error in {path}: {_yaml_problem(e)}", fix) from None


# --- loading ---------------------------------------------------------------------------------


def _format_validation_error(err: ValidationError, source: str, backend: Any = None,
                             set_keys: Sequence[tuple[str, ...]] = ()) -> UserError:
    """One line for the first error; a value that came from `--set` (one of `set_keys`, or inside one) is
    said to come from there, not from the file."""
    first = err.errors()[0]
    loc = list(first["loc"])
    if loc and loc[0] in RUN_CONFIGS:  # the discriminated union's tag: the backend whose config it is
        backend = loc.pop(0)
    field = ".".join(str(p) for p in loc) or "(top level)"
    where = tuple(str(p) for p in loc)
    given = next((k for k in reversed(set_keys) if k and where[:len(k)] == k), None)
    value_source = f"the --set {'.'.join(given)}=... of the command line" if given else source
    if first["type"] == "extra_forbidden":
        parent = _model_at(run_config_class(backend), loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent else "see the docs"
        problem, fix = "unknown key", f"allowed keys here: {allowed}"
    elif first["type"] == "missing":
        problem, fix = "required field is missing", f"add it to {source}"
    else:
        problem = first["msg"].rstrip(".") + f", got {_short(repr(first.get('input')))}"
        fix = f"fix the value in {value_source}"
    more = len(err.errors()) - 1
    if more:
        fix += f"; {more} more error(s) after this one"
    return UserError(f"config {field}", problem, fix)


def _short(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters (a value quoted in an error line, which may be huge)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _model_at(model: type[BaseModel], loc: list[Any]) -> type[BaseModel] | None:
    """The pydantic model class found by walking `loc` (field names and list indices)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        inner = _submodel(field.annotation)
        if inner is None:
            return None
        model = inner
    return model


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _submodel(arg)
        if found:
            return found
    return None


def apply_override(data: dict[str, Any], assignment: str) -> tuple[str, ...]:
    """Apply one `--set a.b.c=value` to the raw config dict; the value is parsed as YAML. Returns the
    key's dotted parts (what an error in that value is then said to come from)."""
    if "=" not in assignment:
        raise UserError("--set", f"{assignment!r} is not key=value", "write e.g. --set raft.seed=1")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) > MAX_SET_KEY_PARTS:
        raise UserError("--set", f"{_short(key, 80)} has {len(parts)} dotted parts, more than the {MAX_SET_KEY_PARTS} "
                        "a key may have", "name a field of the config, e.g. --set rewards.0.options.quality=50")
    # The run's own backend's models first, then the other's: a field of the other backend is set
    # here and refused by validation, which says which backend it belongs to.
    own = run_config_class(data.get("backend", "diffusion"))
    models: list[type[BaseModel] | None] = [own, _other_backend(own)]
    free = False  # below a free dict (a reward's options) any key goes
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError("--set", f"{key}: no list item {part!r}", "use an existing index")
            idx: Any = int(part)
        elif free:
            idx = part
        else:
            having = [m for m in models if m is not None and part in m.model_fields]
            if not having:
                if i == 1 and parts[0] == "training" and part in MOVED_TRAINING_FIELDS:
                    try:
                        value = read_yaml(raw, MAX_YAML_DEPTH - len(parts))
                    except (yaml.YAMLError, YamlRefused):
                        value = raw
                    raise _moved(part, value, own)
                model = next((m for m in models if m is not None), None)
                allowed = ", ".join(model.model_fields) if model else "none"
                raise UserError("--set", f"unknown key {key!r}", f"allowed at this level: {allowed}")
            idx = part
            annotation = having[0].model_fields[part].annotation
            free = get_origin(annotation) is dict
            models = [_submodel(m.model_fields[part].annotation) for m in having]
        if last:
            try:
                # the value sits len(parts) levels down: with them, no deeper than a config file may be
                value = read_yaml(raw, MAX_YAML_DEPTH - len(parts))
            except yaml.YAMLError:
                value = raw
            except YamlRefused as e:
                at = f" (at {e.where} of the value)" if e.where else ""
                raise UserError("--set", f"{_short(key, 80)}: {e.problem}{at}", e.fix or "give a plain value") from None
            node[idx] = value
        else:
            if isinstance(node, dict) and node.get(idx) is None:
                node[idx] = {}
            node = node[idx]
            if not isinstance(node, (dict, list)):
                raise UserError("--set", f"{key}: {part} holds a value, not fields", f"set {'.'.join(parts[:i + 1])}")
    return tuple(parts)


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply `--set` overrides, validate; user mistakes raise `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError("config", f"file not found: {path}", "pass the path of a YAML config")
    data = read_yaml_file(path, "config", "fix the YAML", name_the_value=True)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError("config", f"{path} must hold a mapping of fields", "see configs/ for examples")
    set_keys = [apply_override(data, assignment) for assignment in overrides]
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as e:
        raise _format_validation_error(e, str(path), data.get("backend"), set_keys) from None
    return config.model_copy(update={}, deep=True)


def read_saved_config(path: Path) -> Any:
    """The fields of a run's own config.yaml (to compare on --resume), in today's layout
    (`migrate_saved_config`: a run made before the config was split by backend still resumes);
    a damaged file is a UserError."""
    # e.g. a !!python/object tag, which the safe reader refuses (raft-diffusion never writes one)
    return migrate_saved_config(
        read_yaml_file(path, "output_dir", "restore the run's config.yaml, or start over with --overwrite"))


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def field_help(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, description) of every field, for `--help`-style listings. For
    `RunConfig`, the fields of both backends: the diffusion run's, with each field only a text run
    has placed after its section's last field (and its description starting with `text:`)."""
    if model is RunConfig:
        rows = field_help(DiffusionRunConfig, prefix)
        names = {row[0] for row in rows}
        text_rows = field_help(TextRunConfig, prefix)
        mine = names - {row[0] for row in text_rows}
        for row in text_rows:
            if row[0] in names:
                continue
            section = row[0].rpartition(".")[0]
            at = max((i for i, r in enumerate(rows) if r[0].startswith(section + ".")), default=len(rows) - 1)
            rows.insert(at + 1, _marked(row, "text"))
            names.add(row[0])
        return [_marked(row, "diffusion") if row[0] in mine else row for row in rows]
    rows = []
    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        dotted = f"{prefix}{name}"
        if sub is not None and issubclass(sub, ExpertConfig):  # a list of them: the list, then what each item holds
            rows.append((dotted, "[]", field.description or ""))
            rows += field_help(sub, dotted + "[].")
        elif sub is not None and sub not in (RewardSpec, FilterSpec):
            rows += field_help(sub, dotted + ".")
        else:
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            rows.append((dotted, default, field.description or ""))
    return rows


def _marked(row: tuple[str, str, str], backend: str) -> tuple[str, str, str]:
    """`row` with its description starting `backend:` (a field only that backend has)."""
    name, default, text = row
    if not text.startswith(f"{backend}:") and f", {backend}:" not in text and f"{backend}: " not in text[:40]:
        text = f"{backend}: {text}"
    return name, default, text
