"""mkdocs hooks: the Reference pages, generated from the code at every build, so they cannot drift.

- reference/config.md: every config field of both backends (the pydantic models in raft_diffusion/config.py),
  with its default and description, as `raft-diffusion config-help` lists them;
- reference/cli.md: every command of the CLI (the typer app in raft_diffusion/cli.py) with its arguments
  and options;
- reference/rewards.md: every registered reward and filter with what it reads and its options (the
  factories' signatures in raft_diffusion/rewards/ and raft_diffusion/filters.py).

`pages()` returns them as {path: markdown}; tests/test_docs.py reads them from the built site.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

def _cell(text: Any) -> str:
    """Text for one cell of a markdown table."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").strip()


def _code(text: Any) -> str:
    """A code span that holds any text (backticks included) inside a table cell."""
    text = _cell(text)
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if fence == "``" else f"`{text}`"


def config_page() -> str:
    from raft_diffusion.config import FilterSpec, RewardSpec, field_help

    lines = ["# Config reference", "",
             "Every field of a run's YAML config, generated from the config models (`raft_diffusion/config.py`) at "
             "each build of these pages; `raft-diffusion config-help` prints the same list. A field marked "
             "`diffusion:` or `text:` exists for that backend only. A value on the command line: "
             "`--set section.field=value`.", ""]
    sections: dict[str, list[tuple[str, str, str]]] = {}
    for name, default, text in field_help():
        sections.setdefault(name.split(".")[0].split("[")[0], []).append((name, default, text))
    sections["rewards"] = sections.get("rewards", []) + [(f"rewards[].{n}", d, t) for n, d, t in field_help(RewardSpec)]
    sections["filters"] = sections.get("filters", []) + [(f"filters[].{n}", d, t) for n, d, t in field_help(FilterSpec)]
    sections["eval"] = sections.get("eval", []) + [(f"eval.judges[].{n}", d, t) for n, d, t in field_help(RewardSpec)]
    for section, rows in sections.items():
        lines += [f"## `{section}`", "", "| field | default | description |", "| --- | --- | --- |"]
        lines += [f"| {_code(name)} | {_code(default)} | {_cell(text)} |" for name, default, text in rows]
        lines.append("")
    return "\n".join(lines)


def _command_rows(command) -> list[str]:
    import click

    rows = []
    for param in command.params:
        if param.param_type_name == "argument":
            name = (param.metavar or param.name).upper()
            kind = "argument"
        else:
            name = ", ".join(param.opts + param.secondary_opts)
            kind = "flag" if getattr(param, "is_flag", False) else "option"
        default = param.default
        if callable(default) or default in (None, (), []) or (kind == "flag" and default is False):
            default = ""
        required = "required" if param.required else ""
        rows.append(f"| {_code(name)} | {kind} | {_cell(required or (repr(default) if default != '' else ''))} | "
                    f"{_cell(getattr(param, 'help', '') or '')} |")
    return rows


def cli_page() -> str:
    import typer

    from raft_diffusion.cli import app

    group = typer.main.get_command(app)
    lines = ["# CLI reference", "",
             "Every command of `raft-diffusion`, generated from the CLI (`raft_diffusion/cli.py`) at each build of "
             "these pages. Every command answers a user error with one line naming the field and the fix, and exit "
             "code 2; `--debug` (anywhere on the line) shows the full traceback instead.", "",
             "| global option | what it does |", "| --- | --- |"]
    for param in group.params:
        if getattr(param, "help", None):
            lines.append(f"| {_code(', '.join(param.opts))} | {_cell(param.help)} |")
    lines.append("")
    for name in sorted(group.commands):
        command = group.commands[name]
        if command.hidden:
            continue
        usage = " ".join(command.collect_usage_pieces(_context(group, command, name)))
        lines += [f"## `{name}`", "", inspect.cleandoc(command.help or ""), "", "```",
                  f"raft-diffusion {name} {usage}", "```", ""]
        rows = _command_rows(command)
        if rows:
            lines += ["| name | kind | default | help |", "| --- | --- | --- | --- |", *rows, ""]
    return "\n".join(lines)


def _context(group, command, name):
    import click

    return click.Context(command, info_name=name, parent=click.Context(group, info_name="raft-diffusion"))


def _options(factory, injected: tuple[str, ...]) -> list[str]:
    rows = []
    for name, param in inspect.signature(factory).parameters.items():
        if name in injected or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        default = "required" if param.default is param.empty else repr(param.default)
        rows.append(f"`{name}` = `{_cell(default)}`" if default != "required" else f"`{name}` (required)")
    return rows


def _summary(factory) -> str:
    doc = inspect.getdoc(factory) or ""
    return _cell(re.split(r"\n\s*\n", doc)[0])


def rewards_page() -> str:
    from raft_diffusion import filters, rewards

    lines = ["# Rewards and filters reference", "",
             "Every registered reward and filter, generated from their factories (`raft_diffusion/rewards/`, "
             "`raft_diffusion/filters.py`) at each build of these pages: the name for `rewards[].name`, "
             "`eval.judges[].name` or `filters[].name`, what it reads, and the `options` it takes (with their "
             "defaults). What each computes and what it needs: [Rewards](../concepts/rewards.md). "
             "`python:package.module:function` names your own.", "",
             "## Rewards", "", "| name | reads | options | what it is |", "| --- | --- | --- | --- |"]
    for name in rewards.available():
        factory = rewards.REGISTRY[name]
        reads = rewards.reads_of(name) or ""
        if name in rewards.OPTION_READS:
            reads = f"{reads} (option `reads`)"
        lines.append(f"| `{name}` | {reads} | {'<br>'.join(_options(factory, rewards.INJECTED)) or 'none'} | "
                     f"{_summary(factory)} |")
    lines += ["", "## Filters", "", "| name | reads | options | what it does |", "| --- | --- | --- | --- |"]
    for name in filters.available():
        factory = filters.REGISTRY[name]
        reads = filters.READS[name]
        lines.append(f"| `{name}` | {reads} | {'<br>'.join(_options(factory, ('field',))) or 'none'} | "
                     f"{_summary(factory)} |")
    lines.append("")
    return "\n".join(lines)


def pages() -> dict[str, str]:
    return {"reference/config.md": config_page(), "reference/cli.md": cli_page(),
            "reference/rewards.md": rewards_page()}


def on_files(files, config):
    """Add the generated Reference pages to the site's files (mkdocs' hook)."""
    from mkdocs.structure.files import File

    for path, content in pages().items():
        files.append(File.generated(config, path, content=content))
    return files
