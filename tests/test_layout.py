"""The package layout: no import cycles among fsd_runtime's modules (counting imports inside
functions too), and the core runtime imports nothing from the AWS adapters."""
from __future__ import annotations

import ast
import os

import fsd_runtime

ROOT = os.path.dirname(os.path.abspath(fsd_runtime.__file__))
#: The core runtime (issue 14): none of these may import an AWS adapter, even lazily.
CORE = {"fsd_runtime.model", "fsd_runtime.partition", "fsd_runtime.plan", "fsd_runtime.worker",
        "fsd_runtime.coordinator", "fsd_runtime.channels", "fsd_runtime.channels.base",
        "fsd_runtime.channels.local", "fsd_runtime.launch", "fsd_runtime.storage", "fsd_runtime.metrics",
        "fsd_runtime.events", "fsd_runtime.kinds"}


def _modules() -> dict[str, str]:
    found = {}
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), os.path.dirname(ROOT))[:-3]
                module = rel.replace(os.sep, ".").removesuffix(".__init__")
                found[module] = os.path.join(dirpath, name)
    return found


def _imports(path: str, module: str, known: set[str]) -> set[str]:
    """fsd_runtime modules ``path`` imports anywhere (``from a import b`` counts b if b is a module)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known and n != module}
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, m, set(modules)) for m, p in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = _graph()
    assert "fsd_runtime.worker" in graph["fsd_runtime.launch"] or \
        "fsd_runtime.launch" in graph["fsd_runtime.worker"]  # a real edge is found
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    assert _cycle(_graph()) is None


def test_core_runtime_imports_no_aws_adapter():
    graph = _graph()
    aws = {m for m in graph if m not in CORE and m.startswith(("fsd_runtime.aws", "fsd_runtime.channels.queue",
                                                               "fsd_runtime.channels.object"))}
    assert aws, "the AWS modules were not found"
    for module in CORE & set(graph):
        assert not graph[module] & aws, (module, graph[module] & aws)
