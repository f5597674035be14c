"""The README's Python examples run as written (against the emulator), so the docs cannot drift from
the library."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)


def test_readme_python_examples_run(emu, tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 2
    for folder in ("jobs", "samples"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first, second = blocks[:2]
    scope = {"df": pd.DataFrame({"review": ["great value", "broke in a day"]})}
    exec(compile(first, "README.md", "exec"), scope)   # noqa: S102 - the README's own examples
    assert scope["result"].counts == {"succeeded": 400} and scope["result"].exit_code == 0
    assert scope["result"].output.endswith("reviews-classified.parquet")
    assert (tmp_path / "out" / "reviews-classified.parquet").exists()
    assert list(scope["out"]["review"]) == ["great value", "broke in a day"]
    assert set(scope["out"]["label"]) <= {"pos", "neg"}
    exec(compile(second, "README.md", "exec"), scope)  # noqa: S102
    assert scope["handle"]["job_id"] == scope["job"].id
    # the label job caches its system prompt, so its first submit sends one row to prime the cache; the
    # rest go once the primer has ended (when poll() already saw it end, the second submit sent them)
    assert emu.stats.requests_created in (400 + 2 + 1, 400 + 2 + 300)


def test_cli_reference_is_current():
    import importlib.util
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "docs" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == module.render(), \
        "docs/cli.md is stale: run `python docs/cli_reference.py`"
