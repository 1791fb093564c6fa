"""Stable Diffusion XL on the same loop: builtin:tiny-sdxl, its size conditioning, every objective, the
LoRA through StableDiffusionXLPipeline.load_lora_weights, kohya's SGM-layout file through diffusers'
own kohya loader, `export --format kohya`, loading from a local directory, single files, the VAE."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from raft_diffusion.backends.families import StableDiffusionXL, family_of
from raft_diffusion.backends.loading import _single_file_class, load_pipeline, make_scheduler
from raft_diffusion.backends.lora_io import load_lora
from raft_diffusion.backends.sampling import decode_latents
from raft_diffusion.cli import main
from raft_diffusion.errors import UserError
from raft_diffusion.lora_formats import KOHYA_FILE, write_sdxl_kohya
from raft_diffusion.train import run_training

from .conftest import TINY_CONFIG, copy_run, deep_update, one_error_line, run_in_process, write_yaml
from .test_lora_roundtrip import assert_reproduces_eval

SDXL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SDXL = {"model": {"path": "builtin:tiny-sdxl"}, "lora": {"rank": 4, "alpha": 8, "target_modules": SDXL_TARGETS}}
# every kind of UNet layer a kohya SDXL LoRA can sit on: attention, resnets, samplers, embeddings
EVERY_KIND = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
              "conv2", "conv_shortcut", "time_emb_proj", "conv", "linear_1", "linear_2", "conv_in", "conv_out"]


@pytest.fixture
def sdxl_config(tiny_config):
    def make(**overrides):
        return tiny_config(**deep_update(SDXL, overrides))
    return make


def _random_lora(unet, targets, rank=2, alpha=6.0):
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return get_peft_model_state_dict(unet), {"r": rank, "lora_alpha": alpha}


def _fresh(config):
    """The run's base pipeline sampling as the run does (its DDIM; SDXL ships an Euler scheduler)."""
    pipe = load_pipeline(config.model.path)
    pipe.scheduler = make_scheduler(pipe, config.generation.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _attached(pipe) -> tuple[str, dict[str, torch.Tensor]]:
    (adapter,) = pipe.unet.peft_config
    return adapter, get_peft_model_state_dict(pipe.unet, adapter_name=adapter)


def test_tiny_sdxl_is_sdxl_and_the_same_every_time():
    pipe = load_pipeline("builtin:tiny-sdxl")
    assert type(pipe) is StableDiffusionXLPipeline and isinstance(family_of(pipe), StableDiffusionXL)
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.text_encoder_2 is not None
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size + \
        pipe.text_encoder_2.config.hidden_size
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.force_upcast
    again = load_pipeline("builtin:tiny-sdxl")
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), again.unet.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(pipe.text_encoder_2.parameters(), again.text_encoder_2.parameters()))


def test_the_encodings_and_time_ids_are_what_the_pipeline_and_the_training_script_use():
    pipe = load_pipeline("builtin:tiny-sdxl")
    family = family_of(pipe)
    family.bind(pipe)
    cond, uncond = family.encode(pipe, ["a cat", "a red square"], True, "")
    assert set(cond) == set(uncond) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert cond["prompt_embeds"].shape == (2, 77, 64) and cond["pooled_prompt_embeds"].shape == (2, 32)
    # force_zeros_for_empty_prompt: no negative prompt is zeros, as the pipeline makes it
    assert not uncond["prompt_embeds"].any() and not uncond["pooled_prompt_embeds"].any()
    _, worded = family.encode(pipe, ["a cat"], True, "blurry")
    assert worded["prompt_embeds"].any()
    # diffusers' train_text_to_image_lora_sdxl.py compute_time_ids: original size + crop (0, 0) + target size
    latents = torch.randn(3, 4, 8, 12)
    ids = family.time_ids(pipe.unet, latents)
    assert ids.tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]] * 3
    # the pipeline's own UNet call with its default added conditioning gives the same prediction
    t = torch.tensor([500, 500, 500])
    text = {k: v[:1].repeat(3, *[1] * (v.ndim - 1)) for k, v in cond.items()}
    pipe_ids = pipe._get_add_time_ids((64, 96), (0, 0), (64, 96), torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    with torch.no_grad():
        ours = family.predict(pipe.unet, latents, t, text)
        theirs = pipe.unet(latents, t, encoder_hidden_states=text["prompt_embeds"], added_cond_kwargs={
            "text_embeds": text["pooled_prompt_embeds"], "time_ids": pipe_ids.repeat(3, 1)}).sample
        other = pipe.unet(latents, t, encoder_hidden_states=text["prompt_embeds"], added_cond_kwargs={
            "text_embeds": text["pooled_prompt_embeds"], "time_ids": (pipe_ids * 2).repeat(3, 1)}).sample
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, other)  # the size conditioning matters


