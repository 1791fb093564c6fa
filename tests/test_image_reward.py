"""`image_reward` against ImageReward's published formula and architecture, written out here independently:
the `image-reward` package cannot be installed beside this project (it pins timm 0.6.13; open_clip needs
timm 1.x), so the reference is its `score()` code path rebuilt from its parts: its preprocessing, BLIP's ViT
as timm's VisionTransformer (which BLIP's vit.py copies), BLIP's BERT with cross-attention written out in
plain torch from med.py's equations, its MLP head and its mean and std. A tiny random checkpoint in the
package's own tensor layout (`blip.visual_encoder.*`, `blip.text_encoder.*`, `mlp.layers.*`) stands for
THUDM/ImageReward's ImageReward.pt."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from raft_diffusion.errors import UserError
from raft_diffusion.rewards import build_reward
from raft_diffusion.rewards.jpeg import to_uint8

CPU = torch.device("cpu")
WORDS = ["a", "cat", "in", "monet", "style", "red", "square", "blue", "star", "on", "green", "field", ","]
MED = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48,
       "max_position_embeddings": 64, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0,
       "vocab_size": 5 + len(WORDS) + 2, "encoder_width": 64, "add_cross_attention": True, "model_type": "bert"}
VISION = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 1}  # 64 channels a head
PROMPTS = ["a cat in monet style", "a red square", "a blue star on a green field, in monet style"]


def _text_shapes(h: int, w: int, inter: int, layers: int, vocab: int, positions: int) -> dict[str, tuple]:
    shapes = {"embeddings.word_embeddings.weight": (vocab, h), "embeddings.position_embeddings.weight": (positions, h),
              "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,)}
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for block, width in (("attention", h), ("crossattention", w)):
            shapes |= {f"{p}.{block}.self.query.weight": (h, h), f"{p}.{block}.self.query.bias": (h,),
                       f"{p}.{block}.self.key.weight": (h, width), f"{p}.{block}.self.key.bias": (h,),
                       f"{p}.{block}.self.value.weight": (h, width), f"{p}.{block}.self.value.bias": (h,),
                       f"{p}.{block}.output.dense.weight": (h, h), f"{p}.{block}.output.dense.bias": (h,),
                       f"{p}.{block}.output.LayerNorm.weight": (h,), f"{p}.{block}.output.LayerNorm.bias": (h,)}
        shapes |= {f"{p}.intermediate.dense.weight": (inter, h), f"{p}.intermediate.dense.bias": (inter,),
                   f"{p}.output.dense.weight": (h, inter), f"{p}.output.dense.bias": (h,),
                   f"{p}.output.LayerNorm.weight": (h,), f"{p}.output.LayerNorm.bias": (h,)}
    return shapes


def _vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**VISION, mlp_ratio=4.0, qkv_bias=True, num_classes=0, global_pool="",
                             norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A folder as THUDM/ImageReward's: ImageReward.pt, med_config.json; plus a BERT tokenizer folder."""
    from transformers import BertTokenizer

    g = torch.Generator().manual_seed(0)
    vit = _vit()
    state = {f"blip.visual_encoder.{k}": v + 0.1 * torch.randn(v.shape, generator=g) for k, v in vit.state_dict().items()}
    for name, shape in _text_shapes(MED["hidden_size"], VISION["embed_dim"], MED["intermediate_size"],
                                    MED["num_hidden_layers"], MED["vocab_size"],
                                    MED["max_position_embeddings"]).items():
        base = 1.0 if "LayerNorm.weight" in name else 0.0
        state[f"blip.text_encoder.{name}"] = base + 0.2 * torch.randn(shape, generator=g)
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(MED["max_position_embeddings"])[None]
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), ((32, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        state[f"mlp.layers.{i}.weight"] = torch.randn((n_out, n_in), generator=g) / math.sqrt(n_in)
        state[f"mlp.layers.{i}.bias"] = 0.1 * torch.randn((n_out,), generator=g)
    state["blip.vision_proj.weight"] = torch.randn((16, 64), generator=g)  # in the package's file, unused by score()
    folder = tmp_path_factory.mktemp("image-reward")
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(MED))
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = folder / "tokenizer"
    BertTokenizer(str(vocab)).save_pretrained(tokenizer)
    return folder, tokenizer, state


def _bert_with_cross_attention(t: dict, ids: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """BLIP's med.py BertModel (not a decoder: bidirectional) in plain torch, from its tensors' names."""
    h, heads, eps = MED["hidden_size"], MED["num_attention_heads"], MED["layer_norm_eps"]

    def lin(x, name):
        return x @ t[f"{name}.weight"].T + t[f"{name}.bias"]

    def norm(x, name):
        return F.layer_norm(x, (h,), t[f"{name}.weight"], t[f"{name}.bias"], eps)

    def attend(x, source, prefix, source_mask):
        b, n, _ = x.shape

        def split(y):
            return y.view(b, -1, heads, h // heads).transpose(1, 2)

        q, k, v = (split(lin(inp, f"{prefix}.self.{w}")) for inp, w in ((x, "query"), (source, "key"), (source, "value")))
        scores = q @ k.transpose(-1, -2) / math.sqrt(h // heads) + (1.0 - source_mask[:, None, None, :]) * -10000.0
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, h)
        return norm(lin(out, f"{prefix}.output.dense") + x, f"{prefix}.output.LayerNorm")

    x = norm(t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:ids.shape[1]],
             "embeddings.LayerNorm")
    for i in range(MED["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        x = attend(x, x, f"{p}.attention", mask.float())
        x = attend(x, image, f"{p}.crossattention", torch.ones(image.shape[:2]))
        x = norm(lin(F.gelu(lin(x, f"{p}.intermediate.dense")), f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    return x


def _reference(state: dict, tokenizer_dir, images: torch.Tensor, prompts: list[str]) -> list[float]:
    """ImageReward.score(prompt, image) for each pair, as the package computes it."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
    from transformers import BertTokenizer

    preprocess = Compose([Resize(32, interpolation=InterpolationMode.BICUBIC), CenterCrop(32),
                          lambda im: im.convert("RGB"), ToTensor(),
                          Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    tokenizer = BertTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    vit = _vit()
    vit.load_state_dict({k[len("blip.visual_encoder."):]: v for k, v in state.items()
                         if k.startswith("blip.visual_encoder.")})
    text = {k[len("blip.text_encoder."):]: v for k, v in state.items() if k.startswith("blip.text_encoder.")}
    out = []
    with torch.no_grad():
        for array, prompt in zip(to_uint8(images), prompts):
            tokens = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            image_embeds = vit.forward_features(preprocess(Image.fromarray(array)).unsqueeze(0))
            cls = _bert_with_cross_attention(text, tokens.input_ids, tokens.attention_mask, image_embeds)[:, 0]
            x = cls.float()
            for i in (0, 2, 4, 6, 7):  # the MLP's linear layers; its dropouts are off in eval
                x = x @ state[f"mlp.layers.{i}.weight"].T + state[f"mlp.layers.{i}.bias"]
            out.append(float((x.item() - 0.16717362830052426) / 1.0333394966054072))
    return out


def _images(n: int = 3, size: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_image_reward_equals_the_published_formula_on_the_same_weights(checkpoint):
    folder, tokenizer, state = checkpoint
    images = _images()
    reward = build_reward("image_reward", {"model": str(folder), "tokenizer": str(tokenizer), "batch_size": 2}, CPU)
    scores = reward(images, PROMPTS)
    expected = _reference(state, tokenizer, images, PROMPTS)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    assert len(set(np.round(scores, 4))) == 3  # images and prompts both matter
    assert reward(images[:1], [PROMPTS[1]])[0] != pytest.approx(scores[0], abs=1e-4)


def test_the_weights_file_itself_and_a_safetensors_copy_score_the_same(checkpoint, tmp_path):
    from safetensors.torch import save_file

    folder, tokenizer, state = checkpoint
    images = _images(2)
    by_folder = build_reward("image_reward", {"model": str(folder), "tokenizer": str(tokenizer)}, CPU)(images, PROMPTS[:2])
    by_file = build_reward("image_reward", {"model": str(folder / "ImageReward.pt"), "tokenizer": str(tokenizer)},
                           CPU)(images, PROMPTS[:2])
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "ImageReward.safetensors")
    copy = build_reward("image_reward", {"model": str(tmp_path / "ImageReward.safetensors"),
                                         "med_config": str(folder / "med_config.json"), "tokenizer": str(tokenizer)},
                        CPU)(images, PROMPTS[:2])
    assert by_folder == by_file
    np.testing.assert_allclose(copy, by_folder, rtol=1e-6)


class _Code:
    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.mark)],))


def test_a_checkpoint_holding_code_is_refused_and_not_run(checkpoint, tmp_path):
    folder, tokenizer, _ = checkpoint
    with open(tmp_path / "ImageReward.pt", "wb") as f:
        pickle.dump({"mlp.layers.0.weight": _Code(tmp_path / "ran")}, f)
    (tmp_path / "med_config.json").write_text(json.dumps(MED))
    with pytest.raises(UserError, match="cannot read .* as weights") as e:
        build_reward("image_reward", {"model": str(tmp_path), "tokenizer": str(tokenizer)}, CPU, field="rewards.0")
    assert e.value.field == "rewards.0.options.model"
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("case, field, problem", [
    ("missing", "model", "not found"),
    ("empty folder", "model", "holds neither ImageReward.safetensors nor ImageReward.pt"),
    ("not image reward", "model", "is not an ImageReward checkpoint"),
    ("no med_config", "model", "med_config.json not found"),
    ("wrong med_config", "model", "does not fit med_config.json"),
    ("bad tokenizer", "tokenizer", "directory not found"),
    ("offline hub", "model", "cannot fetch THUDM/ImageReward"),
    ("batch", "batch_size", "not a positive whole number"),
])
def test_bad_image_reward_inputs_are_one_line_naming_the_option(checkpoint, tmp_path, case, field, problem):
    folder, tokenizer, state = checkpoint
    options = {"model": str(folder), "tokenizer": str(tokenizer)}
    if case == "missing":
        options["model"] = str(tmp_path / "nowhere")
    elif case == "empty folder":
        options["model"] = str(tmp_path)
    elif case == "not image reward":
        torch.save({"weight": torch.zeros(2)}, tmp_path / "ImageReward.pt")
        (tmp_path / "med_config.json").write_text(json.dumps(MED))
        options["model"] = str(tmp_path)
    elif case == "no med_config":
        (tmp_path / "ImageReward.pt").symlink_to(folder / "ImageReward.pt")
        options["model"] = str(tmp_path)
    elif case == "wrong med_config":
        (tmp_path / "med.json").write_text(json.dumps({**MED, "intermediate_size": 40}))
        options["med_config"] = str(tmp_path / "med.json")
    elif case == "bad tokenizer":
        options["tokenizer"] = "./no-tokenizer-here"
    elif case == "offline hub":
        options = {}
    else:
        options["batch_size"] = 0
    with pytest.raises(UserError) as e:
        build_reward("image_reward", options, CPU, field="rewards.0")
    assert e.value.field == f"rewards.0.options.{field}", e.value
    assert problem in e.value.problem, e.value


def test_score_without_the_weights_offline_is_one_line_exit_2(tmp_path, capfd):
    from .conftest import one_error_line, run_in_process

    Image.new("RGB", (64, 64), "white").save(tmp_path / "a.png")
    result = run_in_process(capfd, "score", "--reward", "image_reward", str(tmp_path / "a.png"))
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "options.model: cannot fetch THUDM/ImageReward" in line and "local directory" in line
