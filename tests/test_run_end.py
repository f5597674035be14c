"""The end of a run: the figures it ends with (rows by state, what the job paid, tokens, cache use, usage per price
tier) are read once, in one scan, on a connection of their own while the output is written (Runner.finish), and
handed to the summary; status shows the same figures from its own scan. A failure of that read ends the run as
the read did when it came after the write: its error, raised where the run ends."""
from __future__ import annotations

import json
import sqlite3

from batchrun.errors import ExitCode
from batchrun.store import StoreReader
from tests.conftest import PROMPT


def run_args(inp, tmp_path, *extra):
    return ["run", "--input", inp, "--output", tmp_path / "o.parquet", "--state", tmp_path / "s.sqlite",
            "--id-column", "ticket_id", "--prompt", PROMPT, "--model", "claude-haiku-4-5", "--max-tokens", 200,
            "--batch-size", 100, "--poll-interval", "0.05", *extra]


def test_the_summary_and_status_show_the_figures_of_one_read(emu, cli, tmp_path, tickets_csv, monkeypatch):
    reads = []
    figures = StoreReader.figures

    def counted(self, job_id, tiers=()):
        reads.append(job_id)
        return figures(self, job_id, tiers)

    monkeypatch.setattr(StoreReader, "figures", counted)
    r = cli(*run_args(tickets_csv, tmp_path))
    assert r.exit_code == ExitCode.OK, r.output
    assert len(reads) == 1   # the run's end read them once (the summary took them as read)
    status = json.loads(cli("status", "--state", tmp_path / "s.sqlite", "--json").output)[0]
    t = status["tokens"]
    assert f"{status['counts']['succeeded']} succeeded" in r.output
    assert f"tokens: {t['input']:,} input, {t['output']:,} output" in r.output
    assert f"the job cost ${status['cost_usd']:,.6f} in all" in r.output


def test_a_failed_read_of_the_figures_ends_the_run_with_its_error(emu, cli, tmp_path, tickets_csv, monkeypatch):
    figures = StoreReader.figures

    def failed(self, job_id, tiers=()):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(StoreReader, "figures", failed)
    r = cli(*run_args(tickets_csv, tmp_path))
    assert r.exit_code != ExitCode.OK and "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.startswith("batchrun:")]
    assert len(lines) == 1 and "disk I/O error" in lines[0], r.output
    monkeypatch.setattr(StoreReader, "figures", figures)
    r = cli(*run_args(tickets_csv, tmp_path))   # the job is saved: run again, and it ends
    assert r.exit_code == ExitCode.OK, r.output


def test_the_program_ends_with_its_code_everything_said_and_the_state_closed(emu, tmp_path, tickets_csv):
    """`batchrun` as a process ends at once once its command has ended (cli.Program): the summary written,
    the exit code the command's, the state file closed (its WAL copied in and gone)."""
    import os
    import subprocess
    import sys
    program = [sys.executable, "-c", "from batchrun.cli import main; main()"]
    done = subprocess.run([*program, *map(str, run_args(tickets_csv, tmp_path))], capture_output=True, text=True,
                          env=dict(os.environ), timeout=120)
    assert done.returncode == ExitCode.OK, done.stderr
    assert "finished after" in done.stderr and f"output: {tmp_path / 'o.parquet'}" in done.stderr
    assert not (tmp_path / "s.sqlite-wal").exists()
    status = subprocess.run([*program, "status", "--state", str(tmp_path / "s.sqlite"), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and json.loads(status.stdout)[0]["finished"]
    missing = subprocess.run([*program, "status", "--state", str(tmp_path / "none.sqlite")], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == ExitCode.BAD_INPUT and missing.stderr.startswith("batchrun: error:")


def test_under_a_profiler_the_program_ends_as_usual_and_the_profile_is_written(emu, tmp_path, tickets_csv):
    """(benchmarks/bench.py --profile runs `main()` under cProfile, which writes its stats at the usual exit.)"""
    import os
    import subprocess
    import sys
    prof = tmp_path / "run.prof"
    code = (f"import cProfile, sys; sys.argv = ['batchrun'] + {[str(a) for a in run_args(tickets_csv, tmp_path)]!r}\n"
            f"from batchrun.cli import main\ncProfile.run('main()', {str(prof)!r})\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                          timeout=120)
    assert done.returncode == 0 and "finished after" in done.stderr, done.stderr
    assert prof.stat().st_size > 0
