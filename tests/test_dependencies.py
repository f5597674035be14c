"""Every dependency pyproject.toml declares is used by the package (issue 16: starlette was declared and never
imported; sqlite-utils only named as a type)."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
MODULE = {"sqlite-utils": "sqlite_utils", "Jinja2": "jinja2"}   # distribution -> the module it installs
# used without an import statement of its own: pyarrow's Table.from_pandas / to_pandas (run_table, run_dataframe)
# need pandas installed
INDIRECT = {"pandas": re.compile(r"\.(from|to)_pandas\(")}


def imported() -> tuple[set, str]:
    modules, text = set(), []
    for path in (ROOT / "batchrun").rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        text.append(source)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                modules.add(node.module.split(".")[0])
    return modules, "\n".join(text)


def test_every_declared_dependency_is_used():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    names = [re.match(r"[A-Za-z0-9_.-]+", d)[0] for d in declared]
    modules, text = imported()
    unused = [n for n in names if MODULE.get(n, n.lower().replace("-", "_")) not in modules
              and not (n in INDIRECT and INDIRECT[n].search(text))]
    assert unused == []
    assert "sqlite_utils" in modules and "starlette" not in modules
