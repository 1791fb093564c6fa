"""SD 3 / 3.5: SD3Transformer2DModel (MMDiT), rectified flow; see `families/__init__.py`."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling

from ...config import GenerationConfig
from ...errors import UserError
from ...lora_formats import KOHYA_FILE, check_kohya, sd3_kohya_to_peft, sd3_targets, write_sd3_kohya
from .sd import Cond, StableDiffusion


class StableDiffusion3(StableDiffusion):
    """SD 3 / 3.5: SD3Transformer2DModel (MMDiT), rectified flow."""

    name = "Stable Diffusion 3"
    pipeline_class = StableDiffusion3Pipeline
    denoiser = "transformer"
    clip_tokenizers = ("tokenizer", "tokenizer_2")
    optional_components = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
    load_options: dict[str, Any] = {}
    single_file_marker = ".joint_blocks."
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

    def predict(self, model, noisy: torch.Tensor, t: torch.Tensor, cond: Cond, guidance: float | None = None
                ) -> torch.Tensor:
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

    def kohya_to_peft(self, transformer, state: dict[str, torch.Tensor], field: str
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A kohya-named file of this family (MMDiT layout) as PEFT layers and their LoRA config."""
        n = int(transformer.config.num_layers)
        names = [name for name, m in transformer.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        return sd3_kohya_to_peft(state, n, sd3_targets(names, n), field)

    def load_transformer_lora(self, pipe, layers: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        """PEFT layers (no prefix) and their LoRA config attached by the pipeline's own loader."""
        self.pipeline_class.load_lora_into_transformer(
            {f"transformer.{k}": v for k, v in layers.items()}, pipe.transformer, _pipeline=pipe,
            metadata={f"transformer.{k}": v for k, v in config.items()})  # prefixed, as diffusers' files are

    def lora_tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")}
