"""`pip install .` (a wheel, not the editable checkout) carries every built-in: assets, configs, prompts."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO

# Top-level folders whose every file ships inside the wheel as raft_diffusion/_data/<folder>/...
SHIPPED = ["assets/toyworld", "configs", "prompts"]


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def _shipped_files() -> list[str]:
    files = sorted(str(p.relative_to(REPO)) for root in SHIPPED for p in (REPO / root).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts)
    assert len(files) > 50, files  # the toy world's weights, its sample pictures, configs and prompt files
    return files


def test_pyproject_lists_every_package_of_the_source_tree():
    listed = set(_setuptools()["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "raft_diffusion").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"


def test_pyproject_lists_every_data_folder_python_could_import():
    """setuptools warns ("Package would be ignored") for a data folder with an importable name that
    `packages` does not list: every such folder holding shipped files is listed."""
    setuptools = _setuptools()
    folders = {folder: package for package, folder in setuptools["package-dir"].items()}
    wanted = set()
    for path in _shipped_files():
        top, *inner, _file = path.split("/")
        for depth in range(1, len(inner) + 1):
            if top in folders and all(n.isidentifier() for n in inner[:depth]):
                wanted.add(".".join([folders[top], *inner[:depth]]))
    assert {"raft_diffusion._data.assets.toyworld", "raft_diffusion._data.prompts.toy"} <= wanted
    listed = set(setuptools["packages"])
    assert wanted <= listed, f"add {sorted(wanted - listed)} to [tool.setuptools] packages in pyproject.toml"


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """The project built as a wheel and installed into a folder of its own (dependencies from this venv),
    and what the build printed."""
    root = tmp_path_factory.mktemp("wheel")
    # built from a copy: pip builds in the tree's build/, and two xdist workers building the same tree race there
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "runs",
                                                                 "results", ".pytest_cache", "__pycache__", "site"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-v", "-w", str(root / "dist")], check=True, capture_output=True, text=True, timeout=600)
    wheel = next((root / "dist").glob("raft_diffusion-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(root / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    return wheel, root / "site", build.stdout + build.stderr


def test_the_wheel_carries_every_data_file_and_builds_without_warnings(installed_wheel):
    wheel, _, log = installed_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in _shipped_files() if f"raft_diffusion/_data/{f}" not in names]
    assert not missing, f"not in the wheel: {missing[:10]}"
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    # the documentation and its pictures stay out of the wheel (docs/img holds 1.4 MB of PNGs)
    assert not any(n.startswith(("docs/", "raft_diffusion/_data/docs/")) or n.endswith("_before_after.png")
                   for n in names)
    assert "Building wheel for raft-diffusion" in log or "raft_diffusion-" in log  # the verbose log was read
    assert "absent from the `packages` configuration" not in log, \
        [line for line in log.splitlines() if "absent from" in line]


def test_an_installed_wheel_runs_the_monet_cat_demo_from_any_directory(installed_wheel, tmp_path):
    _, site, _ = installed_wheel
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


# --- the locked install ------------------------------------------------------------------------


def test_the_venv_make_built_holds_exactly_what_the_lock_pins():
    """`make demo` / `make test` install requirements-dev.lock and nothing else (pip itself is pinned in
    the Makefile, the project is the editable install)."""
    from .locked_versions import frozen, locked, moved

    stamp = Path(sys.prefix) / ".installed"
    made = stamp.read_text().strip() if stamp.is_file() else None
    if made != "requirements-dev.lock":
        message = f"{sys.prefix} was not built from the lock by `make` (its stamp says {made!r})"
        if os.environ.get("CI") and made is None:
            pytest.fail(message)
        pytest.skip(message)
    assert moved(locked(), frozen()) == []
    assert f"PIP_VERSION := {importlib.metadata.version('pip')}" in (REPO / "Makefile").read_text()


def test_the_lock_reader_evaluates_markers_and_the_comparison_names_what_moved(tmp_path):
    from .locked_versions import locked, moved

    lock = tmp_path / "x.lock"
    lock.write_text("# a comment\nfoo==1.2 \\\n    --hash=sha256:abc \\\n    --hash=sha256:def\n    # via bar\n"
                    "Bar_Baz==2.0 ; python_version >= '3.0'\nwin-only==3.0 ; sys_platform == 'never'\n")
    assert locked(lock) == {"foo": "1.2", "bar-baz": "2.0"}
    assert moved(locked(lock), {"foo": "1.2", "bar-baz": "2.1", "extra": "0.1"}) == [
        "bar-baz: locked 2.0, installed 2.1", "extra: 0.1 installed, not in the lock"]
    lock.write_text("foo>=1.2\n")
    with pytest.raises(ValueError, match="not an exact pin"):
        locked(lock)
