"""The package layout holds: imports run one way (wire, core, the roles,
node, cli), no role reaches into one beside it or above it, and no modules
import each other in a circle. Read from the source with ast, so it needs
nothing outside the project."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "relay"

# what each part may import, besides itself and `relay` (the version);
# the roles' __init__ docstrings say the same in words
ALLOWED: dict[str, set[str]] = {
    "wire": set(),
    "core": set(),
    "client": {"wire"},
    "testing": {"wire", "core", "client"},
    "ingest": {"wire", "core"},
    "stage": {"wire", "core"},
    "listeners": {"wire", "core", "ingest", "stage"},
    "hls": {"wire", "core"},
    "cluster": {"wire", "core", "client"},
    "ops": {"wire", "core", "ingest", "stage", "listeners", "cluster", "hls"},
    "node": {"wire", "core", "ingest", "stage", "listeners", "cluster", "hls", "ops"},
    "cli": {"wire", "core", "client", "testing", "ingest", "stage", "listeners", "cluster", "hls", "ops",
            "node"},
    "main": {"cli"},
}
ROLES = ("ingest", "stage", "listeners", "cluster", "hls", "ops")


def part_of(module: str) -> str:
    """relay.listeners.quic.endpoint -> listeners; relay._core -> core."""
    parts = module.split(".")
    if len(parts) == 1:
        return "relay"
    top = parts[1]
    return {"_core": "core", "__main__": "main"}.get(top, top)


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported relay module, line, at module level) for each import."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from relay.listeners.quic import tls` imports a module too
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if name == "relay" or name.startswith("relay."):
                found.append((name, node.lineno, id(node) in top_level))
    return found


def check(root: Path) -> list[str]:
    """Every import that breaks the layout, and every circle, one line each."""
    modules = {module_name(root, p): p for p in root.rglob("*.py")}
    problems = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in sorted(modules.items()):
        mine = part_of(module)
        for name, line, top in imports_of(path, module):
            target = name if name in modules else name.rpartition(".")[0]
            if target not in modules and part_of(name) != "core":
                continue   # a name from a module, counted with its module above
            theirs = part_of(target if target in modules else name)
            if theirs not in (mine, "relay") and theirs not in ALLOWED.get(mine, set()):
                problems.append(f"{path.relative_to(root.parent)}:{line}: {mine} may not import {name}")
            if top and target in modules and target != module:
                graph[module].add(target)
    problems += [f"import circle: {' -> '.join(c)}" for c in circles(graph)]
    return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each circle of module-level imports, once (depth-first search)."""
    found, state = [], dict.fromkeys(graph, 0)   # 0 unseen, 1 on the path, 2 done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state[n] == 1:
                found.append(path[path.index(n):] + [n])
            elif state[n] == 0:
                visit(n)
        path.pop()
        state[m] = 2
    for m in sorted(graph):
        if state[m] == 0:
            visit(m)
    return found


def test_imports_run_one_way_with_no_circles() -> None:
    assert check(ROOT) == []


def test_each_role_says_what_it_owns_and_may_import() -> None:
    for role in ROLES:
        doc = ast.get_docstring(ast.parse((ROOT / role / "__init__.py").read_text())) or ""
        assert "May import" in doc, f"relay/{role}/__init__.py: its docstring must say what it may import"


def test_the_check_finds_a_backward_import_and_a_circle(tmp_path) -> None:
    root = tmp_path / "relay"
    for pkg in ("wire", "listeners", "ops"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "wire" / "a.py").write_text("from relay.listeners import b\n")        # wire reaching up
    (root / "listeners" / "b.py").write_text("from relay.listeners.c import x\n")
    (root / "listeners" / "c.py").write_text("from relay.listeners.b import y\n")  # b <-> c
    (root / "listeners" / "d.py").write_text("def f():\n    from relay.ops import e\n")  # a role reaching ops
    (root / "ops" / "e.py").write_text("from relay.listeners import b\n")         # allowed
    problems = check(root)
    assert any("wire may not import relay.listeners" in p for p in problems), problems
    assert any("listeners may not import relay.ops" in p for p in problems), problems
    assert any(p.startswith("import circle: relay.listeners.b -> relay.listeners.c -> relay.listeners.b")
               for p in problems), problems
    assert not any("ops/e.py" in p for p in problems), problems
