"""The house rules of ARCHITECTURE.md, checked on the package's source: no import cycle (imports at the
top of a module and inside functions alike), and no module but the registry testing the `backend`
string."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import raft_diffusion
from raft_diffusion import seeds

PACKAGE = Path(raft_diffusion.__file__).parent


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in its source (a function's imports too)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [module] + [f"{module}.{alias.name}" for alias in node.names]  # `from . import x`
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40 and "raft_diffusion.loop" in graph["raft_diffusion.train"]  # the walk saw the package
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle_through_a_function_local_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (package / "c.py").write_text("import pkg.a\n")
    (package / "d.py").write_text("from . import c\n")
    assert cycles(import_graph(package)) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def _backend_string_tests(path: Path) -> list[int]:
    """Lines comparing something's `.backend` with a string constant."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "backend" for s in sides) and \
                    any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides):
                lines.append(node.lineno)
    return lines


# config.py: the union's shared base still holds two validators that name a backend (negative_aware is
# diffusion's; a text run's default LoRA targets)
REGISTRIES = ("kinds.py", "config.py")


def test_only_the_registry_tests_the_backend_string(tmp_path):
    offenders = {str(path.relative_to(PACKAGE)): lines for path in sorted(PACKAGE.rglob("*.py"))
                 if path.name not in REGISTRIES and (lines := _backend_string_tests(path))}
    assert offenders == {}
    probe = tmp_path / "probe.py"
    probe.write_text("def f(config):\n    return 1 if config.backend == 'text' else 2\n")
    assert _backend_string_tests(probe) == [2]  # the check can fail


def test_no_two_seed_purposes_share_a_key_shape():
    shapes = list(seeds.PLACES.values())
    assert len(set(shapes)) == len(shapes) == 6
    # and the derived streams of two purposes that share a number differ
    assert seeds.expert_seed(7, 1, 0, 0) != seeds.rank_seed(7, 1, seeds.PROCESS_TRAINING)
    assert seeds.policy_seed(7, 0, 0) != seeds.eval_seed(7, 0)


@pytest.mark.parametrize("name", ["diffusion", "text"])
def test_every_backend_kind_names_a_class_with_the_protocol(name):
    from raft_diffusion.kinds import KINDS
    from raft_diffusion.protocols import Backend

    cls = KINDS[name].backend_class()
    wanted = {n for n in dir(Backend) if not n.startswith("_")} | set(Backend.__annotations__)
    missing = sorted(n for n in wanted if not hasattr(cls, n) and n not in ("lora_params",))
    assert missing == [] and cls.kind == name
