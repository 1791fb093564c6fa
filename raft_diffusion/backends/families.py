"""What differs between the diffusion pipeline families, and nothing else.

RAFT needs samples, scores and a denoising loss. The families differ in four places, and the
diffusion backend asks its family for each:

- **prompt encoding**: SD 1.x/2.x gives one tensor per prompt (CLIP hidden states); SD 3 gives the
  joint sequence (two CLIP encoders side by side, then T5 or zeros) plus the pooled CLIP embeddings.
  Both are dicts of per-sample tensors named as the pipelines' keyword arguments;
- **sampling call**: DDIM's `eta` for SD 1.x; SD 3 samples with its flow-matching Euler scheduler;
- **training target**: SD 1.x: the scheduler's epsilon or v at uniform integer timesteps (DDPM
  noising). SD 3: rectified flow with the timestep density of diffusers' SD 3 training scripts
  (`weighting_scheme` logit_normal: u = sigmoid(N(0, 1)) as an index into the training scheduler's
  shifted sigmas), the noisy latents `(1 - sigma) x0 + sigma noise`, the velocity target
  `noise - x0`, uniform loss weighting (their `precondition_outputs` variant, which compares x0
  predictions and so weights the same error by sigma^2, is not used);
- **LoRA save**: `unet_lora_layers` or `transformer_lora_layers`, each under its pipeline's
  `save_lora_weights`, so that pipeline's `load_lora_weights` reads it; SD 1.x/2.x also under
  kohya's names (lora_formats), for ComfyUI, Forge, AUTOMATIC1111 and kohya.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       StableDiffusion3Pipeline, StableDiffusionPipeline)
from diffusers.training_utils import compute_density_for_timestep_sampling

from ..config import GenerationConfig
from ..errors import UserError
from ..lora_formats import KOHYA_FILE, check_kohya, write_kohya, write_sd3_kohya

Cond = dict[str, torch.Tensor]  # per-sample prompt encodings, by the pipeline's keyword names
SCHEDULERS = {"ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler}  # SD 1.x/2.x: generation.scheduler


class StableDiffusion:
    """SD 1.x / 2.x: UNet2DConditionModel, epsilon or v prediction."""

    name = "Stable Diffusion 1.x/2.x"
    pipeline_class = StableDiffusionPipeline
    denoiser = "unet"
    clip_tokenizers = ("tokenizer",)  # supplied from open_clip's BPE where a local directory lacks them
    lora_examples = "to_q, to_k, to_v, to_out.0, proj_in, conv1"
    # layers only the other family's denoiser has: a config written for one family (the toy demos' convolutions)
    # runs on the other with them skipped, while a name neither has is still a typo
    foreign_layers = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "context_embedder", "x_embedder",
                      "norm1.linear", "norm1_context.linear", "ff_context.net.0.proj", "ff_context.net.2")

    def encode(self, pipe, prompts: list[str], guided: bool, negative: str) -> tuple[Cond, Cond | None]:
        cond, uncond = pipe.encode_prompt(prompts, pipe.device, 1, guided, [negative] * len(prompts) if guided else None)
        return {"prompt_embeds": cond}, ({"prompt_embeds": uncond} if guided else None)

    def call_options(self, gen: GenerationConfig) -> dict[str, Any]:
        return {"eta": gen.eta}

    def check_generation(self, gen: GenerationConfig, scheduler_field: str, eta_field: str) -> None:
        return None

    def sampler(self, pipe, name: str):
        return SCHEDULERS[name].from_config(pipe.scheduler.config)

    def training_scheduler(self, pipe):
        sched = DDPMScheduler.from_config(pipe.scheduler.config)
        if sched.config.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError("config model.path", f"prediction type {sched.config.prediction_type!r} is not supported",
                            "use an epsilon or v-prediction model")
        return sched

    def noised(self, sched, x0: torch.Tensor, generator: torch.Generator, device) -> tuple[torch.Tensor, ...]:
        """(noisy, timesteps, target) for a batch of clean latents."""
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=generator).to(device)
        x0 = x0.to(device)
        noisy = sched.add_noise(x0, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
        return noisy, t, target

    def predict(self, model, noisy: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return model(noisy, t, encoder_hidden_states=cond["prompt_embeds"]).sample

    def sample_size(self, pipe) -> int:
        size = pipe.unet.config.sample_size
        return size[0] if isinstance(size, (list, tuple)) else size

    def latent_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor

    def save_lora(self, directory: str, layers: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
        StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True,
                                                  unet_lora_adapter_metadata=metadata)

    def save_client_lora(self, directory: str, layers: dict[str, torch.Tensor], config: dict[str, Any],
                         denoiser_config: dict[str, Any], model_path: str) -> None:
        """The same LoRA under kohya's names (`lora_formats.KOHYA_FILE`), which ComfyUI, Forge,
        AUTOMATIC1111 and kohya's sd-scripts load whole (they attach nothing of the diffusers file)."""
        write_kohya(f"{directory}/{KOHYA_FILE}", layers, config, denoiser_config, model_path)

    def check_client_lora(self, config: dict[str, Any]) -> None:
        """Refuse, before training, a LoRA config that `save_client_lora` could not write."""
        check_kohya(config)

    def lora_tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The file's denoiser LoRA tensors under PEFT's names, without the `unet.` prefix."""
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

        unet = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
        return convert_unet_state_dict_to_peft(unet)


class StableDiffusion3(StableDiffusion):
    """SD 3 / 3.5: SD3Transformer2DModel (MMDiT), rectified flow."""

    name = "Stable Diffusion 3"
    pipeline_class = StableDiffusion3Pipeline
    denoiser = "transformer"
    clip_tokenizers = ("tokenizer", "tokenizer_2")
    optional_components = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
    lora_examples = "to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out"
    foreign_layers = ("proj_in", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out",
                      "proj_out")
    logit_mean, logit_std = 0.0, 1.0  # diffusers' SD 3 scripts' defaults (weighting_scheme logit_normal)

    def encode(self, pipe, prompts: list[str], guided: bool, negative: str) -> tuple[Cond, Cond | None]:
        # Without T5, SD 3 appends zeros for it: 256 tokens by default; a model trained with fewer says
        # so in its pipeline config (builtin:toy-shapes-flow: none, `_t5_tokens` 0; toyworld/models.py).
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=pipe.device, num_images_per_prompt=1,
            do_classifier_free_guidance=guided, negative_prompt=[negative] * len(prompts) if guided else None,
            max_sequence_length=pipe.config.get("_t5_tokens", 256))
        return ({"prompt_embeds": cond, "pooled_prompt_embeds": pooled},
                {"prompt_embeds": uncond, "pooled_prompt_embeds": uncond_pooled} if guided else None)

    def call_options(self, gen: GenerationConfig) -> dict[str, Any]:
        return {}

    def check_generation(self, gen: GenerationConfig, scheduler_field: str, eta_field: str) -> None:
        # `ddim` is the config's default: a flow model samples with its own Euler scheduler then.
        if gen.scheduler != "ddim":
            raise UserError(scheduler_field, f"{gen.scheduler} is for SD 1.x; a flow-matching model samples "
                            "with its FlowMatchEulerDiscreteScheduler", f"leave {scheduler_field.split()[-1]} out")
        if gen.eta:
            raise UserError(eta_field, "eta is DDIM's; flow-matching Euler sampling has none",
                            f"leave {eta_field.split()[-1]} out (0)")

    def sampler(self, pipe, name: str):
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def training_scheduler(self, pipe):
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def noised(self, sched, x0: torch.Tensor, generator: torch.Generator, device) -> tuple[torch.Tensor, ...]:
        n = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator)
        u = compute_density_for_timestep_sampling("logit_normal", n, self.logit_mean, self.logit_std,
                                                  generator=generator)
        index = (u * sched.config.num_train_timesteps).long().clamp(max=len(sched.sigmas) - 1)
        sigma = sched.sigmas[index].view(n, *([1] * (x0.ndim - 1))).to(x0.dtype)
        noisy = (1 - sigma) * x0 + sigma * noise
        return noisy.to(device), sched.timesteps[index].to(device), (noise - x0).to(device)

    def predict(self, model, noisy: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return model(hidden_states=noisy, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                     pooled_projections=cond["pooled_prompt_embeds"]).sample

    def sample_size(self, pipe) -> int:
        return pipe.transformer.config.sample_size

    def latent_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def save_lora(self, directory: str, layers: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
        StableDiffusion3Pipeline.save_lora_weights(directory, transformer_lora_layers=layers, safe_serialization=True,
                                                   transformer_lora_adapter_metadata=metadata)

    def save_client_lora(self, directory: str, layers: dict[str, torch.Tensor], config: dict[str, Any],
                         denoiser_config: dict[str, Any], model_path: str) -> None:
        """The same LoRA under kohya's SD 3 names on the MMDiT layout (`lora_formats.KOHYA_FILE`): Forge
        maps no diffusers-format SD 3 LoRA; it, ComfyUI and kohya's sd-scripts load this one."""
        write_sd3_kohya(f"{directory}/{KOHYA_FILE}", layers, config, denoiser_config, model_path)

    def check_client_lora(self, config: dict[str, Any]) -> None:
        check_kohya(config)

    def lora_tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")}


FAMILIES = {"StableDiffusionPipeline": StableDiffusion(), "StableDiffusion3Pipeline": StableDiffusion3()}


def family_of(pipe) -> StableDiffusion:
    for family in FAMILIES.values():
        if type(pipe) is family.pipeline_class:
            return family
    raise UserError("config model.path", f"{type(pipe).__name__} is not supported",
                    "use a Stable Diffusion 1.x/2.x or 3.x pipeline")
