"""SD 1.x / 2.x: UNet2DConditionModel, epsilon or v prediction, DDPM noising; see `families/__init__.py`."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

from ...config import GenerationConfig
from ...errors import UserError
from ...lora_formats import KOHYA_FILE, check_kohya, kohya_name, write_kohya

Cond = dict[str, torch.Tensor]  # per-sample prompt encodings, by the pipeline's keyword names
SCHEDULERS = {"ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler}  # SD 1.x/2.x: generation.scheduler


class StableDiffusion:
    """SD 1.x / 2.x: UNet2DConditionModel, epsilon or v prediction."""

    name = "Stable Diffusion 1.x/2.x"
    pipeline_class = StableDiffusionPipeline
    denoiser = "unet"
    clip_tokenizers = ("tokenizer",)  # supplied from open_clip's BPE where a local directory lacks them
    optional_components: tuple[str, ...] = ()  # passed as None where a saved pipeline has none
    load_options: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}  # from_pretrained's
    # a key fragment only this family's single-file checkpoints hold (None: the fallback, SD 1.x/2.x)
    single_file_marker: str | None = None
    lora_examples = "to_q, to_k, to_v, to_out.0, proj_in, conv1"
    vae_upcast = False  # whether a float16 VAE whose config has `force_upcast` decodes in float32 (SDXL's pipeline)
    # layers only the other family's denoiser has: a config written for one family (the toy demos' convolutions)
    # runs on the other with them skipped, while a name neither has is still a typo
    foreign_layers = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "context_embedder", "x_embedder",
                      "norm1.linear", "norm1_context.linear", "ff_context.net.0.proj", "ff_context.net.2")

    def encode(self, pipe, prompts: list[str], guided: bool, negative: str) -> tuple[Cond, Cond | None]:
        cond, uncond = pipe.encode_prompt(prompts, pipe.device, 1, guided, [negative] * len(prompts) if guided else None)
        return {"prompt_embeds": cond}, ({"prompt_embeds": uncond} if guided else None)

    def bind(self, pipe) -> None:
        """Called once a pipeline is loaded for sampling and training: what `predict` needs of it beyond
        the latents and prompt encodings (SDXL: the VAE's scale, for its size conditioning), or a refusal."""
        return None

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

    def predict(self, model, noisy: torch.Tensor, t: torch.Tensor, cond: Cond, guidance: float | None = None
                ) -> torch.Tensor:
        """The denoiser's output for noisy latents; `guidance`: the distilled guidance value (FLUX.1-dev's)."""
        return model(noisy, t, encoder_hidden_states=cond["prompt_embeds"]).sample

    def pipeline_latents(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipeline's `output_type="latent"` output as (N, C, h, w) latents (FLUX packs them)."""
        return latents

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

    def client_lora_name(self, module: str, denoiser_config: dict[str, Any]) -> str:
        """kohya's name (`lora_unet_...`) of a denoiser module in `save_client_lora`'s file (UNet families)."""
        return kohya_name(module)

    def lora_tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The file's denoiser LoRA tensors under PEFT's names, without the `unet.` prefix."""
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

        unet = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
        return convert_unet_state_dict_to_peft(unet)
