"""The benchmark scripts users run first still run: `bench/gpu_check.py --smoke` on the CPU."""

import json
import subprocess
import sys

from .conftest import REPO


def test_gpu_check_smoke_runs_the_demo_one_iteration_ours_and_naive_and_the_families(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO), "RAFT_DIFFUSION_CPU": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "smoke" and report["demos"]["tiny"]["returncode"] == 0
    assert report["demos"]["tiny"]["evaluation"].startswith("reward (mean over the iteration's samples)")
    it = report["iteration"]
    assert set(it["median_seconds"]) == {"ours", "naive"}
    assert {"generate", "score", "train", "total"} <= set(it["ratio_naive_over_ours"])
    assert it["images"] == 8 and it["images_per_second"] > 0
    assert "naive/ours" in done.stdout
    # the SDXL and FLUX iterations, memory knobs off then on: phases timed, nothing out of memory
    assert set(report["families"]) == {"builtin:tiny-sdxl", "builtin:tiny-flux"}
    for runs in report["families"].values():
        assert [r["knobs"] for r in runs] == [False, True]
        assert all(r["images"] == 4 and r["images_per_second"] > 0 and r["seconds"]["train"] > 0 for r in runs)
