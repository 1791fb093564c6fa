"""The clip and aesthetic rewards against open_clip's own API, their weight files, and `score`."""

import os
import pickle

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from raft_diffusion.cli import main
from raft_diffusion.errors import UserError
from raft_diffusion.rewards import build_reward
from raft_diffusion.rewards import clip as clip_module

PROMPTS = ["a red cat", "a blue square", "a red cat"]


def _pictures(n=3, size=(64, 64), seed=0):
    """Random uint8 pictures as PIL images and as the (N, 3, H, W) tensor in [0, 1] the pipeline holds."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]
    tensor = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays])
    return [Image.fromarray(a) for a in arrays], tensor


def _options(tiny_clip, **extra):
    config, weights = tiny_clip
    return {"model_config": str(config), "pretrained": str(weights), **extra}


def _by_hand(tiny_clip, pil_images):
    """Normalised image embeddings and the open_clip objects, with nothing but open_clip's API."""
    config, weights = tiny_clip
    model, _, preprocess = open_clip.create_model_and_transforms(config.stem, pretrained=str(weights))
    model.eval()
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(im) for im in pil_images]))
    return F.normalize(image, dim=-1), model, open_clip.get_tokenizer(config.stem)


def test_clip_score_equals_open_clip_computed_by_hand(tiny_clip):
    pil, tensor = _pictures()  # already at the model's image_size: no resize on either path
    reward = build_reward("clip", _options(tiny_clip), torch.device("cpu"))
    scores = np.asarray(reward(tensor, PROMPTS))

    image, model, tokenizer = _by_hand(tiny_clip, pil)
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
    expected = (100 * (image * text).sum(-1)).numpy()

    assert scores.shape == (3,)
    np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=0)
    assert scores[0] != scores[1]  # the prompt matters
    again = build_reward("clip", _options(tiny_clip), torch.device("cpu"))
    assert reward(tensor, PROMPTS) == again(tensor, PROMPTS) == scores.tolist()  # deterministic


def test_clip_on_images_that_need_resizing_stays_within_a_tenth_of_open_clip_on_files(tiny_clip):
    # The tensor path resizes in float, open_clip resizes the PIL file in uint8 (module docstring).
    # Random noise is the worst case for resampling; measured differences were below 0.06.
    pil, tensor = _pictures(size=(96, 128), seed=1)
    reward = build_reward("clip", _options(tiny_clip), torch.device("cpu"))
    image, model, tokenizer = _by_hand(tiny_clip, pil)
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
    expected = (100 * (image * text).sum(-1)).numpy()
    np.testing.assert_allclose(reward(tensor, PROMPTS), expected, atol=0.1, rtol=0)


def test_clip_checkpoint_as_pth_loads_like_safetensors(tiny_clip, tmp_path):
    from safetensors.torch import load_file

    pth = tmp_path / "tiny.pth"
    torch.save({"state_dict": load_file(str(tiny_clip[1]))}, pth)  # open_clip's training format
    _, tensor = _pictures()
    from_pth = build_reward("clip", _options(tiny_clip, pretrained=str(pth)), torch.device("cpu"))
    from_safetensors = build_reward("clip", _options(tiny_clip), torch.device("cpu"))
    assert from_pth(tensor, PROMPTS) == from_safetensors(tensor, PROMPTS)


def test_clip_and_aesthetic_load_the_shared_clip_once(tiny_clip, tmp_path, monkeypatch):
    calls = []
    create = open_clip.create_model_and_transforms
    monkeypatch.setattr(open_clip, "create_model_and_transforms", lambda *a, **k: calls.append(a) or create(*a, **k))
    monkeypatch.setattr(clip_module, "_LOADED", {})
    head = tmp_path / "head.safetensors"
    save_file(_laion_head(32), str(head))
    build_reward("clip", _options(tiny_clip), torch.device("cpu"))
    build_reward("aesthetic", _options(tiny_clip, head=str(head)), torch.device("cpu"))
    build_reward("clip", _options(tiny_clip), torch.device("cpu"), field="config eval.judges.0")
    assert len(calls) == 1


