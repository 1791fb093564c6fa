"""ldm_layout (issue 24): a diffusers SD 1.x/2.x pipeline under the original LDM names, read back by
diffusers' own single-file reader tensor for tensor, in both text-encoder layouts."""

from __future__ import annotations

import pytest
import torch

from raft_diffusion.errors import UserError
from raft_diffusion.ldm_layout import pipeline_to_ldm, unet_to_ldm


@pytest.mark.parametrize("open_clip, layers", [(False, None), (True, None), (True, 23)],
                         ids=["sd1-clip", "sd2-open-clip", "sd2-open-clip-23-layers-as-sd2"])
def test_diffusers_reads_the_layout_back_tensor_for_tensor(tmp_path, open_clip, layers):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from raft_diffusion.tiny import tiny_pipeline

    torch.manual_seed(0)
    pipe = tiny_pipeline()
    if layers is not None:  # SD 2's depth: diffusers' 23 of OpenCLIP's 24 blocks
        config = pipe.text_encoder.config
        config.num_hidden_layers = layers
        pipe.text_encoder = CLIPTextModel(config)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):  # no two tensors alike, so a swap cannot pass
        for value in part.state_dict().values():
            value.copy_(torch.randn_like(value))
    pipe.save_pretrained(str(tmp_path / "config"))
    state = pipeline_to_ldm(pipe, open_clip=open_clip)
    prefix = "cond_stage_model.model." if open_clip else "cond_stage_model.transformer.text_model."
    assert any(k.startswith(prefix) for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    back = StableDiffusionPipeline.from_single_file(str(tmp_path / "model.safetensors"),
                                                    config=str(tmp_path / "config"), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    total = 0
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}.{key}"
        total += len(ours)
    fused = 4 * pipe.text_encoder.config.num_hidden_layers if open_clip else 0  # q, k, v -> in_proj
    added = [k for k in state if ".resblocks.23." in k or k.endswith("text_projection")]
    assert len(state) == total - fused + len(added)
    if layers == 23:  # the 24th block the other programs build: present, and a pass-through
        assert len(added) == 13  # in_proj (2), out_proj (2), ln_1/ln_2 (4), c_fc/c_proj (4), text_projection
        for key in added:
            if "out_proj" in key or "c_proj" in key:
                assert not state[key].any(), key  # zero outputs of attention and MLP: x + 0 + 0
        torch.testing.assert_close(state["cond_stage_model.model.text_projection"],
                                   torch.eye(pipe.text_encoder.config.hidden_size))
    else:
        assert added == []


def test_a_tensor_with_no_place_is_refused_not_dropped():
    from raft_diffusion.tiny import tiny_pipeline

    unet = tiny_pipeline().unet
    state = dict(unet.state_dict())
    state["add_embedding.linear_1.weight"] = torch.zeros(2, 2)  # SDXL's, which SD 1.x's layout lacks
    with pytest.raises(UserError, match="add_embedding"):
        unet_to_ldm(state, dict(unet.config))
