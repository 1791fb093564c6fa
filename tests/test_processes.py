"""The loop shards by process rank: two CPU processes (torchrun, gloo) run it like one."""

import json
import subprocess
import sys

from .conftest import REPO, TINY_CONFIG, deep_update, run_cli, write_yaml


def test_two_processes_generate_the_same_samples_as_one(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", deep_update(TINY_CONFIG, {
        "raft": {"iterations": 2, "prompts_per_iteration": 2}, "eval": {"every": 0},
        "generation": {"samples_per_prompt": 3}}))
    one = run_cli("train", str(config), "--output-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "raft_diffusion",
         "train", str(config), "--output-dir", str(tmp_path / "two")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("iter 1/2") == 1  # only the main process logs

    def rows(run, it):
        return [json.loads(x) for x in (tmp_path / run / f"samples/iter_{it:04d}/samples.jsonl").read_text().splitlines()]

    # Iteration 1 comes from the same base model: same prompts, seeds and selection, in order.
    a, b = rows("one", 0), rows("two", 0)
    assert [(r["prompt"], r["seed"], r["selected"]) for r in a] == [(r["prompt"], r["seed"], r["selected"]) for r in b]
    assert (tmp_path / "two/final/pytorch_lora_weights.safetensors").is_file()
    assert len((tmp_path / "two/metrics.jsonl").read_text().splitlines()) == 2