def test_missing_pretrained_file_is_a_user_error_naming_the_option(tiny_clip, tmp_path):
    with pytest.raises(UserError) as error:
        build_reward("clip", _options(tiny_clip, pretrained=str(tmp_path / "nope.safetensors")),
                     torch.device("cpu"), field="config rewards.0")
    assert error.value.field == "config rewards.0.options.pretrained"
    assert "none for random weights" in error.value.fix


def test_pretrained_tag_without_hub_access_is_a_user_error():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: the build machines' situation
    with pytest.raises(UserError) as error:
        build_reward("clip", {"model": "ViT-B-32", "pretrained": "openai"}, torch.device("cpu"),
                     field="config rewards.0")
    assert error.value.field == "config rewards.0.options.pretrained"
    assert "local path" in error.value.fix


def test_checkpoint_of_another_model_is_a_user_error(tiny_clip, tmp_path):
    bad = tmp_path / "other.safetensors"
    save_file({"visual.proj": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(UserError, match="does not fit"):
        build_reward("clip", _options(tiny_clip, pretrained=str(bad)), torch.device("cpu"))


# --- aesthetic --------------------------------------------------------------------------------


def _laion_head(width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random head in the state-dict layout of sac+logos+ava1-l14-linearMSE.pth."""
    g = torch.Generator().manual_seed(seed)
    widths = [width, 1024, 128, 64, 16, 1]
    state = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=g) / fan_in**0.5
        state[f"layers.{index}.bias"] = torch.randn(fan_out, generator=g) * 0.1
    return state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_head_in_laion_layout_reproduces_the_mlp_by_hand(tiny_clip, tmp_path, suffix):
    state = _laion_head(32)
    head = tmp_path / f"head{suffix}"
    torch.save(state, head) if suffix == ".pth" else save_file(state, str(head))
    pil, tensor = _pictures()
    reward = build_reward("aesthetic", _options(tiny_clip, head=str(head)), torch.device("cpu"))
    scores = reward(tensor, PROMPTS)

    x, _, _ = _by_hand(tiny_clip, pil)  # L2-normalised CLIP image embeddings, (3, 32)
    for index in (0, 2, 4, 6, 7):  # dropout layers sit between; eval mode makes them identity
        x = F.linear(x, state[f"layers.{index}.weight"], state[f"layers.{index}.bias"])
    np.testing.assert_allclose(scores, x.squeeze(-1).numpy(), atol=1e-5, rtol=0)


class _Marker:
    """Unpickling this creates a file: proof that a loader ran code from the checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("content", ["code", "module", "extra", "garbage"])
def test_aesthetic_head_pth_holding_more_than_tensors_exits_2(tiny_clip, tmp_path, capsys, content):
    head, marker = tmp_path / "head.pth", tmp_path / "pwned"
    if content == "code":
        with open(head, "wb") as f:
            pickle.dump({"layers.0.weight": _Marker(marker)}, f, protocol=2)
    elif content == "module":
        torch.save(torch.nn.Linear(32, 1), head)
    elif content == "extra":
        torch.save({**_laion_head(32), "note": "trained on sac+logos+ava1"}, head)
    else:
        head.write_bytes(b"not a checkpoint")
    image = tmp_path / "image.png"
    _pictures(1)[0][0].save(image)
    config, weights = tiny_clip
    code = main(["score", "--reward", "aesthetic", "--option", f"model_config={config}",
                 "--option", f"pretrained={weights}", "--option", f"head={head}", str(image)])
    err = capsys.readouterr().err
    assert code == 2
    assert "options.head" in err and "Traceback" not in err
    assert not marker.exists()


def test_aesthetic_head_for_another_clip_width_is_refused(tiny_clip, tmp_path):
    head = tmp_path / "l14.safetensors"
    save_file(_laion_head(768), str(head))
    with pytest.raises(UserError, match="768-wide"):
        build_reward("aesthetic", _options(tiny_clip, head=str(head)), torch.device("cpu"))


# --- the score command ------------------------------------------------------------------------


def test_score_prints_one_clip_score_per_image_in_order_with_options(tiny_clip, tmp_path, capsys):
    small, small_tensor = _pictures(2)
    large, _ = _pictures(1, size=(80, 80), seed=3)
    paths = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    for picture, path in zip([small[0], large[0], small[1]], paths):
        picture.save(path)
    config, weights = tiny_clip
    capsys.readouterr()
    assert main(["score", "--reward", "clip", "--prompt", "a red cat", "--option", f"model_config={config}",
                 "--option", f"pretrained={weights}", *map(str, paths)]) == 0
    printed = [float(line) for line in capsys.readouterr().out.splitlines()]
    assert len(printed) == 3
    expected = build_reward("clip", _options(tiny_clip), torch.device("cpu"))(small_tensor, ["a red cat"] * 2)
    np.testing.assert_allclose([printed[0], printed[2]], expected, rtol=1e-5)


def test_score_with_an_unknown_reward_exits_2_and_lists_the_rewards(tmp_path, capsys):
    image = tmp_path / "image.png"
    _pictures(1)[0][0].save(image)
    assert main(["score", "--reward", "clipp", str(image)]) == 2
    err = capsys.readouterr().err
    assert "unknown reward 'clipp'" in err
    for name in ("aesthetic", "clip", "jpeg_compressibility", "minilm_sentiment", "vader"):
        assert name in err


def test_score_refuses_a_text_reward_on_images(tmp_path, capsys):
    image = tmp_path / "image.png"
    _pictures(1)[0][0].save(image)
    assert main(["score", "--reward", "vader", str(image)]) == 2
    assert "scores texts" in capsys.readouterr().err


def test_score_refuses_an_option_the_reward_does_not_have(tmp_path, capsys):
    image = tmp_path / "image.png"
    _pictures(1)[0][0].save(image)
    assert main(["score", "--reward", "clip", "--option", "modle=ViT-B-32", str(image)]) == 2
    err = capsys.readouterr().err
    assert "modle" in err and "model_config" in err


def test_clip_and_aesthetic_on_the_same_images_run_the_image_tower_once(tiny_clip, tmp_path, monkeypatch):
    head = tmp_path / "head.safetensors"
    save_file(_laion_head(32), str(head))
    clip_reward = build_reward("clip", _options(tiny_clip), torch.device("cpu"))
    aesthetic_reward = build_reward("aesthetic", _options(tiny_clip, head=str(head)), torch.device("cpu"))
    model = clip_module.load_clip(**_options(tiny_clip)).model
    calls = []
    encode = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda x, **k: calls.append(len(x)) or encode(x, **k))
    _, images = _pictures(seed=5)
    first = aesthetic_reward(images, PROMPTS)
    clip_reward(images.clone(), PROMPTS)  # equal pixels in another tensor, as RewardSet passes them
    assert calls == [3]
    changed = images.clone()
    changed[0, 0, 0, 0] = 1 - changed[0, 0, 0, 0]
    second = aesthetic_reward(changed, PROMPTS)
    assert calls == [3, 3] and second[0] != first[0]
    np.testing.assert_allclose(second[1:], first[1:], atol=1e-6)


def test_reward_set_shares_the_clip_embedding_of_every_chunk_not_only_the_last(tiny_clip, tmp_path, monkeypatch):
    from raft_diffusion.config import RewardSpec
    from raft_diffusion.rewards.compose import RewardSet

    head = tmp_path / "head.safetensors"
    save_file(_laion_head(32), str(head))
    rewards = RewardSet([RewardSpec(name="clip", options=_options(tiny_clip)),
                         RewardSpec(name="aesthetic", options=_options(tiny_clip, head=str(head)))],
                        torch.device("cpu"))
    model = clip_module.load_clip(**_options(tiny_clip)).model
    calls = []
    encode = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda x, **k: calls.append(len(x)) or encode(x, **k))
    _, images = _pictures(n=7, seed=11)
    prompts = (PROMPTS * 3)[:7]
    scored = rewards(images, prompts, list(range(7)), batch_size=3)
    assert calls == [3, 3, 1]  # one image-tower pass per chunk, shared by clip and aesthetic
    whole = rewards(images, prompts, list(range(7)), batch_size=64)  # chunking changes no score
    for name in ("clip", "aesthetic"):
        np.testing.assert_allclose(scored.parts[name], whole.parts[name], atol=1e-5)
