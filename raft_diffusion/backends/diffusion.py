"""The diffusion backend: an SD 1.x/2.x, SDXL, SD 3 or FLUX.1 pipeline whose denoiser (UNet or
transformer) carries a trainable PEFT LoRA; RAFT's sampling and fine-tuning on it.

Every object is the diffusers one (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`,
`StableDiffusion3Pipeline`, `FluxPipeline`, their schedulers, `add_adapter`, `save_lora_weights`), so a
diffusers user recognises all of it. What differs between the families (prompt encoding, sampling
call, training target, LoRA save) is in families/, one file each; loading a model in loading.py, LoRA
files in lora_io.py, sampling and prompt encodings in sampling.py.
Generation keeps each sample's final latents; fine-tuning trains on them directly, so the VAE never
encodes during training.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from ..config import RunConfig
from ..errors import UserError
from ..ema import LoraEMA
from ..rewards.jpeg import to_uint8
from ..protocols import Samples
from ..weights import canonicalize_safetensors
from .families import Cond, family_of
from .loading import BUILTINS, check_resolution, load_pipeline, make_scheduler
from .lora_io import LORA_WEIGHTS
from .sampling import DiffusionExpert, PromptEncoder, memory_options, take_cond, encode_images, generate_latents
from .training import LoraTraining, check_lora_targets, fine_tune

def _present_targets(denoiser, targets: list[str], family, say: bool) -> list[str]:
    """`lora.target_modules` less the layers only the other family has (a UNet's convolutions on SD 3's
    transformer), said in one line; left whole when that would leave nothing, so the check names them."""
    names = [n for n, _ in denoiser.named_modules()]
    foreign = [t for t in targets if t in family.foreign_layers and not any(n == t or n.endswith("." + t) for n in names)]
    if not foreign or len(foreign) == len(targets):
        return targets
    if say:
        print(f"note: lora.target_modules {', '.join(foreign)}: this {family.name} {family.denoiser} has no such "
              "layers; the LoRA goes on the others", file=sys.stderr)
    return [t for t in targets if t not in foreign]


class DiffusionBackend(LoraTraining):
    """RAFT's generator: an SD pipeline whose denoiser (UNet, or SD 3's transformer) carries a trainable LoRA."""

    kind = "diffusion"

    def __init__(self, config: RunConfig, accelerator: Accelerator):
        self.config = config
        self.accelerator = accelerator
        self.device = accelerator.device
        gen = config.generation
        pipe = load_pipeline(config.model.path, config.model.dtype, config.model.revision, config.model.variant,
                             field="config model.path", vae=config.model.vae)
        self.family = family = family_of(pipe)
        family.bind(pipe)
        check_resolution(pipe, gen.resolution, "config generation.resolution")
        family.check_generation(gen, "config generation.scheduler", "config generation.eta")
        pipe.scheduler = make_scheduler(pipe, gen.scheduler)
        pipe.set_progress_bar_config(disable=True)
        frozen = [part for part in pipe.components.values() if isinstance(part, torch.nn.Module)]
        for part in frozen:
            part.requires_grad_(False)
        lora = config.lora
        unet = getattr(pipe, family.denoiser)  # the UNet, or SD 3's transformer
        what = "UNet module" if family.denoiser == "unet" else "transformer module"
        targets = _present_targets(unet, list(lora.target_modules), family, accelerator.is_main_process)
        check_lora_targets(unet, targets, what, family.lora_examples)
        unet.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                    target_modules=targets, init_lora_weights="gaussian"))
        family.check_client_lora(unet.peft_config["default"].to_dict())  # refused now, not at the run's end
        # A pipeline built from configs, and the LoRA layers just added, start in train mode: sampling
        # must not draw LoRA dropout (only fine-tuning switches it on, and off again).
        for part in frozen:
            part.eval()
        # The frozen model may be half precision; the trained LoRA weights stay float32.
        cast_training_params(unet, dtype=torch.float32)
        self.lora_params = [p for p in unet.parameters() if p.requires_grad]
        if config.training.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        pipe.to(self.device)
        self.pipe = pipe
        memory_options(pipe, config.model)
        self.encode = PromptEncoder(pipe, config.model.cache_prompt_embeddings, config.model.offload_text_encoders)
        # what caption dropout trains the unconditional branch on
        unguided = gen.model_copy(update={"guidance_scale": 1.0, "negative_prompt": ""})
        self.empty_embeds = {k: v.float().cpu() for k, v in self.encode([""], unguided)[0].items()}
        self.denoiser = self._prepare_training(unet, config, accelerator)
        self.noise_scheduler = family.training_scheduler(pipe)

    # -- generation -------------------------------------------------------------------------

    def generate(self, prompts: list[str], seeds: list[int], desc: str = "generate", steps: int | None = None
                 ) -> Samples:
        """One image per (prompt, seed), at `generation.steps` or `steps` (the cheap rollouts)."""
        gen = self.config.generation
        cond, uncond = self.encode(prompts, gen)
        if steps is not None:
            gen = gen.model_copy(update={"steps": steps})
        latents, images = generate_latents(self.pipe, cond, uncond, seeds, gen, desc,
                                           show=self.accelerator.is_local_main_process)
        return Samples(prompts=list(prompts), seeds=list(seeds), outputs=images,
                       payload={"latents": latents, **{k: v.float().cpu() for k, v in cond.items()}})

    # -- candidates of other experts (experts.py) ---------------------------------------------

    @staticmethod
    def check_model_path(path: str, field: str) -> None:
        """A `builtin:NAME` must be one of the registry's (other paths are tried when loaded)."""
        if path.startswith("builtin:") and path[len("builtin:"):] not in BUILTINS:
            raise UserError(field, f"unknown built-in diffusion model {path[len('builtin:'):]!r}",
                            f"available: {', '.join(BUILTINS)}")

    def load_expert(self, spec, field: str) -> DiffusionExpert:
        return DiffusionExpert(spec, self.config, self.device, field)

    def adopt(self, prompts: list[str], seeds: list, images: torch.Tensor) -> Samples:
        """Expert images as candidates the LoRA trains on: latents from this pipeline's VAE, prompt
        encodings from its text encoders (what `generate` keeps of its own samples)."""
        gen = self.config.generation
        cond, _ = self.encode(prompts, gen)
        latents = encode_images(self.pipe, images, gen.batch_size)
        return Samples(prompts=list(prompts), seeds=list(seeds), outputs=images.float().cpu(),
                       payload={"latents": latents, **{k: v.float().cpu() for k, v in cond.items()}})

    # -- fine-tuning ------------------------------------------------------------------------

    def _loss(self, x0: torch.Tensor, text: Cond, generator: torch.Generator, per_sample: bool = False,
              optimality: torch.Tensor | None = None, old_policy: LoraEMA | None = None) -> torch.Tensor:
        """The family's denoising MSE (SD 1.x: the scheduler's epsilon or v at uniformly random
        timesteps; SD 3: the flow velocity at logit-normal sigmas), plus `training.anchor_weight`
        times the MSE to the base model's prediction (adapter off) on the same noisy input. A
        scalar, or one value per sample (N,) with `per_sample`."""
        noisy, t, target = self.family.noised(self.noise_scheduler, x0, generator, self.device)
        dtype = self._denoiser().dtype
        text = {k: v.to(self.device, dtype) for k, v in text.items()}
        # The old policy first: it swaps the EMA into the LoRA's tensors, which must not happen
        # while autograd holds them for this step's backward.
        old = self._old_prediction(old_policy, noisy.to(dtype), t, text) if optimality is not None else None
        with self.precision.autocast():
            pred = self.family.predict(self.denoiser, noisy.to(dtype), t, text, self.config.generation.guidance_scale)
        reduce = (lambda x: x.mean(dim=tuple(range(1, x.ndim)))) if per_sample else (lambda x: x.mean())
        if optimality is not None:
            loss = self._negative_aware(pred.float(), old, target.float(), optimality.to(pred.device, torch.float32))
        elif per_sample:
            loss = reduce((pred.float() - target.float()) ** 2)
        else:
            loss = F.mse_loss(pred.float(), target.float())
        anchor = self.config.training.anchor_weight
        if anchor:
            loss = loss + anchor * reduce((pred.float() - self._base_prediction(noisy.to(dtype), t, text)) ** 2)
        return loss

    def _negative_aware(self, pred: torch.Tensor, old: torch.Tensor, target: torch.Tensor,
                        r: torch.Tensor) -> torch.Tensor:
        """(N,) DiffusionNFT's loss (arXiv 2509.16117, eq. 5-6): r ||v+ - target||^2 + (1 - r) ||v- - target||^2
        with v+ = (1 - b) v_old + b v and v- = (1 + b) v_old - b v, b = training.negative_aware.beta."""
        b = self.config.training.negative_aware.beta
        positive = (1 - b) * old + b * pred
        negative = (1 + b) * old - b * pred
        per = lambda x: x.mean(dim=tuple(range(1, x.ndim)))  # noqa: E731
        return r * per((positive - target) ** 2) + (1 - r) * per((negative - target) ** 2)

    @torch.no_grad()
    def _old_prediction(self, old_policy: LoraEMA, noisy: torch.Tensor, t: torch.Tensor, text: Cond) -> torch.Tensor:
        """The old policy's prediction: the same denoiser with the EMA of the LoRA swapped in."""
        with old_policy.applied(), self.precision.autocast():
            return self.family.predict(self._denoiser(), noisy, t, text, self.config.generation.guidance_scale).float()

    @torch.no_grad()
    def _base_prediction(self, noisy: torch.Tensor, t: torch.Tensor, text: Cond) -> torch.Tensor:
        """The frozen base denoiser's prediction: the same forward with the LoRA switched off."""
        denoiser = self._denoiser()
        denoiser.disable_adapters()
        try:
            with self.precision.autocast():
                return self.family.predict(denoiser, noisy, t, text, self.config.generation.guidance_scale).float()
        finally:
            denoiser.enable_adapters()

    def _drop_captions(self, text: Cond, generator: torch.Generator) -> Cond:
        """Replace a `training.caption_dropout` share of the prompt encodings by the empty prompt's."""
        p = self.config.training.caption_dropout
        if not p:
            return text
        drop = torch.rand(len(text["prompt_embeds"]), generator=generator) < p
        return {k: torch.where(drop.view(-1, *([1] * (v.ndim - 1))), self.empty_embeds[k].to(v.dtype), v)
                for k, v in text.items()}

    def train(self, samples: Samples, generator: torch.Generator, old_policy: LoraEMA | None = None) -> float:
        """Fine-tune the LoRA on `samples`; returns the mean loss (NaN when there is nothing). `old_policy`:
        what negative_aware's implicit policies reach from (the LoRA's EMA)."""
        cfg = self.config.training
        n = len(samples)
        if n == 0:
            return math.nan
        latents = samples.payload["latents"]
        text = {k: v for k, v in samples.payload.items() if k.endswith("prompt_embeds")}  # the family's encodings
        weights = samples.payload.get("weight")  # per-sample, from the objective; None: all equal
        optimality = samples.payload.get("optimality")  # negative_aware's r per sample
        if optimality is not None and old_policy is None:
            raise ValueError("negative_aware training needs the old policy (the LoRA's EMA)")
        losses = []

        def loss(batch: list[int], denominator: float) -> torch.Tensor:
            if weights is None and optimality is None:  # plain RAFT, one process: every sample counts once
                value = self._loss(latents[batch], self._drop_captions(take_cond(text, batch), generator), generator)
                losses.append(value.item())
                return value * len(batch) / denominator
            per = self._loss(latents[batch], self._drop_captions(take_cond(text, batch), generator), generator,
                             per_sample=True, optimality=None if optimality is None else optimality[batch],
                             old_policy=old_policy)
            if weights is None:
                losses.append(per.mean().item())
                return per.sum() / denominator
            w = weights[batch].to(per.device, per.dtype)
            real = w > 0  # zero weight: padding that evens out the processes' shares
            if bool(real.any()):
                losses.append(per[real].mean().item())
            return (w * per).sum() / denominator

        def weight_of(items: list[int]) -> float:
            return len(items) if weights is None else float(sum(weights[i] for i in items))

        fine_tune(self.accelerator, self.denoiser, self.optimizer, self.lora_params, cfg, range(n), generator, loss,
                  weight_of, self.precision)
        if not losses:
            return math.nan
        return float(sum(losses) / len(losses))

    # -- samples, adapter and state ----------------------------------------------------------

    def write_samples(self, samples: Samples, directory: Path, start: int = 0) -> list[dict[str, Any]]:
        rows = []
        for i, array in enumerate(to_uint8(samples.outputs), start):
            name = f"{i:04d}.png"
            Image.fromarray(array).save(directory / name)
            rows.append({"file": name})
        return rows

    def eval_metrics(self, samples: Samples) -> dict[str, float]:
        return {}

    def _denoiser(self):
        return self.accelerator.unwrap_model(self.denoiser)

    _peft_module = _denoiser

    def save_adapter(self, directory: Path) -> None:
        """`pytorch_lora_weights.safetensors` that `pipe.load_lora_weights(directory)` loads whole, with its alpha;
        also `lora_kohya.safetensors`, the same LoRA under kohya's names (lora_formats; for SD 3 on the MMDiT layout)."""
        denoiser = self._denoiser()
        # PEFT's own names (`unet.<module>.lora_A.weight`, `transformer.<module>...`), unconverted:
        # convert_state_dict_to_diffusers renames only attention layers (to `lora.down`), and diffusers
        # reads a file in the one naming scheme of its first key, so a mixed file silently lost one
        # kind of layer (the demos' attention).
        layers = get_peft_model_state_dict(denoiser)
        config = _sorted_sets(denoiser.peft_config["default"].to_dict())
        self.family.save_lora(str(directory), layers, config)
        canonicalize_safetensors(Path(directory) / LORA_WEIGHTS)
        described = {**dict(denoiser.config), "prediction_type": self.pipe.scheduler.config.get("prediction_type")}
        self.family.save_client_lora(str(directory), layers, config, described, str(self.config.model.path))



def _sorted_sets(config: dict[str, Any]) -> dict[str, Any]:
    # PEFT keeps target_modules as a set; its order follows string hashing, which changes from one
    # process to the next. Sorted, the saved file is byte-identical across runs.
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}

