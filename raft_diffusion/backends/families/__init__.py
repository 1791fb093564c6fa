"""What differs between the diffusion pipeline families, and nothing else.

RAFT needs samples, scores and a denoising loss. The families (one file each here) differ in four places, and the
diffusion backend asks its family for each:

- **prompt encoding**: SD 1.x/2.x gives one tensor per prompt (CLIP hidden states); SDXL its two CLIP
  encoders' hidden states side by side plus bigG's pooled embedding (sdxl.py: and the size
  conditioning the UNet gets beside them); SD 3 gives the joint sequence (two CLIP encoders side by
  side, then T5 or zeros) plus the pooled CLIP embeddings; FLUX.1 T5's sequence plus CLIP-L's pooled
  embedding (flux.py: no negative prompt; dev's guidance value goes into its guidance embedding). All are dicts of per-sample tensors named
  as the pipelines' keyword arguments;
- **sampling call**: DDIM's `eta` for SD 1.x; SD 3 and FLUX.1 sample with their flow-matching Euler
  scheduler (FLUX's latents come out packed, 2x2 patches as tokens, and are unpacked);
- **training target**: SD 1.x and SDXL: the scheduler's epsilon or v at uniform integer timesteps (DDPM
  noising). SD 3: rectified flow with the timestep density of diffusers' SD 3 training scripts
  (`weighting_scheme` logit_normal: u = sigmoid(N(0, 1)) as an index into the training scheduler's
  shifted sigmas), the noisy latents `(1 - sigma) x0 + sigma noise`, the velocity target
  `noise - x0`, uniform loss weighting (their `precondition_outputs` variant, which compares x0
  predictions and so weights the same error by sigma^2, is not used). FLUX.1: the same flow, its sigma
  shifted by the image's token count as its sampler shifts it (flux.py);
- **LoRA save**: `unet_lora_layers` or `transformer_lora_layers`, each under its pipeline's
  `save_lora_weights`, so that pipeline's `load_lora_weights` reads it; also under kohya's names
  (lora_formats; SDXL on its original SGM UNet layout, SD 3 on MMDiT's, FLUX.1 on BFL's in
  lora_formats_flux), for ComfyUI, Forge, AUTOMATIC1111 and kohya.
"""

from __future__ import annotations

from ...errors import UserError
from .sd import SCHEDULERS, Cond, StableDiffusion
from .flux import Flux
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

__all__ = ["FAMILIES", "SCHEDULERS", "Cond", "Flux", "StableDiffusion", "StableDiffusion3", "StableDiffusionXL",
           "family_of"]

# a pipeline class name (model_index.json's `_class_name`) -> its family
FAMILIES: dict[str, StableDiffusion] = {
    "StableDiffusionPipeline": StableDiffusion(),
    "StableDiffusionXLPipeline": StableDiffusionXL(),
    "StableDiffusion3Pipeline": StableDiffusion3(),
    "FluxPipeline": Flux(),
}


def family_of(pipe) -> StableDiffusion:
    for family in FAMILIES.values():
        if type(pipe) is family.pipeline_class:
            return family
    raise UserError("config model.path", f"{type(pipe).__name__} is not supported",
                    "use a Stable Diffusion 1.x/2.x, XL, 3.x or FLUX.1 pipeline")
