"""The package's shape: no import circle between its modules (lazy imports inside functions count too), no SQL
outside the store, no module over 600 lines."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "batchrun"


def import_graph() -> dict:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = (package.split(".")[:len(package.split(".")) - node.level + 1] if node.level
                        else [])
                module = ".".join(base + ([node.module] if node.module else []))
                targets = ([module] if node.module else []) + [f"{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in graph and t != name}
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports():
    graph = import_graph()
    assert "batchrun.runner" in graph["batchrun.library"]        # a top-level import
    assert "batchrun.validation" in graph["batchrun.library"]    # an import inside a function


def test_no_import_circle():
    assert cycles(import_graph()) == []


# ---- the store owns the SQL; no module grows past what one reader can hold ----------------------------
EXEMPT = ("emulator",)        # the emulator is a stand-in for the API, not part of the pipeline
SQL = re.compile(r"\b(SELECT\b.+\bFROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+(TABLE|"
                 r"INDEX)|ALTER\s+TABLE|BEGIN\s+IMMEDIATE|PRAGMA)\b", re.S)
MAX_LINES = 600


def pipeline_modules() -> list:
    return [p for p in sorted(PACKAGE.rglob("*.py"))
            if p.relative_to(PACKAGE).parts[0] not in EXEMPT + ("store",)]


def sql_outside_the_store(path: Path) -> list:
    """Where a module runs SQL: a call of .execute/.executemany/.executescript, or a string that is SQL."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("execute", "executemany", "executescript")):
            found.append(f"{path.name}:{node.lineno}: .{node.func.attr}()")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value):
            found.append(f"{path.name}:{node.lineno}: {node.value[:60]!r}")
    return found


def test_the_sql_check_sees_sql(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('conn.execute("SELECT 1")\nq = "UPDATE requests SET state = ?"\nx = "select the rows"\n')
    assert len(sql_outside_the_store(probe)) == 3 - 1     # a call, an SQL string; prose is not SQL


def test_no_pipeline_module_runs_sql_outside_the_store():
    found = [hit for path in pipeline_modules() for hit in sql_outside_the_store(path)]
    assert found == []


def test_no_module_is_over_600_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if p.relative_to(PACKAGE).parts[0] not in EXEMPT
            and (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}
