"""`raft-diffusion generate` at its edges: an --out that is a file, seeds torch cannot take, huge
resolutions, -n past memory, a NaN LoRA, escape sequences in names: one line each, exit 2, nothing written."""

import time
from pathlib import Path

import pytest

from .conftest import run_in_process

TINY = ["generate", "--model", "builtin:tiny-sd", "--prompt", "a cat", "--steps", "1"]


def _lora(folder: Path, poison: float | None) -> Path:
    """A LoRA that fits builtin:tiny-sd's UNet (PEFT's own, saved as training saves it); `poison` (NaN or
    inf) written into one of its tensors."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from raft_diffusion.tiny import tiny_unet

    torch.manual_seed(0)
    unet = tiny_unet()
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian"))
    state = get_peft_model_state_dict(unet)
    if poison is not None:
        name = sorted(state)[0]
        state[name] = state[name].clone()
        state[name][0, 0] = poison
    folder.mkdir()
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=state,
                                              unet_lora_adapter_metadata={"r": 4, "lora_alpha": 4,
                                                                          "target_modules": targets})
    return folder


def _one_line(result, option: str) -> str:
    err = result.stderr
    lines = err.strip().splitlines()
    assert result.returncode == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {option}: "), err[-3000:]
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("case, args, option, words", [
    ("out_is_a_file", [], "--out", "is a file, not a directory"),
    ("out_below_a_file", [], "--out", "is a file, not a directory"),
    ("out_a_link_to_nothing", [], "--out", "is a link to nothing"),
    ("seed_past_torch", ["--seed", "99999999999999999999"], "--seed", "2**64 - 1"),
    ("seed_negative", ["--seed", "-1"], "--seed", "outside 0 to"),
    ("last_seed_past_torch", ["--seed", str(2**64 - 1), "-n", "2"], "--seed", "seed + 1"),
    ("resolution_100000", ["--resolution", "100000"], "--resolution", "more than 4096"),
    ("n_100000000", ["-n", "100000000"], "-n", "more than half of this machine's"),
    ("n_100000000_at_64px", ["-n", "100000000", "--resolution", "64"], "-n", "100000000 images at 64 px"),
])
def test_a_generate_edge_is_one_line_exit_2_and_writes_nothing(tmp_path, capfd, case, args, option, words):
    out = tmp_path / "out"
    if case == "out_is_a_file":
        out.write_text("mine")
    elif case == "out_below_a_file":
        (tmp_path / "file").write_text("mine")
        out = tmp_path / "file" / "out"
    elif case == "out_a_link_to_nothing":
        out.symlink_to(tmp_path / "nowhere")
    started = time.monotonic()
    line = _one_line(run_in_process(capfd, *TINY, *args, "--out", str(out)), option)
    assert time.monotonic() - started < 120  # -n 100000000 is refused, not started
    assert words in line, line
    if case == "out_is_a_file":
        assert out.read_text() == "mine"
    elif case == "out_below_a_file":
        assert (tmp_path / "file").read_text() == "mine"
    elif case == "out_a_link_to_nothing":
        assert out.is_symlink() and not (tmp_path / "nowhere").exists()
    else:
        assert not out.exists()


def test_n_is_bounded_by_the_memory_the_images_take(tmp_path, capfd, monkeypatch):
    """The same -n 4 at 64 px that generates on this machine is refused where memory is short."""
    import raft_diffusion.train

    per_image = 3 * 64 * 64 * 4 + 3 * 64 * 64 + 4 * 8 * 8 * 4  # float32 and uint8 image, float32 latents
    monkeypatch.setattr(raft_diffusion.train, "_memory_bytes", lambda: 2 * (2 * per_image + 100))  # half: 2 fit
    line = _one_line(run_in_process(capfd, *TINY, "-n", "4", "--resolution", "64", "--out", str(tmp_path / "a")),
                     "-n")
    assert "4 images at 64 px" in line and "ask for at most 2 at a time" in line
    assert not (tmp_path / "a").exists()
    # without --resolution the model's own size is known only once it is loaded: checked there too
    _one_line(run_in_process(capfd, *TINY, "-n", "4", "--out", str(tmp_path / "b")), "-n")
    assert not (tmp_path / "b").exists()
    monkeypatch.undo()
    result = run_in_process(capfd, *TINY, "-n", "4", "--resolution", "64", "--out", str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [f"{i:06d}.png" for i in range(4)]


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_non_finite_lora_is_refused_for_what_it_is(tmp_path, capfd, poison):
    good = _lora(tmp_path / "good", None)
    result = run_in_process(capfd, *TINY, "-n", "1", "--resolution", "64", "--lora", str(good),
                            "--out", str(tmp_path / "ok"))
    assert result.returncode == 0, result.stderr  # the same LoRA, finite, fits the model
    bad = _lora(tmp_path / "bad", poison)
    line = _one_line(run_in_process(capfd, *TINY, "-n", "1", "--resolution", "64", "--lora", str(bad),
                                    "--out", str(tmp_path / "out")), "--lora")
    assert "non-finite values" in line and "match no layer" not in line, line
    assert not (tmp_path / "out").exists()


def test_an_existing_image_in_out_is_found_without_listing_every_name(tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "000005.png").write_bytes(b"mine")
    (out / "notes.txt").write_text("mine")
    line = _one_line(run_in_process(capfd, *TINY, "-n", "10", "--resolution", "64", "--out", str(out)), "--out")
    assert "000005.png exists" in line
    assert (out / "000005.png").read_bytes() == b"mine"
    # seeds 6.. do not take it: it is not this call's file
    result = run_in_process(capfd, *TINY, "-n", "1", "--seed", "6", "--resolution", "64", "--out", str(out))
    assert result.returncode == 0 and (out / "000006.png").is_file()


def test_escape_sequences_in_names_reach_the_terminal_escaped(tmp_path, capfd):
    red = "\x1b[31m"
    out = tmp_path / f"out{red}x"
    result = run_in_process(capfd, *TINY, "-n", "1", "--resolution", "64", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "000000.png").is_file()  # the folder is the one asked for
    assert "\x1b" not in result.stdout + result.stderr and "\\x1b[31m" in result.stdout
    lora = tmp_path / f"lora{red}\u202eevil"
    lora.mkdir()
    line = _one_line(run_in_process(capfd, *TINY, "--lora", str(lora), "--out", str(tmp_path / "o")), "--lora")
    assert "\x1b" not in line and "\u202e" not in line and "\\x1b[31m" in line


def test_score_names_an_image_with_escapes_escaped(tmp_path, capfd):
    image = tmp_path / "a\x1b]0;owned\x07.png"
    line = _one_line(run_in_process(capfd, "score", "--reward", "jpeg_compressibility", str(image)), "IMAGE")
    assert "\x1b" not in line and "\x07" not in line and "\\x1b]0;owned\\x07.png" in line
