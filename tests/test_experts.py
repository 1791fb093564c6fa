"""Candidates from other experts (`generation.experts`): another model and a folder of samples join
each prompt's group, are scored and ranked with the policy's own, recorded by source, and trained on."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from raft_diffusion.backends.diffusion import DiffusionBackend
from raft_diffusion.backends.sampling import encode_images
from raft_diffusion.backends.text import TextBackend
from raft_diffusion.paths import ASSETS
from raft_diffusion.train import run_training

from .conftest import TEXT_CONFIG, TINY_CONFIG

PROMPTS = TINY_CONFIG["prompts"]["train"]


def image_folder(path, resolution=64, per_prompt=3, prompts=PROMPTS):
    """Flat single-colour pictures (the most JPEG-compressible there are: they win `jpeg_compressibility`)."""
    path.mkdir()
    rows = []
    for p, prompt in enumerate(prompts):
        for k in range(per_prompt):
            name = f"{p}-{k}.png"
            colour = (40 * p + 10 * k, 200 - 30 * k, 90)
            Image.new("RGB", (resolution, resolution), colour).save(path / name)
            rows.append({"prompt": prompt, "file": name})
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_folder(path, prompts):
    path.mkdir()
    rows = [{"prompt": p, "text": f" a wonderful, lovely, great film {k}"} for p in prompts for k in range(3)]
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spy_on_training(monkeypatch, backend_class):
    """Every `train` call's samples, recorded."""
    seen = []
    original = backend_class.train

    def train(self, samples, generator, old_policy=None):
        seen.append((self, samples))
        return original(self, samples, generator, old_policy)

    monkeypatch.setattr(backend_class, "train", train)
    return seen


def rows_of(run, it=0):
    return [json.loads(x) for x in (run / f"samples/iter_{it:04d}/samples.jsonl").read_text().splitlines()]


