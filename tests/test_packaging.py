"""`pip install .` (a wheel, not the editable checkout) carries every built-in: assets, configs, prompts."""

import os
import subprocess
import sys
import tomllib
import zipfile

import pytest

from .conftest import REPO


def test_pyproject_lists_every_package_of_the_source_tree():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "raft_diffusion").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """The project built as a wheel and installed into a folder of its own (dependencies from this venv)."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(root / "dist")], check=True, capture_output=True, timeout=600)
    wheel = next((root / "dist").glob("raft_diffusion-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(root / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    return wheel, root / "site"


def test_the_wheel_carries_assets_configs_and_prompts(installed_wheel):
    wheel, _ = installed_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ["assets/toyworld/oracle.safetensors", "assets/toyworld/toy-shapes/model_index.json",
                    "assets/toyworld/toy-clip/open_clip_model.safetensors", "configs/toy-monet-cat.yaml",
                    "prompts/toy/monet_cat_eval.txt"]:
        assert f"raft_diffusion/_data/{shipped}" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def test_an_installed_wheel_runs_the_monet_cat_demo_from_any_directory(installed_wheel, tmp_path):
    _, site = installed_wheel
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    where = subprocess.run([sys.executable, "-c", "import raft_diffusion.paths as p; print(p.ASSETS)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site))  # not the checkout's assets
    small = ["--set", "raft.iterations=1", "--set", "raft.prompts_per_iteration=1",
             "--set", "generation.samples_per_prompt=2", "--set", "selection.top=1", "--set", "training.epochs=1",
             "--set", "eval.samples_per_prompt=1"]
    result = subprocess.run([sys.executable, "-m", "raft_diffusion", "demo", "monet-cat", *small], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "runs/demo-monet-cat"
    assert (run / "final/pytorch_lora_weights.safetensors").is_file() and (run / "before_after.png").is_file()
    assert "cat_in_monet" in result.stdout