@pytest.mark.parametrize("training", [
    {},
    {"objective": "reward_weighted", "reward_weighted": {"beta": 0.5}, "ema_decay": 0.5, "anchor_weight": 1.0},
    {"objective": "negative_aware", "ema_decay": 0.5, "caption_dropout": 0.5},
], ids=["raft", "reward_weighted-ema-anchor", "negative_aware-ema-caption_dropout"])
def test_tiny_sdxl_trains_two_iterations_with_each_objective(sdxl_config, training):
    config = sdxl_config(training={"learning_rate": 5e-3, "epochs": 2, **training})
    records = run_training(config, log=lambda _: None)
    run = Path(config.output_dir)
    assert [r["iteration"] for r in records] == [0, 1]
    assert all(np.isfinite(r["train_loss"]) for r in records)
    first, last = (load_file(str(run / f"checkpoints/iter_000{i}/adapter.safetensors")) for i in (0, 1))
    assert first.keys() == last.keys() and any(not first[k].equal(last[k]) for k in first)  # it trained
    layers = {k.split(".lora_")[0] for k in first}
    assert {t for t in SDXL_TARGETS if any(layer.endswith("." + t) for layer in layers)} == set(SDXL_TARGETS)


def test_the_sdxl_lora_loads_in_plain_diffusers_and_reproduces_the_eval_images(sdxl_config, tmp_path, capfd):
    targets = SDXL_TARGETS + ["proj_in", "conv1", "conv2", "time_emb_proj"]
    config = sdxl_config(lora={"target_modules": targets}, raft={"iterations": 1},
                         training={"learning_rate": 5e-3, "epochs": 2})
    run_training(config, log=lambda _: None)
    run = Path(config.output_dir)
    trained = load_file(str(run / "checkpoints/iter_0000/adapter.safetensors"))
    saved = load_file(str(run / "final/pytorch_lora_weights.safetensors"))
    assert set(saved) == {f"unet.{k}" for k in trained}

    pipe = _fresh(config)
    pipe.load_lora_weights(str(run / "final"))  # diffusers' own loader
    adapter, attached = _attached(pipe)
    assert pipe.unet.peft_config[adapter].lora_alpha == 8
    assert attached.keys() == trained.keys() and all(attached[k].equal(v) for k, v in trained.items())
    assert_reproduces_eval(pipe, config, run / "samples/iter_0000/eval")

    # kohya's file: SGM names, kohya's metadata, every layer through diffusers' kohya loader at alpha / rank
    path = run / "final" / KOHYA_FILE
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in keys  # down block 0's first resnet conv1
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)
    kohya = _fresh(config)
    kohya.load_lora_weights(str(path))
    adapter, from_kohya = _attached(kohya)
    assert from_kohya.keys() == trained.keys() and all(from_kohya[k].equal(v) for k, v in trained.items())
    assert all(m.scaling[adapter] == 2.0 for _, m in kohya.unet.named_modules() if hasattr(m, "scaling"))
    checked = _fresh(config)
    load_lora(checked, path)  # `generate --lora`: every layer at its strength, or a refusal
    assert_reproduces_eval(checked, config, run / "samples/iter_0000/eval")
    with pytest.raises(UserError, match="match no layer|does not fit"):
        load_lora(load_pipeline("builtin:tiny-sd"), path)  # on an SD 1.x UNet: refused

    # a run made before final/ held the file: `export --format kohya` makes the same bytes from the diffusers file
    old = copy_run(run, tmp_path / "old-run")
    (old / "final" / KOHYA_FILE).unlink()
    out = tmp_path / KOHYA_FILE
    result = run_in_process(capfd, "export", str(old), "--format", "kohya", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("conv_in", [False, True], ids=["blocks", "with-conv_in-conv_out-embeddings"])
def test_every_kind_of_layer_round_trips_through_diffusers_kohya_loader(tmp_path, conv_in):
    pipe = load_pipeline("builtin:tiny-sdxl")
    targets = EVERY_KIND if conv_in else [t for t in EVERY_KIND if t not in ("conv_in", "conv_out", "linear_1",
                                                                             "linear_2")]
    layers, config = _random_lora(pipe.unet, targets)
    path = tmp_path / KOHYA_FILE
    write_sdxl_kohya(path, layers, config, dict(pipe.unet.config), "builtin:tiny-sdxl")
    state = load_file(str(path))
    names = {k.split(".")[0] for k in state}
    if conv_in:
        assert {"lora_unet_input_blocks_0_0", "lora_unet_out_2", "lora_unet_label_emb_0_0",
                "lora_unet_time_embed_0"} <= names
    assert "lora_unet_input_blocks_3_0_op" in names and "lora_unet_output_blocks_2_2_conv" in names  # samplers
    assert "lora_unet_middle_block_2_out_layers_3" in names and "lora_unet_output_blocks_0_0_skip_connection" in names
    assert all(float(state[f"{n}.alpha"]) == 6.0 for n in names)
    back = load_pipeline("builtin:tiny-sdxl")
    back.load_lora_weights(str(path))
    adapter, attached = _attached(back)
    assert attached.keys() == layers.keys()
    assert all(attached[k].equal(v) for k, v in layers.items())
    assert all(m.scaling[adapter] == 3.0 for _, m in back.unet.named_modules() if hasattr(m, "scaling"))
    load_lora(load_pipeline("builtin:tiny-sdxl"), path)


def _small_sdxl_base_unet() -> UNet2DConditionModel:
    """SDXL base's UNet layout (three resolutions, 2048-wide cross-attention), narrow."""
    from raft_diffusion.tiny_sdxl import sdxl_unet_config

    config = {**sdxl_unet_config(), "block_out_channels": (32, 32, 64), "attention_head_dim": (2, 2, 2),
              "transformer_layers_per_block": (1, 1, 2), "addition_time_embed_dim": 8,
              "projection_class_embeddings_input_dim": 6 * 8 + 16, "norm_num_groups": 8}
    torch.manual_seed(0)
    return UNet2DConditionModel(**config)


@pytest.mark.parametrize("which", ["tiny-sdxl", "sdxl-base-layout"])
def test_the_sgm_names_are_the_layout_diffusers_reads_sdxl_single_files_in(which):
    # ComfyUI and Forge map `lora_unet_<checkpoint module>` onto an SDXL checkpoint's own weights: so every
    # UNet tensor, put under its module's SGM name, must be the single file diffusers' converter reads back
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from raft_diffusion.ldm_layout import sgm_unet_module

    unet = load_pipeline("builtin:tiny-sdxl").unet if which == "tiny-sdxl" else _small_sdxl_base_unet()
    config = dict(unet.config)
    own = unet.state_dict()
    checkpoint = {}
    for key, value in own.items():
        module, _, leaf = key.rpartition(".")
        checkpoint[f"model.diffusion_model.{sgm_unet_module(module, config)}.{leaf}"] = value
    assert len(checkpoint) == len(own)
    assert "model.diffusion_model.label_emb.0.0.weight" in checkpoint
    back = convert_ldm_unet_checkpoint(checkpoint, config)
    assert back.keys() == own.keys() and all(torch.equal(back[k], own[k]) for k in own)


def test_export_kohya_of_a_lone_diffusers_sdxl_file_needs_no_model_for_sdxl_base(tmp_path, capfd):
    # SDXL base's UNet layout, small: 2048-wide cross-attention tells SDXL apart from SD 1.x/2.x
    unet = _small_sdxl_base_unet()
    layers, lora = _random_lora(unet, ["to_k", "to_v", "conv1"])
    StableDiffusionXLPipeline.save_lora_weights(str(tmp_path / "lone"), unet_lora_layers=layers,
                                                unet_lora_adapter_metadata={**lora, "target_modules": ["to_k"]})
    out = tmp_path / "k.safetensors"
    result = run_in_process(capfd, "export", str(tmp_path / "lone/pytorch_lora_weights.safetensors"), "--format",
                            "kohya", "--out", str(out))
    assert result.returncode == 0, result.stderr
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        keys = set(f.keys())
    # down block 2's second transformer: input_blocks.8; up block 1's third resnet: output_blocks.5
    assert "lora_unet_input_blocks_8_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys
    assert "lora_unet_output_blocks_5_0_in_layers_2.lora_up.weight" in keys


def test_a_local_sdxl_directory_without_tokenizers_loads(tmp_path):
    pipe = load_pipeline("builtin:tiny-sdxl")
    pipe.save_pretrained(tmp_path / "sdxl")
    for name in ("tokenizer", "tokenizer_2"):  # as the toy assets ship: CLIP's BPE comes from open_clip
        for f in (tmp_path / "sdxl" / name).iterdir():
            f.unlink()
        (tmp_path / "sdxl" / name).rmdir()
    loaded = load_pipeline(str(tmp_path / "sdxl"))
    assert type(loaded) is StableDiffusionXLPipeline and loaded.tokenizer_2 is not None
    family = family_of(loaded)
    with torch.no_grad():
        a, _ = family.encode(loaded, ["a blue star"], False, "")
        b, _ = family.encode(pipe, ["a blue star"], False, "")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_sdxl_single_file_is_told_apart(tmp_path):
    save_file({"conditioner.embedders.1.model.positional_embedding": torch.zeros(2),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, tmp_path / "sdxl.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, tmp_path / "sd1.safetensors")
    assert _single_file_class(tmp_path / "sdxl.safetensors") is StableDiffusionXLPipeline
    assert _single_file_class(tmp_path / "sd1.safetensors").__name__ == "StableDiffusionPipeline"


def test_a_float16_sdxl_vae_decodes_in_float32_as_the_pipeline_upcasts():
    pipe = load_pipeline("builtin:tiny-sdxl", "float16")
    latents = torch.randn(1, 4, 8, 8)
    calls = []
    hook = pipe.vae.decoder.register_forward_pre_hook(lambda m, args: calls.append(args[0].dtype))
    try:
        images = decode_latents(pipe, latents)
    finally:
        hook.remove()
    assert calls == [torch.float32] and pipe.vae.dtype == torch.float16 and images.dtype == torch.float32
    fp32 = load_pipeline("builtin:tiny-sdxl")
    torch.testing.assert_close(images, decode_latents(fp32, latents), atol=2e-3, rtol=0)


def test_model_vae_replaces_the_pipelines_vae_and_offline_is_one_line(tmp_path, capfd):
    vae = AutoencoderKL.from_config(load_pipeline("builtin:tiny-sdxl").vae.config)
    with torch.no_grad():
        for p in vae.parameters():
            p.fill_(0.01)
    vae.save_pretrained(tmp_path / "vae")
    pipe = load_pipeline("builtin:tiny-sdxl", vae=str(tmp_path / "vae"), field="config model.path")
    assert all(bool((p == 0.01).all()) for p in pipe.vae.parameters())
    # a run with it samples through it, and its merged export carries it
    run_config = write_yaml(tmp_path / "v.yaml", deep_update(deep_update(TINY_CONFIG, SDXL), {
        "model": {"vae": str(tmp_path / "vae")}, "raft": {"iterations": 1}, "eval": {"every": 0}}))
    assert main(["train", str(run_config), "--output-dir", str(tmp_path / "vae-run")]) == 0
    assert main(["export", str(tmp_path / "vae-run"), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    merged = load_pipeline(str(tmp_path / "merged"))
    assert type(merged) is StableDiffusionXLPipeline and all(bool((p == 0.01).all()) for p in merged.vae.parameters())
    config = write_yaml(tmp_path / "c.yaml", deep_update(deep_update(TINY_CONFIG, SDXL),
                                                         {"model": {"vae": "madebyollin/sdxl-vae-fp16-fix"}}))
    code = main(["train", str(config), "--output-dir", str(tmp_path / "run")])
    line = one_error_line(capfd.readouterr().err)
    assert code == 2 and line.startswith("error: config model.vae") and not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting, field", [
    ({"generation": {"eta": -0.5}}, "config generation.eta"),
    ({"generation": {"resolution": 60}}, "config generation.resolution"),  # latents: multiples of 8
    ({"lora": {"target_modules": ["add_q_proj_typo"]}}, "config lora.target_modules"),
])
def test_an_sdxl_user_error_is_one_line_and_exit_2(tmp_path, capfd, setting, field):
    config = write_yaml(tmp_path / "c.yaml", deep_update(deep_update(TINY_CONFIG, SDXL), setting))
    code = main(["train", str(config), "--output-dir", str(tmp_path / "run")])
    line = one_error_line(capfd.readouterr().err)
    assert code == 2 and line.startswith(f"error: {field}")
    assert not (tmp_path / "run").exists()


def test_sdxl_random_has_sdxl_base_architecture_without_building_it():
    from raft_diffusion import model_registry
    from raft_diffusion.tiny_sdxl import sdxl_text_configs, sdxl_unet_config

    assert model_registry.DIFFUSION_BUILTINS["sdxl-random"].endswith(":builtin_sdxl_random")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_unet_config())
    assert 2.55e9 < sum(p.numel() for p in unet.parameters()) < 2.6e9  # SDXL base's 2,567 M
    clip_l, big_g = sdxl_text_configs()
    assert (clip_l.hidden_size + big_g.hidden_size, big_g.projection_dim) == (2048, 1280)
    assert unet.config.projection_class_embeddings_input_dim == 6 * 256 + big_g.projection_dim


def test_a_refiner_like_unet_with_aesthetic_score_ids_is_refused():
    # the refiner's added conditioning: five ids (sizes and the aesthetic score), not base SDXL's six
    from raft_diffusion.tiny_sdxl import tiny_sdxl_unet

    pipe = load_pipeline("builtin:tiny-sdxl")
    unet = tiny_sdxl_unet()
    unet.register_to_config(projection_class_embeddings_input_dim=5 * 8 + 32)
    pipe.unet = unet
    with pytest.raises(UserError, match="added-conditioning values"):
        family_of(pipe).bind(pipe)
    family_of(pipe).bind(load_pipeline("builtin:tiny-sdxl"))  # base SDXL's: accepted
