"""Shared fixtures: the emulator over real HTTP on loopback, sample tables, a CLI runner."""
from __future__ import annotations

import csv
import random
import time
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchrun.cli import main
from batchrun.errors import ExitCode
from batchrun.emulator import Emulator, EmulatorConfig, serve_in_thread

FAST = dict(processing_seconds=0.05, retry_after=0.01)


@pytest.fixture(scope="session")
def emulator_server():
    emu = Emulator(EmulatorConfig(**FAST))
    handle = serve_in_thread(emu, host="127.0.0.1", port=0)
    yield emu, handle
    handle.stop()


@pytest.fixture
def fresh_emulator(emulator_server):
    """The session's emulator as new: no batches or stats, the default fast config, the real clock. Its
    config and clock outlive a test like its batches do (one emulator per session): a test that only
    reset() it would inherit the faults the test before configured (a result line always missing, say)."""
    emulator, handle = emulator_server
    emulator.config = EmulatorConfig(**FAST)
    emulator.clock = time.time
    emulator.reset()
    emulator.base_url = handle.base_url
    return emulator


@pytest.fixture
def emu(fresh_emulator, monkeypatch):
    """A fresh emulator (reset, default fast config) with the environment pointing at it."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-0123456789")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fresh_emulator.base_url)
    monkeypatch.delenv("BATCHRUN_MODELS", raising=False)
    return fresh_emulator


@pytest.fixture(scope="session")
def second_emulator_server():
    emu = Emulator(EmulatorConfig(**FAST))
    handle = serve_in_thread(emu, host="127.0.0.1", port=0)
    emu.base_url = handle.base_url
    yield emu
    handle.stop()


@pytest.fixture
def second_emulator(second_emulator_server):
    """Another emulator on loopback, on another port: another server (a local gateway, a proxy, a tunnel).
    One server for the session, handed out as new (no batches or stats, the default fast config)."""
    emulator = second_emulator_server
    emulator.config = EmulatorConfig(**FAST)
    emulator.clock = time.time
    emulator.reset()
    return emulator


@pytest.fixture
def small_csv(tmp_path):
    """Twelve rows, ids r0 … r11 (test_identity, test_identity_attack)."""
    path = tmp_path / "in.csv"
    path.write_text("id,body\n" + "".join(f"r{i},row {i} of the table\n" for i in range(12)), encoding="utf-8")
    return path


@pytest.fixture
def quick_builtin_emulator(monkeypatch):
    """`--emulator`'s own emulator ends each batch after 0.05 s instead of its 2 s (a demo's pace): for
    tests where what counts is that it is the built-in one (its endpoint, its state file), not its pace."""
    import batchrun.emulator as emulator_pkg
    config = emulator_pkg.EmulatorConfig

    def quick(**kw):
        return config(**{**kw, "processing_seconds": FAST["processing_seconds"]})
    monkeypatch.setattr(emulator_pkg, "EmulatorConfig", quick)


@pytest.fixture
def quick_backoff(monkeypatch):
    """The client's waits between retries of a failed call a tenth as long (the SDK's 0.5 s × 2^n backoff
    before 500s, 529s and dropped connections; a retry-after as told): for in-process tests where what
    counts is that faults are retried, not how long each wait is."""
    from batchrun.api import BaseClient
    retry_wait = BaseClient.retry_wait
    monkeypatch.setattr(BaseClient, "retry_wait", lambda self, state: retry_wait(self, state) / 10)


def row_id(sent: str) -> str:
    """The row's custom_id (as the output shows it) of a custom_id as batchrun sent it in a batch:
    `<job tag>-<custom_id>`, the tag being the job's 10 hex digits."""
    tag, sep, rest = sent.partition("-")
    assert len(tag) == 10 and sep, sent
    return rest


def refused(result, code=ExitCode.BAD_INPUT, *needles) -> str:
    """The command ended with `code` and printed one error line holding every needle, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output and "internal error" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("batchrun: error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args, **kw):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)

    return invoke


WORDS = ("billing refund login error crash invoice shipping delayed broken password reset charge "
         "twice feature request dark mode export csv slow page timeout thanks great support").split()
NAMES = ["Zoë", "José", "李雷", "Ołeksandr", "Ana", "Müller", "Søren", "Émilie", "Nguyễn", "Ahmed"]


def make_tickets(n: int, seed: int = 7) -> list[dict]:
    """Rows with sparse ids, quoted commas and newlines, unicode and empty cells."""
    rnd = random.Random(seed)
    rows, tid = [], 1000
    for i in range(n):
        tid += rnd.randint(1, 37)
        body = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(5, 30)))
        if i % 7 == 0:
            body += ',\n"quoted", and a second line'
        if i % 11 == 0:
            body += " ✓ naïve café 🚀"
        rows.append({
            "ticket_id": f"T-{tid}",
            "customer": "" if i % 13 == 0 else rnd.choice(NAMES),
            "priority": rnd.randint(1, 5),
            "body": f"ticket {i}: {body}",
        })
    return rows


@pytest.fixture
def tickets_csv(tmp_path) -> Path:
    path = tmp_path / "tickets.csv"
    rows = make_tickets(450)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def tickets_parquet(tickets_csv, tmp_path) -> Path:
    table = pacsv.read_csv(tickets_csv, parse_options=pacsv.ParseOptions(newlines_in_values=True))
    path = tmp_path / "tickets.parquet"
    pq.write_table(table, path)
    return path


PROMPT = "Summarise this support ticket from {{ customer }}:\n{{ body }}"


def render(row: dict) -> str:
    customer = row["customer"] if row["customer"] is not None else ""
    return f"Summarise this support ticket from {customer}:\n{row['body']}"


def pytest_collection_finish(session):
    """The LiteLLM proxy takes seconds to start: when a test of tests/test_litellm.py is to run, it is started
    in the background now, and is up by the time that module's tests come (its fixture waits for it)."""
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__.endswith("test_litellm") and hasattr(module, "start_proxy"):
            module.start_proxy()
            return