def test_a_model_and_a_folder_join_each_prompt_s_group_and_the_winners_are_trained_on(tiny_config, tmp_path,
                                                                                     monkeypatch):
    folder = image_folder(tmp_path / "people")
    config = tiny_config(generation={**TINY_CONFIG["generation"], "experts": [
        {"model": "builtin:tiny-sd", "per_prompt": 1, "steps": 2, "label": "other"},
        {"samples": str(folder), "per_prompt": 2, "label": "people"}]},
        raft={"iterations": 2, "prompts_per_iteration": 2, "seed": 0}, logging={"report_to": ["tensorboard"]})
    seen = spy_on_training(monkeypatch, DiffusionBackend)
    metrics = run_training(config, log=lambda s: None)
    run = tmp_path / "run"
    for it, record in enumerate(metrics):
        rows = rows_of(run, it)
        assert record["n_generated"] == len(rows) == 2 * (3 + 1 + 2)
        counted = {s: {"candidates": sum(r["source"] == s for r in rows),
                       "selected": sum(r["source"] == s and r["selected"] for r in rows)}
                   for s in ("policy", "other", "people")}
        assert record["sources"] == counted
        # per prompt: 3 of the policy, then 1 of the other model and 2 of the folder, in one ranking
        for prompt in {r["prompt"] for r in rows}:
            group = [r for r in rows if r["prompt"] == prompt]
            assert [r["source"] for r in group] == ["policy"] * 3 + ["other"] + ["people"] * 2
            assert sum(r["selected"] for r in group) == 1
            best = max(group, key=lambda r: r["reward"])
            assert best["selected"] and best["source"] == "people"  # flat colour: the most compressible
        people = [r for r in rows if r["source"] == "people"]
        assert all(r["seed"] is None and r["origin"]["file"].startswith(f"{PROMPTS.index(r['prompt'])}-")
                   for r in people)
        for r in people:  # the picture written is the folder's, pixel for pixel
            written = np.asarray(Image.open(run / f"samples/iter_{it:04d}" / r["file"]))
            assert np.array_equal(written, np.asarray(Image.open(folder / r["origin"]["file"]).convert("RGB")))
        assert record["seconds"]["encode"] > 0
    from .test_trackers import _events, _scalar

    events = _events(run)  # each source's selections, per iteration, in the trackers too
    for source in ("policy", "other", "people"):
        assert _scalar(events, f"train/selected/{source}") == {m["iteration"]: m["sources"][source]["selected"]
                                                              for m in metrics}
    # what was trained on: the selected folder pictures, as latents of the policy's own VAE
    backend, trained = seen[0]
    chosen = [r for r in rows_of(run, 0) if r["selected"]]
    assert trained.prompts == [r["prompt"] for r in chosen]
    pictures = torch.stack([torch.from_numpy(np.array(Image.open(folder / r["origin"]["file"]).convert("RGB")))
                            for r in chosen]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(trained.payload["latents"], encode_images(backend.pipe, pictures, 8))


def test_a_text_run_takes_a_model_expert_and_a_folder_of_texts(text_config, tiny_llama, tmp_path, monkeypatch):
    folder = text_folder(tmp_path / "people", TEXT_CONFIG["prompts"]["train"])
    config = text_config(generation={**TEXT_CONFIG["generation"], "experts": [
        {"model": str(tiny_llama), "per_prompt": 1, "temperature": 0.7},
        {"samples": str(folder), "per_prompt": 1}]})
    seen = spy_on_training(monkeypatch, TextBackend)
    metrics = run_training(config, log=lambda s: None)
    rows = rows_of(tmp_path / "run")
    assert [r["source"] for r in rows[:3]] == ["policy"] * 3
    assert sorted({r["source"] for r in rows}) == ["expert1", "expert2", "policy"]
    assert metrics[0]["sources"]["expert2"]["candidates"] == 2 and metrics[0]["n_generated"] == 2 * 5
    backend, trained = seen[0]
    folder_texts = {json.loads(x)["text"] for x in (folder / "samples.jsonl").read_text().splitlines()}
    assert {r["text"] for r in rows if r["source"] == "expert2"} <= folder_texts
    picked = [(ids, text) for ids, text in zip(trained.payload["response_ids"], trained.outputs) if text in folder_texts]
    assert picked  # the folder's texts win vader's ranking against a random tiny LLaMA's tokens
    for ids, text in picked:  # tokenized by the policy's tokenizer, after the prompt's own ids
        assert ids == backend.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_folder_without_rows_for_a_prompt_adds_none_to_it(tiny_config, tmp_path):
    folder = image_folder(tmp_path / "people", prompts=PROMPTS[:1], per_prompt=1)
    config = tiny_config(generation={**TINY_CONFIG["generation"], "experts": [{"samples": str(folder), "per_prompt": 3}]},
                         raft={"iterations": 2, "prompts_per_iteration": 2, "seed": 0}, eval={"every": 0})
    metrics = run_training(config, log=lambda s: None)
    for it, record in enumerate(metrics):
        drawn = {r["prompt"] for r in rows_of(tmp_path / "run", it)}
        assert record["sources"]["expert1"]["candidates"] == (1 if PROMPTS[0] in drawn else 0)
    assert any(PROMPTS[0] in {r["prompt"] for r in rows_of(tmp_path / "run", it)} for it in range(2))


def test_the_monet_cat_experts_demo_ranks_rendered_cats_with_the_toy_sd_s_own(tmp_path, capfd):
    from .conftest import run_in_process

    out = tmp_path / "demo"
    small = ["raft.iterations=1", "raft.prompts_per_iteration=2", "generation.samples_per_prompt=2",
             "eval.samples_per_prompt=1", "eval.every=1"]
    result = run_in_process(capfd, "demo", "monet-cat-experts", "--output-dir", str(out),
                            *[a for s in small for a in ("--set", s)])
    assert result.returncode == 0, result.stderr[-2000:]
    # the report reads the rendered rows, which no seed made (seed null in samples.jsonl)
    assert "not written" not in result.stdout + result.stderr and (out / "report.html").is_file()
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["sources"]["policy"]["candidates"] == 4 and record["sources"]["rendered"]["candidates"] == 4
    rows = rows_of(out)
    assert {r["source"] for r in rows} == {"policy", "rendered"}
    rendered = [r for r in rows if r["source"] == "rendered"]
    # the folder holds training prompts only, 4 pictures each; rows name their file there
    folder = [json.loads(x) for x in (ASSETS / "toyworld/monet-cats/samples.jsonl").read_text().splitlines()]
    assert all(folder[r["origin"]["line"] - 1] == {"prompt": r["prompt"], "file": r["origin"]["file"]} for r in rendered)
