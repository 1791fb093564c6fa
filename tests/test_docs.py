"""The documentation site: it builds with warnings as errors, its Reference pages list every config field,
command, reward and filter the code has, and every shell block a page marks `<!-- docs-test -->` runs
(tests/docs_commands.py says how)."""

from __future__ import annotations

import html
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from . import docs_commands
from .conftest import REPO

MKDOCS = [sys.executable, "-m", "mkdocs"]
PAGES = sorted([*(REPO / "docs").rglob("*.md"), REPO / "README.md"])
MARKED = [page for page in PAGES if docs_commands.blocks(page)]


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([*MKDOCS, "build", "--strict", "-f", str(config), "-d", str(site)], cwd=config.parent,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site") / "site"
    result = _build(REPO / "mkdocs.yml", out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "WARNING" not in result.stderr, result.stderr[-3000:]
    return out


def _models(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (a model, a list of them, an optional one, a union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every leaf field's dotted name, walked here from the models themselves (not with field_help)."""
    from raft_diffusion.config import FilterSpec, RewardSpec

    names = set()
    for name, info in model.model_fields.items():
        inner = _models(info.annotation)
        list_of = typing.get_origin(info.annotation) is list or "list[" in str(info.annotation)
        dotted = f"{prefix}{name}"
        if not inner:
            names.add(dotted)
            continue
        if list_of:
            names.add(dotted)
        for sub in inner:
            if sub in (RewardSpec, FilterSpec):  # a list of specs: the list, and the spec's own fields
                names.add(dotted)
                continue
            names |= _fields(sub, f"{dotted}[]." if list_of else f"{dotted}.")
    return names


def _codes(page: Path) -> set[str]:
    """The texts of the page's <code> spans."""
    import re

    return {html.unescape(m).strip() for m in re.findall(r"<code>(.*?)</code>", page.read_text(), flags=re.S)}


def test_the_site_builds_with_warnings_as_errors_and_holds_every_page_of_the_nav(site):
    for page in ["index", "quickstart/index", "reference/config/index", "reference/cli/index",
                 "reference/rewards/index", "guides/lora-clients/index", "architecture/index"]:
        assert (site / f"{page}.html").is_file(), page
    # the pictures the pages show are in the site, not fetched from anywhere
    assert (site / "img/demo_before_after.png").is_file()
    assert "fonts.googleapis.com" not in (site / "index.html").read_text()


def test_the_config_reference_lists_every_field_of_both_backends(site):
    from raft_diffusion.config import DiffusionRunConfig, FilterSpec, RewardSpec, TextRunConfig

    listed = _codes(site / "reference/config/index.html")
    wanted = _fields(DiffusionRunConfig) | _fields(TextRunConfig)
    wanted |= {f"rewards[].{n}" for n in RewardSpec.model_fields} | {f"filters[].{n}" for n in FilterSpec.model_fields}
    missing = sorted(wanted - listed)
    assert not missing, missing
    # the walk found the sections' fields and those of list items, not only the top level
    assert len(wanted) > 80 and {"training.replay", "generation.experts[].per_prompt"} <= wanted


def test_the_cli_reference_lists_every_command_and_option(site):
    import typer

    from raft_diffusion.cli import app

    page = (site / "reference/cli/index.html").read_text()
    listed = _codes(site / "reference/cli/index.html")
    group = typer.main.get_command(app)
    assert len(group.commands) >= 8
    for name, command in group.commands.items():
        assert f'id="{name}"' in page, name  # a section of its own
        for param in command.params:
            if param.param_type_name == "option":
                assert ", ".join(param.opts + param.secondary_opts) in listed, (name, param.opts)


def test_the_rewards_reference_lists_every_reward_and_filter_with_its_options(site):
    import inspect

    from raft_diffusion import filters, rewards

    listed = _codes(site / "reference/rewards/index.html")
    for registry, injected in ((rewards.REGISTRY, rewards.INJECTED), (filters.REGISTRY, ("field",))):
        for name, factory in registry.items():
            assert name in listed, name
            for option in inspect.signature(factory).parameters:
                if option not in injected:
                    assert any(code == option or code.startswith(f"{option} ") for code in listed), (name, option)


def test_a_broken_link_fails_the_build(tmp_path):
    """Warnings are errors: a link to a page that does not exist stops `make docs`."""
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs/quickstart.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    result = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stdout + result.stderr


def test_the_readme_links_to_files_that_exist():
    """The README is read on GitHub, outside the site: its relative links are checked here."""
    import re

    text = (REPO / "README.md").read_text()
    links = [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if not t.startswith(("http://", "https://"))]
    assert len(links) >= 15, links
    missing = [t for t in links if not (REPO / t).exists()]
    assert not missing, missing


def test_the_docs_mark_blocks_to_run():
    """The marked blocks the test below runs are there (a page whose marks were lost would run nothing)."""
    names = {str(page.relative_to(REPO)) for page in MARKED}
    assert {"docs/quickstart.md", "docs/guides/runs.md", "docs/guides/sd35.md", "docs/guides/flux.md"} <= names
    assert sum(len(b.commands) for page in MARKED for b in docs_commands.blocks(page)) >= 15


@pytest.mark.parametrize("page", MARKED, ids=[str(p.relative_to(REPO)) for p in MARKED])
def test_the_commands_of_the_docs_run(page, tmp_path):
    cwd = docs_commands.workdir(tmp_path / "work", REPO)
    failures = docs_commands.run_page(page, cwd)
    assert not failures, failures[0]


def test_a_broken_command_in_a_page_fails_naming_its_page_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Text.\n\n<!-- docs-test -->\n```bash\necho fine  # a comment\n"
                    ".venv/bin/raft-diffusion train configs/demo-tiny.yaml \\\n    --set raft.iterations=0\n```\n"
                    "\n```bash\nnot run: unmarked\n```\n")
    (commands,) = [b.commands for b in docs_commands.blocks(page)]
    assert [c.text for c in commands] == ["echo fine", ".venv/bin/raft-diffusion train configs/demo-tiny.yaml "
                                                       "--set raft.iterations=0"]
    cwd = docs_commands.workdir(tmp_path / "work", REPO)
    (failure,) = docs_commands.run_page(page, cwd)
    assert failure.startswith(f"{page}:6: `.venv/bin/raft-diffusion train") and "exited 2" in failure
    assert "raft.iterations" in failure  # the CLI's own one-line error, passed on


def test_small_settings_are_appended_to_the_runs_of_a_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('<!-- docs-test: small="--set raft.iterations=1" -->\n```bash\n'
                    ".venv/bin/raft-diffusion demo tiny --output-dir runs/t\nls runs\n```\n")
    (block,) = docs_commands.blocks(page)
    assert [c.text for c in block.commands] == [
        ".venv/bin/raft-diffusion demo tiny --output-dir runs/t --set raft.iterations=1", "ls runs"]
    page.write_text("<!-- docs-test: quick -->\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match="unknown docs-test options"):
        docs_commands.blocks(page)
