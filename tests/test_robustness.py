"""Issue 4: SIGTERM ends a run like Ctrl-C, unreadable inputs get one line, and the emulator's faults
can be set from its command line."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pyarrow.parquet as pq
import pytest

from batchrun.errors import ExitCode
from tests.conftest import PROMPT, refused

KEY = "sk-ant-test-0123456789"
CLI = [sys.executable, "-c", "from batchrun.cli import main; main()"]


def run_args(inp, tmp_path, *extra):
    return ["run", "--input", str(inp), "--output", str(tmp_path / "o.parquet"), "--state", str(tmp_path / "s.sqlite"),
            "--id-column", "ticket_id", "--prompt", PROMPT, "--model", "claude-haiku-4-5", "--max-tokens", "100",
            "--batch-size", "100", "--poll-interval", "0.1", *extra]


def spawn(argv, base_url):
    env = {**os.environ, "ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": base_url, "PYTHONUNBUFFERED": "1"}
    env.pop("BATCHRUN_FAILPOINT", None)
    return subprocess.Popen(CLI + argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


# ---- SIGTERM ---------------------------------------------------------------------------------------
def test_sigterm_while_batches_run_exits_130_and_the_rerun_finishes(emu, cli, tmp_path, tickets_csv):
    emu.config.processing_seconds = 60                      # the batches are still running at SIGTERM
    proc = spawn(run_args(tickets_csv, tmp_path), emu.base_url)
    wait_for(lambda: emu.stats.batches_created >= 5)         # 450 rows in batches of 100
    time.sleep(0.3)                                          # polling now
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert "interrupted by SIGTERM" in err and "run the same command again" in err
    assert "Traceback" not in err
    emu.config.processing_seconds = 0.05
    r = cli(*run_args(tickets_csv, tmp_path))
    assert r.exit_code == 0, r.output
    assert emu.stats.requests_created == 450                 # nothing sent twice
    assert len(pq.read_table(tmp_path / "o.parquet")) == 450


def test_sigterm_in_messages_mode_keeps_the_replies_received(emu, cli, tmp_path, tickets_csv):
    emu.config.latency = 0.05           # 4 at a time: at most 80 replies a second, so 110 rows outlast the signal
    argv = run_args(tickets_csv, tmp_path, "--mode", "messages", "--concurrency", "4", "--limit", "150")
    proc = spawn(argv, emu.base_url)
    wait_for(lambda: emu.stats.messages_calls >= 40)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    sent_before = emu.stats.messages_calls
    emu.config.latency = 0.0
    r = cli(*argv)
    assert r.exit_code == 0, r.output
    assert len(pq.read_table(tmp_path / "o.parquet")) == 150
    assert emu.stats.messages_calls - sent_before < 150      # the replies received before SIGTERM were kept


# ---- inputs that exist but cannot be read --------------------------------------------------------------
def unreadable(path):
    """Make `path` a file this process cannot read. As root, chmod is no obstacle: point it at a
    write-only kernel file instead (root gets EACCES reading those)."""
    if os.geteuid() != 0:
        path.write_text("a,b\n1,2\n")
        path.chmod(0)
        return path
    target = "/proc/sys/vm/compact_memory"
    try:
        open(target, "rb").close()
    except PermissionError:
        path.symlink_to(target)
        return path
    except OSError:
        pass
    pytest.skip("no file this root process cannot read")


def test_an_unreadable_input_file(emu, cli, tmp_path):
    path = unreadable(tmp_path / "in.csv")
    refused(cli("run", "--input", path, "--prompt", "hi"), ExitCode.BAD_INPUT, "in.csv", "cannot read input",
            "Permission denied")
    assert emu.stats.create_calls == 0


def test_an_unreadable_file_inside_an_input_directory(emu, cli, tmp_path):
    (tmp_path / "data").mkdir()
    unreadable(tmp_path / "data" / "part-0.parquet")
    refused(cli("run", "--input", tmp_path / "data", "--prompt", "hi"), ExitCode.BAD_INPUT, "part-0.parquet",
            "Permission denied")
    assert emu.stats.create_calls == 0


def test_a_fifo_named_csv_is_refused_not_waited_on(emu, cli, tmp_path):
    path = tmp_path / "in.csv"
    os.mkfifo(path)
    refused(cli("run", "--input", path, "--prompt", "hi"), ExitCode.BAD_INPUT, "in.csv", "not a regular file")


@pytest.mark.parametrize("content", [
    b"\x00" * 4096,                                             # pyarrow: "Empty CSV file or block"
    bytes(range(256)).replace(b"\n", b"").replace(b"\r", b"") * 8,
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00",
    "id,text\n1,hello\n".encode("utf-16"),                      # text, but not UTF-8
    bytes(range(128, 256)) * 8,                                  # no NUL, no line end: pyarrow says "empty"
])
def test_a_binary_file_named_csv_is_not_called_empty(emu, cli, tmp_path, content):
    path = tmp_path / "in.csv"
    path.write_bytes(content)
    r = cli("run", "--input", path, "--prompt", "hi")
    refused(r, ExitCode.BAD_INPUT, "in.csv", "cannot read CSV input")
    assert "empty" not in r.output
    assert emu.stats.create_calls == 0


def test_a_blank_csv_is_still_empty(emu, cli, tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("\n  \n\n")
    refused(cli("run", "--input", path, "--prompt", "hi"), ExitCode.BAD_INPUT, "empty")


# ---- the emulator's fault flags -------------------------------------------------------------------------
def test_emulator_flag_drops_the_reply_of_a_create_and_the_run_adopts_the_batch(cli, tmp_path, tickets_csv,
                                                                               monkeypatch):
    proc = subprocess.Popen([*CLI, "emulator", "--port", "0", "--processing-seconds", "0.05",
                             "--drop-after-create", "2", "--retry-after", "0.5", "--archive-after", "3600",
                             "--max-batch-requests", "100", "--create-delay", "0.05"],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert "listening on http://" in first, first + proc.stderr.read()
        base_url = first.split("listening on ", 1)[1].split()[0]
        config = httpx.get(base_url + "/_emulator/config").json()
        assert (config["drop_after_create"], config["retry_after"], config["archive_after_seconds"],
                config["max_requests"], config["create_delay"]) == (2, 0.5, 3600, 100, 0.05)
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", base_url)
        r = cli(*run_args(tickets_csv, tmp_path))
        assert r.exit_code == 0, r.output
        stats = httpx.get(base_url + "/_emulator/stats").json()
        assert stats["faults"] == {"drop_after_create": 2}
        assert stats["batches_created"] == 5 and stats["requests_created"] == 450   # adopted, not sent again
        assert len(pq.read_table(tmp_path / "o.parquet")) == 450
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("flag, value", [("--drop-after-create", "-1"), ("--retry-after", "-2"),
                                         ("--archive-after", "-1"), ("--max-batch-requests", "0"),
                                         ("--create-delay", "-1"), ("--missing-result-lines", "-1")])
def test_emulator_fault_flags_refuse_bad_values(flag, value):
    from click.testing import CliRunner
    from batchrun.cli import main
    r = CliRunner().invoke(main, ["emulator", flag, value])
    assert r.exit_code == 2 and flag in r.output
    assert "must not be negative" in r.output or "must be at least 1" in r.output
