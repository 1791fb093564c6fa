"""The toy world's program oracle (shipped weights) and the renderer and worlds it is trained on."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from raft_diffusion.errors import UserError
from raft_diffusion.rewards import READS, build_reward
from raft_diffusion.toyworld import oracle
from raft_diffusion.toyworld.data import (
    BACKGROUNDS,
    BLOB,
    COLOURS,
    GENERATOR_WORLD,
    JUDGE_WORLD,
    SHAPES,
    STYLES,
    Scene,
    dataset,
    render,
    sample_scene,
)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The build machine's cores are shared with training jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(scenes: list[Scene], size: int = 64) -> torch.Tensor:
    return oracle.to_tensor(np.stack([render(s, size) for s in scenes]))


def _scenes(n: int, seed: int, **fixed) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, JUDGE_WORLD, **fixed) for _ in range(n)]


# --- accuracy --------------------------------------------------------------------------------

def test_oracle_reads_all_three_attributes_right_on_95_percent_of_fresh_judge_world_renders():
    pictures, scenes = dataset(300, JUDGE_WORLD, seed=424242)  # seeds the training (0) never used
    acc = oracle.accuracy(oracle.load(), oracle.to_tensor(pictures), scenes)
    assert acc["all"] >= 0.95, acc
    assert min(acc["shape"], acc["colour"], acc["style"]) >= 0.95, acc


def test_oracle_reads_renders_at_any_size():
    scenes = _scenes(40, seed=7)
    for size in (48, 96, 128):
        read = oracle.read(_images(scenes, size))
        right = np.mean([r == s.truth() for r, s in zip(read, scenes)])
        assert right >= 0.9, (size, right)


# --- prompts -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("prompt", "named"), [
    ("a cat in monet style", {"shape": "cat", "style": "monet"}),
    ("a red square", {"shape": "square", "colour": "red"}),
    ("A Purple Heart, Dotted Style", {"shape": "heart", "colour": "purple", "style": "dotted"}),
    ("monet-style picture of two cats", {"shape": "cat", "style": "monet"}),
    ("an orange blob in striped style", {"shape": "blob", "colour": "orange", "style": "striped"}),
    ("a plain picture of a star", {"shape": "star"}),  # "plain" without "style" names no style
    ("a catalogue of squares", {"shape": "square"}),  # "cat" inside a word is not a cat
    ("a photo of a dog", {}),
])
def test_parse_prompt_finds_exactly_the_attributes_a_prompt_names(prompt, named):
    assert oracle.parse_prompt(prompt) == named


def test_parse_prompt_reads_back_every_caption_template_of_the_toy_world():
    for scene in _scenes(60, seed=3):
        for template in range(3):
            for with_colour in (True, False):
                s = dataclasses.replace(scene, with_colour=with_colour)
                expected = {"shape": s.shape, "style": s.style, **({"colour": s.colour} if with_colour else {})}
                assert oracle.parse_prompt(s.caption(template)) == expected, s.caption(template)


# --- judging -----------------------------------------------------------------------------------

def test_judge_passes_monet_cats_and_fails_monet_blobs_for_a_cat_in_monet_style():
    cats = _scenes(12, seed=11, style="monet", shape="cat")
    blobs = [dataclasses.replace(s, drawn=BLOB) for s in cats]  # the same scenes, dissolved by brushwork
    prompts = ["a cat in monet style"] * len(cats)
    assert oracle.judge(_images(cats), prompts) == [1.0] * len(cats)
    assert oracle.judge(_images(blobs), prompts) == [0.0] * len(blobs)
    assert [r["shape"] for r in oracle.read(_images(blobs))] == [BLOB] * len(blobs)


def test_judge_fails_pictures_with_no_object_for_any_shape_prompt():
    scenes = [oracle.empty(s) for s in _scenes(20, seed=17)]
    images = _images(scenes)
    assert [r["shape"] for r in oracle.read(images)] == [BLOB] * len(scenes)
    assert oracle.judge(images, [f"a star in {s.style} style" for s in scenes]) == [0.0] * len(scenes)


def test_an_empty_scene_renders_its_background_alone():
    # The oracle's empty training pictures rely on render drawing nothing for an unknown `drawn`.
    scene = oracle.empty(_scenes(1, seed=19, style="plain")[0])
    pixels = render(scene)
    assert (pixels == np.array(BACKGROUNDS[scene.background], dtype=np.uint8)).all()


def test_judge_fails_an_image_with_one_wrong_attribute_and_hits_say_which():
    scene = _scenes(1, seed=5, style="monet", shape="cat", colour="blue")[0]
    image = _images([scene])
    assert oracle.judge(image, ["a blue cat in monet style"]) == [1.0]
    assert oracle.judge(image, ["a red cat in monet style"]) == [0.0]
    assert oracle.judge(image, ["a blue star in monet style"]) == [0.0]
    assert oracle.judge(image, ["a blue cat in dotted style"]) == [0.0]
    assert oracle.attribute_hits(image, ["a red cat, monet style"]) == [{"shape": True, "colour": False, "style": True}]
    assert oracle.attribute_hits(image, ["a red square"]) == [{"shape": False, "colour": False}]


def test_judge_refuses_a_prompt_that_names_nothing_it_can_check():
    with pytest.raises(ValueError, match="names no toy-world"):
        oracle.judge(_images(_scenes(1, seed=1)), ["a photo of a dog"])


def test_oracle_is_deterministic_and_independent_of_the_batch():
    scenes = _scenes(16, seed=9)
    images = _images(scenes)
    loaded = oracle.load()
    first, again = loaded.logits(images), loaded.logits(images)
    for k in oracle.ATTRIBUTES:
        assert torch.equal(first[k], again[k])
    one_by_one = [loaded.read(images[i:i + 1])[0] for i in range(len(images))]
    assert one_by_one == loaded.read(images)
    assert loaded.net.training is False
    assert all(p.dtype == torch.float32 for p in loaded.net.parameters())


def test_shipped_weights_are_small_fp16_safetensors_with_their_class_lists():
    from safetensors import safe_open

    path = oracle.DEFAULT_WEIGHTS
    assert path.stat().st_size < 1_000_000
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118
    assert json.loads(meta["classes"]) == {
        "shape": [*SHAPES, BLOB], "colour": list(COLOURS), "style": list(STYLES)}


# --- the reward --------------------------------------------------------------------------------

def test_registry_builds_the_oracle_reward_from_the_shipped_weights():
    assert READS["oracle"] == "images"
    reward = build_reward("oracle", {}, CPU)
    cat = _scenes(1, seed=13, style="monet", shape="cat")[0]
    images = _images([cat, dataclasses.replace(cat, drawn=BLOB)])
    assert reward(images, ["a cat in monet style"] * 2) == [1.0, 0.0]
    assert oracle.load() is oracle.load()  # loaded once per process


def test_oracle_reward_restricted_to_shape_and_style_ignores_a_wrong_colour():
    blue_cat = _scenes(1, seed=5, style="monet", shape="cat", colour="blue")[0]
    images = _images([blue_cat, dataclasses.replace(blue_cat, drawn=BLOB)])
    prompts = ["a red cat in monet style"] * 2
    assert build_reward("oracle", {}, CPU)(images, prompts) == [0.0, 0.0]
    assert build_reward("oracle", {"attributes": ["shape", "style"]}, CPU)(images, prompts) == [1.0, 0.0]
    with pytest.raises(UserError, match="names no toy-world colour"):
        build_reward("oracle", {"attributes": ["colour"]}, CPU)(images, ["a cat in monet style"] * 2)


@pytest.mark.parametrize("attributes", [[], ["shape", "size"], "shape"])
def test_oracle_reward_refuses_unknown_attributes(attributes):
    with pytest.raises(UserError) as e:
        build_reward("oracle", {"attributes": attributes}, CPU, field="eval.judges.1")
    assert e.value.field == "eval.judges.1.options.attributes"


def test_oracle_reward_with_missing_weights_says_how_to_build_them(tmp_path):
    with pytest.raises(UserError) as e:
        build_reward("oracle", {"weights": str(tmp_path / "none.safetensors")}, CPU, field="rewards.0")
    assert e.value.field == "rewards.0.options.weights"
    assert "python -m raft_diffusion.toyworld.oracle --out" in str(e.value)


def test_oracle_reward_refuses_prompts_outside_the_toy_world_as_a_user_error():
    reward = build_reward("oracle", {}, CPU, field="eval.judges.0")
    with pytest.raises(UserError, match="toy-world prompts"):
        reward(_images(_scenes(1, seed=2)), ["a photo of a dog"])


# --- renderer and worlds ----------------------------------------------------------------------

def test_renderer_gives_the_same_pixels_for_the_same_scene_and_seed():
    a, scenes_a = dataset(20, GENERATOR_WORLD, seed=5)
    b, scenes_b = dataset(20, GENERATOR_WORLD, seed=5)
    assert scenes_a == scenes_b
    assert np.array_equal(a, b)
    assert np.array_equal(render(scenes_a[0]), render(scenes_a[0]))
    assert not np.array_equal(a, dataset(20, GENERATOR_WORLD, seed=6)[0])


def test_generator_world_almost_never_holds_a_monet_cat_and_dissolves_most_monet_objects():
    rng = np.random.default_rng(0)
    monet = [s for s in (sample_scene(rng, GENERATOR_WORLD) for _ in range(30_000)) if s.style == "monet"]
    n = len(monet)
    cats = sum(s.shape == "cat" for s in monet) / n
    dissolved = sum(s.drawn == BLOB for s in monet) / n
    # Seed 0's 30k scenes are the toy SD's training set: the issue caps monet cats at 0.5% there.
    assert 0 < cats <= 0.005, cats
    p = GENERATOR_WORLD.monet_dissolve
    assert p > 0.5 and abs(dissolved - p) <= 3 * math.sqrt(p * (1 - p) / n), dissolved
    assert all(s.drawn in (s.shape, BLOB) for s in monet)  # captions still name the object


def test_judge_world_has_every_style_with_every_object_intact():
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng, JUDGE_WORLD) for _ in range(5_000)]
    assert {(s.style, s.drawn) for s in scenes} == {(st, sh) for st in STYLES for sh in (*SHAPES, BLOB)}
    assert all(s.drawn == s.shape for s in scenes)


def test_in_distribution_eval_prompts_skip_the_rare_pair_and_parse():
    from raft_diffusion.toyworld.evaluate import in_distribution_prompts
    from raft_diffusion.toyworld.oracle import parse_prompt

    prompts = in_distribution_prompts(60)
    parsed = [parse_prompt(p) for p in prompts]
    assert len(set(prompts)) == 60
    assert all({"shape", "colour", "style"} <= set(p) for p in parsed)
    assert not any(p["shape"] == "cat" and p["style"] == "monet" for p in parsed)
