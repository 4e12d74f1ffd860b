"""The house rules of the source tree (docs/architecture.md): no import cycles between crisp-edge's
modules, counting imports inside functions too; no module much over 400 lines without a reason at its
top; the runtime-neutral bundle contract imports no runtime."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: import name prefix -> folder (pyproject.toml installs export/ as crisp_edge.export)
PACKAGES = {"crisp_edge.export": ROOT / "export", "crisp_edge": ROOT / "crisp_edge"}
MAX_LINES = 400
#: A module longer than MAX_LINES says why in its docstring, on a line starting with this.
LENGTH_REASON = "Length:"


def _modules() -> dict[str, Path]:
    mods = {}
    for prefix, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [] if rel.parts == ("__init__",) else list(rel.parts)
            if parts and parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([prefix, *parts])
            if name.startswith("crisp_edge.export") and prefix == "crisp_edge":
                continue  # not a real folder; listed under export/
            mods[name] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the crisp-edge modules it imports anywhere in its body (top level or in functions)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            graph[mod].update(t for t in targets if t in mods and t != mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (break them with a registry or by moving shared code down):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_package_is_not_imported_from_inside():
    """Modules import concrete modules, never the package facade ``crisp_edge`` (its __init__ imports them)."""
    graph = import_graph()
    offenders = sorted(m for m, deps in graph.items() if "crisp_edge" in deps and m != "crisp_edge")
    assert not offenders, f"these modules import the crisp_edge facade: {offenders}"


@pytest.mark.parametrize("mod", sorted(_modules()))
def test_module_size(mod):
    path = _modules()[mod]
    text = path.read_text()
    n = text.count("\n")
    if n > MAX_LINES:
        doc = ast.get_docstring(ast.parse(text)) or ""
        assert any(line.strip().startswith(LENGTH_REASON) for line in doc.splitlines()), (
            f"{path.relative_to(ROOT)} has {n} lines (> {MAX_LINES}): split it, or say why at its top "
            f"(a docstring line starting with {LENGTH_REASON!r}).")


def test_bundle_contract_imports_no_runtime():
    """export/bundle.py is the runtime-neutral contract: no onnx, onnxruntime or executorch import, and no
    import of a runtime's own package (sessions are found through its registry)."""
    path = ROOT / "export" / "bundle.py"
    banned = ("onnx", "onnxruntime", "executorch", "crisp_edge.export.onnx", "crisp_edge.export.executorch",
              "crisp_edge.export.parity")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found += [n for n in names if any(n == b or n.startswith(b + ".") for b in banned)]
    assert not found, f"export/bundle.py imports {found}"


def test_pyproject_lists_every_package():
    """pyproject.toml lists the packages explicitly (export/ installs as crisp_edge.export): a new
    subpackage missing there would be left out of a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {m for m, p in _modules().items() if p.name == "__init__.py"}
    assert found == listed, f"missing from pyproject.toml: {sorted(found - listed)}; stale: {sorted(listed - found)}"
