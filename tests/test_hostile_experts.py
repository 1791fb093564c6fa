"""Sample folders and experts of `generation.experts` as a hostile or unlucky user makes them (issue 23,
items 2, 3, 8 and 9): no file outside its folder, every picture decoded before the run writes
anything, pictures read as `score` reads them, memory counted over every source, texts bounded by
the policy's context, and a folder changed between `--resume` calls refused."""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from raft_diffusion.cli import main
from raft_diffusion.config import RunConfig
from raft_diffusion.errors import UserError
from raft_diffusion.experts import Experts
from raft_diffusion.train import check_memory, run_training

from .conftest import TEXT_CONFIG, TINY_CONFIG, deep_update, write_yaml

PROMPT = TINY_CONFIG["prompts"]["train"][0]
GiB = 2**30


def _png_header_only(path, width, height):
    """A PNG that claims width x height gray pixels but holds almost no data (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))


def _folder(tmp_path, rows, files=("a.png",)):
    """tmp_path/people with 64x64 pictures `files` and `rows` (dicts or raw lines) in samples.jsonl."""
    folder = tmp_path / "people"
    folder.mkdir(exist_ok=True)
    for k, name in enumerate(files):
        Image.new("RGB", (64, 64), (30 * k, 100, 200)).save(folder / name)
    (folder / "samples.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return folder


def _train(tmp_path, capfd, cfg, *extra):
    """`raft-diffusion train` in process: (exit code, stderr lines)."""
    capfd.readouterr()
    code = main(["train", str(write_yaml(tmp_path / "config.yaml", cfg)), "--output-dir", str(tmp_path / "run"),
                 *extra])
    err = capfd.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()], err


def _assert_refused(tmp_path, capfd, cfg, *words):
    """Exit 2, one line naming `words`, no traceback, and nothing written (no run directory)."""
    write_yaml(tmp_path / "config.yaml", cfg)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, lines, err = _train(tmp_path, capfd, cfg)
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]
    assert not (tmp_path / "run").exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    return lines[0]


def _with_folder(folder, **expert):
    return deep_update(TINY_CONFIG, {"generation": {"experts": [{"samples": str(folder), "per_prompt": 1, **expert}]}})


# -- 2. no file outside its folder ---------------------------------------------------------------

def _outside_case(tmp_path, case):
    """A folder whose second row names a picture outside it (a good first row before it)."""
    secret = tmp_path / "elsewhere"
    secret.mkdir()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(secret / "secret.png")
    folder = _folder(tmp_path, [])
    name = {"absolute": str(secret / "secret.png"), "dot_dot": "../elsewhere/secret.png",
            "symlinked_file": "link.png", "symlinked_folder": "sub/secret.png",
            "dot_dot_inside_first": "sub2/../../elsewhere/secret.png"}[case]
    if case == "symlinked_file":
        os.symlink(secret / "secret.png", folder / "link.png")
    elif case == "symlinked_folder":
        os.symlink(secret, folder / "sub")
    elif case == "dot_dot_inside_first":
        (folder / "sub2").mkdir()
    (folder / "samples.jsonl").write_text(json.dumps({"prompt": PROMPT, "file": "a.png"}) + "\n"
                                          + json.dumps({"prompt": PROMPT, "file": name}) + "\n")
    return folder


@pytest.mark.parametrize("case", ["absolute", "dot_dot", "symlinked_file", "symlinked_folder",
                                  "dot_dot_inside_first"])
def test_a_row_naming_a_file_outside_its_folder_is_refused_before_anything_is_written(tmp_path, capfd, case):
    folder = _outside_case(tmp_path, case)
    line = _assert_refused(tmp_path, capfd, _with_folder(folder), "generation.experts.0.samples", "samples.jsonl:2")
    assert "absolute path" in line if case == "absolute" else "leads outside" in line


@pytest.mark.parametrize("case", ["symlinked_file", "symlinked_folder", "dot_dot"])
def test_links_and_dot_dots_that_stay_inside_the_folder_are_read(tmp_path, case):
    folder = _folder(tmp_path, [], files=("a.png",))
    (folder / "inner").mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "inner" / "b.png")
    name = {"symlinked_file": "link.png", "symlinked_folder": "sub/b.png", "dot_dot": "inner/../inner/b.png"}[case]
    if case == "symlinked_file":
        os.symlink(folder / "inner" / "b.png", folder / "link.png")
    elif case == "symlinked_folder":
        os.symlink("inner", folder / "sub")
    (folder / "samples.jsonl").write_text(json.dumps({"prompt": PROMPT, "file": name}) + "\n")
    experts = Experts(RunConfig.model_validate(_with_folder(folder)))
    image = experts.sources[0].load(experts.sources[0].rows[PROMPT], "image")
    assert image.shape == (1, 3, 64, 64)
    assert np.allclose(image[0, :, 0, 0].numpy(), [1 / 255, 2 / 255, 3 / 255], atol=1e-6)


# -- 3. hostile or broken pictures: refused when the folder is checked ---------------------------

def _hostile_picture(path, case):
    if case == "decompression_bomb":  # 15000 x 15000 claimed: over twice PIL's MAX_IMAGE_PIXELS
        _png_header_only(path, 15000, 15000)
    elif case == "bomb_warning":  # 10000 x 10000: PIL itself only warns, then would decode 300 MB
        _png_header_only(path, 10000, 10000)
    elif case == "ztxt_bomb":  # 64x64, with a text chunk that inflates past PIL's MAX_TEXT_CHUNK (2 KB on disk)
        info = PngImagePlugin.PngInfo()
        info.add_text("comment", "a" * (PngImagePlugin.MAX_TEXT_CHUNK + 2**20), zip=True)
        Image.new("RGB", (64, 64)).save(path, pnginfo=info)
        assert path.stat().st_size < 20_000
    elif case in ("truncated_after_header", "truncated_in_data"):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
        data = path.read_bytes()
        path.write_bytes(data[:33] if case == "truncated_after_header" else data[:len(data) // 2])
    elif case == "not_an_image":
        path.write_text("hello")
    elif case == "float_out_of_range":
        path = path.with_suffix(".tiff")
        Image.fromarray(np.full((64, 64), 3.0, np.float32)).save(path)
    elif case == "a_directory":
        path.mkdir()
    return path


PICTURES = {"decompression_bomb": "too many to decode", "bomb_warning": "too many to decode",
            "ztxt_bomb": "MAX_TEXT_CHUNK", "truncated_after_header": "not an image",
            "truncated_in_data": "truncated", "not_an_image": "not an image",
            "float_out_of_range": "outside [0, 1]", "a_directory": "not a file"}


@pytest.mark.parametrize("case", sorted(PICTURES))
def test_a_hostile_or_broken_picture_is_refused_in_one_line_before_anything_is_written(tmp_path, capfd, case):
    folder = _folder(tmp_path, [])
    bad = _hostile_picture(folder / "bad.png", case)
    (folder / "samples.jsonl").write_text(json.dumps({"prompt": PROMPT, "file": "a.png"}) + "\n\n"
                                          + json.dumps({"prompt": PROMPT, "file": bad.name}) + "\n")
    line = _assert_refused(tmp_path, capfd, _with_folder(folder), "generation.experts.0.samples", "samples.jsonl:3",
                           PICTURES[case], repr(bad.name))
    assert len(line) < 400


def test_a_picture_of_another_size_is_refused_naming_both_sizes(tmp_path, capfd):
    folder = _folder(tmp_path, [{"prompt": PROMPT, "file": "small.png"}], files=())
    Image.new("RGB", (32, 48)).save(folder / "small.png")
    _assert_refused(tmp_path, capfd, _with_folder(folder), "samples.jsonl:1", "32x48", "64x64")


# -- 9a. pictures decoded as `score` decodes them -------------------------------------------------

@pytest.mark.parametrize("case, expected", [("gray16.png", 0.46), ("float.tiff", 0.5), ("rgb8.png", 100 / 255),
                                            ("gray8.png", 7 / 255)])
def test_folder_pictures_load_with_their_own_scale(tmp_path, case, expected):
    folder = tmp_path / "people"
    folder.mkdir()
    path = folder / case
    if case == "gray16.png":  # 46% gray, 16 bits: convert("RGB") made it white
        Image.fromarray(np.full((64, 64), round(0.46 * 65535), np.uint16)).save(path)
    elif case == "float.tiff":  # 0.5, float: convert("RGB") made it black
        Image.fromarray(np.full((64, 64), 0.5, np.float32)).save(path)
    elif case == "rgb8.png":
        Image.new("RGB", (64, 64), (100, 100, 100)).save(path)
    else:
        Image.new("L", (64, 64), 7).save(path)
    (folder / "samples.jsonl").write_text(json.dumps({"prompt": PROMPT, "file": case}) + "\n")
    source = Experts(RunConfig.model_validate(_with_folder(folder))).sources[0]
    images = source.load(source.rows[PROMPT], "image")
    assert images.shape == (1, 3, 64, 64) and images.dtype.is_floating_point
    assert abs(float(images.mean()) - expected) < 1e-4 and float(images.std()) < 1e-6

    from raft_diffusion.files import read_image  # what `score` reads: the same values

    assert np.allclose(images[0].numpy(), read_image(path).numpy())


# -- 8. the memory pre-check: every source, only what the run holds ------------------------------

@pytest.fixture
def machine_of_128_gib(monkeypatch):
    monkeypatch.setattr("raft_diffusion.train._memory_bytes", lambda: 128 * GiB)


def test_an_expert_of_100000_per_prompt_at_256_px_is_refused_naming_its_field(tmp_path, capfd, machine_of_128_gib):
    cfg = deep_update(TINY_CONFIG, {"generation": {"resolution": 256, "experts": [
        {"model": "builtin:tiny-sd", "per_prompt": 100000}]}})
    line = _assert_refused(tmp_path, capfd, cfg, "config generation.experts.0.per_prompt", "GiB", "2 x 100000")
    assert "149." in line  # 200,006 samples of 256 px: about 150 GiB


class Reached(Exception):
    """Raised by the check that follows the memory check: the run got past it."""


def test_20000_training_prompts_at_512_px_without_eval_pass_the_memory_check(tmp_path, monkeypatch):
    monkeypatch.setattr("raft_diffusion.train._memory_bytes", lambda: 64 * GiB)  # the issue's: 59.8 GiB refused
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(20000)))

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr("raft_diffusion.train.check_launcher", reached)  # the next check: nothing loads, nothing writes
    config = RunConfig.model_validate(deep_update(TINY_CONFIG, {
        "prompts": {"train": str(prompts)}, "generation": {"resolution": 512},
        "eval": {"every": 0, "samples_per_prompt": 1},
        "output_dir": str(tmp_path / "run")}))
    with pytest.raises(Reached):
        run_training(config, log=lambda s: None)
    # with evaluation on, the 20000 eval samples are held (about 60 GiB): refused, naming what drives it
    config.eval.every = 1
    with pytest.raises(UserError) as refused:
        check_memory(config, 20000)
    assert refused.value.field == "config eval.samples_per_prompt" and "eval.every: 0" in refused.value.fix
    assert "59.8 GiB" in refused.value.problem and "20000 x 1 of an evaluation" in refused.value.problem
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("per_prompt", [3, 100000])
def test_a_folder_counts_no_more_than_its_rows(tmp_path, monkeypatch, per_prompt):
    monkeypatch.setattr("raft_diffusion.train._memory_bytes", lambda: 4 * GiB)
    folder = _folder(tmp_path, [{"prompt": PROMPT, "file": "a.png"}] * 3)
    config = RunConfig.model_validate(_with_folder(folder, per_prompt=per_prompt))
    check_memory(config, 4, Experts(config))  # 2 prompts x 3 rows at most: a few MB
    if per_prompt == 100000:  # unread, the folder is taken at its word (200,000 samples, 9 GiB): refused
        with pytest.raises(UserError) as refused:
            check_memory(config, 4)
        assert refused.value.field == "config generation.experts.0.per_prompt"


@pytest.mark.parametrize("driver, field", [("policy_k", "generation.samples_per_prompt"),
                                           ("policy_b", "raft.prompts_per_iteration"),
                                           ("expert", "generation.experts.1.per_prompt"),
                                           ("eval", "eval.samples_per_prompt")])
def test_the_memory_refusal_names_the_largest_share(driver, field, machine_of_128_gib):
    big = {"policy_k": (2, 200000, 1, 1), "policy_b": (200000, 2, 1, 1), "expert": (2, 2, 100000, 1),
           "eval": (2, 2, 1, 50000)}[driver]
    b, k, e, ev = big
    config = RunConfig.model_validate(deep_update(TINY_CONFIG, {
        "generation": {"resolution": 256, "samples_per_prompt": k, "experts": [
            {"model": "builtin:tiny-sd", "per_prompt": 1}, {"model": "builtin:tiny-sd", "per_prompt": e}]},
        "raft": {"prompts_per_iteration": b}, "eval": {"every": 1, "samples_per_prompt": ev}}))
    with pytest.raises(UserError) as refused:
        check_memory(config, 4)
    assert refused.value.field == f"config {field}"


# -- 9b. expert texts bounded by the policy's context ---------------------------------------------

def test_an_expert_text_longer_than_the_policy_s_context_is_refused_before_the_run_writes(tmp_path, capfd,
                                                                                          tiny_llama):
    prompts = TEXT_CONFIG["prompts"]["train"]
    folder = tmp_path / "people"
    folder.mkdir()
    rows = [{"prompt": prompts[0], "text": " a fine film"}, {"prompt": prompts[1], "text": " great" * 300}]
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = deep_update(TEXT_CONFIG, {"model": {"path": str(tiny_llama)},
                                    "generation": {"experts": [{"samples": str(folder), "per_prompt": 1}]}})
    line = _assert_refused(tmp_path, capfd, cfg, "generation.experts.0.samples", "samples.jsonl:2", "256")
    n = int(line.split("are ")[1].split(" tokens")[0])
    assert n > 300  # the prompt's tokens and the text's, with the policy's tokenizer


# -- 9c. a folder changed between --resume calls --------------------------------------------------

@pytest.mark.parametrize("change, code", [("unchanged", 0), ("picture", 2), ("row_added", 2), ("jsonl_bytes", 2),
                                          ("older_checkpoint_without_record", 0)])
def test_a_sample_folder_changed_before_resume_is_refused(tmp_path, capfd, change, code):
    folder = _folder(tmp_path, [{"prompt": p, "file": "a.png"} for p in TINY_CONFIG["prompts"]["train"]],
                     files=("a.png", "b.png"))
    cfg = deep_update(_with_folder(folder), {"raft": {"iterations": 1}, "eval": {"every": 0},
                                             "generation": {"steps": 2}})
    first, _, err = _train(tmp_path, capfd, cfg)
    assert first == 0, err
    run = tmp_path / "run"
    state = json.loads((run / "checkpoints/iter_0000/state.json").read_text())
    recorded = state["experts"]
    assert set(state["experts"]) == {"0"} and len(state["experts"]["0"]["sha256"]) == 64
    if change == "picture":
        Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "a.png")
    elif change == "row_added":
        with open(folder / "samples.jsonl", "a") as f:
            f.write(json.dumps({"prompt": PROMPT, "file": "b.png"}) + "\n")
    elif change == "jsonl_bytes":  # the same rows, other bytes: still another folder than the run read
        (folder / "samples.jsonl").write_text((folder / "samples.jsonl").read_text().replace(": ", ":"))
    elif change == "older_checkpoint_without_record":  # a run of an earlier version: taken as it is
        del state["experts"]
        (run / "checkpoints/iter_0000/state.json").write_text(json.dumps(state))
        Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "a.png")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    code_now, lines, err = _train(tmp_path, capfd, cfg, "--resume", "--set", "raft.iterations=2")
    assert code_now == code, err
    assert "Traceback" not in err
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: config generation.experts.0.samples: "), err
        assert str(folder) in lines[0] and "restore" in lines[0] and "--overwrite" in lines[0]
        after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
        assert after == before  # refused before the run wrote anything
    else:
        saved = json.loads((run / "checkpoints/iter_0001/state.json").read_text())["experts"]
        if change == "unchanged":
            assert saved == recorded
        else:  # the folder as this run read it is recorded from now on
            assert saved["0"]["sha256"] != recorded["0"]["sha256"]
