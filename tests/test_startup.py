"""`batchrun --help`, `jobs` and `status` import only what they need (issue #17: start-up under 0.25 s).

Not timed (timings belong in benchmarks/): each command runs in a fresh interpreter, which then reports
the modules it loaded. pandas (once pulled in by sqlite-utils), pyarrow, httpx, Jinja2 and the runner
are what made these commands take ~0.5 s; none of them is needed to read a state file or print help.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("pandas", "pyarrow", "httpx", "jinja2", "sqlite_utils", "numpy", "batchrun.runner", "batchrun.api")

PROBE = """
import json, sys
from batchrun.cli import main
sys.argv = ["batchrun"] + json.loads(sys.argv[1])
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def loaded(argv: list) -> tuple:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True,
                          timeout=60)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    return report["code"], proc.stdout, set(report["modules"])


@pytest.fixture
def state_file(tmp_path, cli, emu):
    """A state file with one finished job in it."""
    data = tmp_path / "in.csv"
    data.write_text("id,text\n1,hello\n2,world\n")
    state = tmp_path / "state.sqlite"
    result = cli("run", "--input", str(data), "--output", str(tmp_path / "out.parquet"), "--state", str(state),
                  "--prompt", "Say {{ text }}", "--poll-interval", "0.05", "-q")
    assert result.exit_code == 0, result.output
    return state


@pytest.mark.parametrize("argv", [["--help"], ["jobs", "--state", "{state}"], ["status", "--state", "{state}"]])
def test_light_commands_import_only_what_they_need(argv, state_file):
    code, out, modules = loaded([a.format(state=state_file) for a in argv])
    assert code == 0, out
    assert out.strip()
    if argv[0] != "--help":
        assert "2" in out   # the job's rows are shown
    heavy = sorted(m for m in HEAVY if m in modules)
    assert heavy == [], f"batchrun {argv[0]} imported {heavy}"
