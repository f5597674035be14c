"""Issue 15, the user's machine and files: a damaged state file, a full disk, another program's
database or a symbolic link given as the state, a proxy that must never see the key, the cost of
failed rows, and a state file from a newer batchrun. Every case through the CLI against the emulator."""
from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import threading

import httpx
import pyarrow.parquet as pq
import pytest

from batchrun import failpoints
from batchrun.api import ApiClient, RetryPolicy, http_client
from batchrun.errors import ApiError, ExitCode
from batchrun.store import APPLICATION_ID, MIGRATIONS
from tests.conftest import refused
from tests.test_pipeline import check_output, run_args, source_rows

KEY = "sk-ant-test-0123456789"   # the emu fixture's key


def snapshot(path):
    """What must not change in a file that is not batchrun's: its bytes and its mode."""
    return path.read_bytes(), stat.S_IMODE(path.stat().st_mode)


def billed_once(emu, rows):
    """Every row was paid for exactly once."""
    assert len(emu.stats.billed) == rows, (len(emu.stats.billed), rows)
    assert set(emu.stats.billed.values()) == {1}


# ---- 9. a damaged state file ------------------------------------------------------------------------

def _checkpoint(path):
    c = sqlite3.connect(path)
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = c.execute("PRAGMA page_size").fetchone()[0]
    roots = dict(c.execute("SELECT name, rootpage FROM sqlite_master WHERE rootpage > 0"))
    c.close()
    return page, roots


def _smash(path, page_size, page_no):
    """Overwrite one page of the file with garbage (as a failing disk or a torn copy would)."""
    with open(path, "r+b") as f:
        f.seek((page_no - 1) * page_size)
        f.write(bytes([0xA5]) * page_size)


def test_a_state_file_damaged_where_it_opens_is_refused_in_one_line(emu, cli, tmp_path, tickets_csv):
    out, state = tmp_path / "out.parquet", tmp_path / "state.sqlite"
    assert cli(*run_args(tickets_csv, out, "--state", state, "--limit", 20)).exit_code == 0
    page, _ = _checkpoint(state)
    with open(state, "r+b") as f:            # the schema on page 1, after the 100-byte header
        f.seek(100)
        f.write(bytes([0xA5]) * (page - 100))
    for args in (run_args(tickets_csv, out, "--state", state, "--limit", 20), ["status", "--state", state]):
        line = refused(cli(*args), ExitCode.BAD_INPUT, f"state file {state} is damaged", "Restore it from a backup")
        assert "internal error" not in line


def test_a_state_file_damaged_mid_run_is_refused_in_one_line(emu, cli, tmp_path, tickets_csv):
    """The file opens (its header, schema and jobs are sound) and the damage is met only when the run
    reads its requests: one line, not an internal error."""
    emu.config.processing_seconds = 30
    out, state = tmp_path / "out.parquet", tmp_path / "state.sqlite"
    r = cli(*run_args(tickets_csv, out, "--state", state, "--no-wait"))
    assert r.exit_code == ExitCode.IN_PROGRESS, r.output
    page, roots = _checkpoint(state)
    for name in ("requests", "requests_batch", "requests_row"):
        _smash(state, page, roots[name])
    r = cli(*run_args(tickets_csv, out, "--state", state))
    refused(r, ExitCode.BAD_INPUT, f"state file {state} is damaged", "malformed")
    assert emu.stats.batches_created == 2          # nothing sent again over a damaged plan


def test_the_library_raises_the_same_line_for_a_damaged_state(emu, cli, tmp_path, tickets_csv):
    import batchrun
    out, state = tmp_path / "out.parquet", tmp_path / "state.sqlite"
    job = {"input": str(tickets_csv), "output": str(out), "state": str(state), "id_column": "ticket_id",
           "prompt": "Summarise: {{ body }}", "model": "claude-haiku-4-5", "max_tokens": 100, "poll_interval": 0.1}
    emu.config.processing_seconds = 30
    assert batchrun.run(job, wait=False).exit_code == ExitCode.IN_PROGRESS
    page, roots = _checkpoint(state)
    for name in ("requests", "requests_batch", "requests_row"):
        _smash(state, page, roots[name])
    for call in (lambda: batchrun.run(job, wait=False), lambda: batchrun.status(str(state))):
        with pytest.raises(batchrun.BatchrunError) as failure:
            call()
        assert failure.value.exit_code == ExitCode.BAD_INPUT
        assert f"state file {state} is damaged" in str(failure.value)


# ---- 10. a full disk ----------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (as root, where mounts are allowed); skipped elsewhere — the failpoint tests below
    cover the same places."""
    where = tmp_path / "disk"
    where.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(where)], check=True,
                       capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot mount a small tmpfs here (not root, or no mount permission)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


def fill(disk, leave):
    """Fill `disk` until only about `leave` bytes are free; returns the filler (remove it to free them)."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(filler, "ab") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def wide_csv(path, n=300, width=1200):
    """Rows with wide random text: plans, replies and outputs of a few hundred KB that do not compress."""
    import csv
    import random
    rnd = random.Random(5)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ticket_id", "customer", "priority", "body"])
        for i in range(n):
            w.writerow([f"T-{i}", "Ana", i % 5 + 1, "".join(rnd.choice("abcdefghij klmnop") for _ in range(width))])
    return path


def no_space(r, where):
    return refused(r, ExitCode.API_ERROR, f"no space left on {where}", "nothing was lost, run again once there is room")


def test_a_full_disk_while_planning(emu, cli, tmp_path, small_disk):
    inp, out, state = wide_csv(tmp_path / "in.csv"), tmp_path / "out.parquet", small_disk / "state.sqlite"
    filler = fill(small_disk, 160 * 1024)
    no_space(cli(*run_args(inp, out, "--state", state)), state)
    assert emu.stats.create_calls == 0                 # nothing was sent
    filler.unlink()
    r = cli(*run_args(inp, out, "--state", state))
    assert r.exit_code == 0, r.output
    check_output(out, source_rows(inp))
    billed_once(emu, 300)


def test_a_full_disk_while_recording_results(emu, cli, tmp_path, small_disk):
    emu.config.processing_seconds = 0.5
    inp, out, state = wide_csv(tmp_path / "in.csv"), tmp_path / "out.parquet", small_disk / "state.sqlite"
    r = cli(*run_args(inp, out, "--state", state, "--no-wait"))
    assert r.exit_code == ExitCode.IN_PROGRESS, r.output
    assert emu.stats.batches_created == 1
    filler = fill(small_disk, 96 * 1024)
    import time
    time.sleep(0.6)                                    # the batch has ended: its results do not fit
    no_space(cli(*run_args(inp, out, "--state", state)), state)
    assert not out.exists()
    filler.unlink()
    r = cli(*run_args(inp, out, "--state", state))
    assert r.exit_code == 0, r.output
    check_output(out, source_rows(inp))
    assert emu.stats.batches_created == 1              # downloaded again, never sent again
    billed_once(emu, 300)


def test_a_full_disk_while_writing_the_output(emu, cli, tmp_path, small_disk):
    inp, state = wide_csv(tmp_path / "in.csv"), tmp_path / "state.sqlite"
    out = small_disk / "out.parquet"
    filler = fill(small_disk, 64 * 1024)
    no_space(cli(*run_args(inp, out, "--state", state)), out)
    assert os.listdir(small_disk) == ["filler"]          # no temporary output left taking the room
    filler.unlink()
    r = cli(*run_args(inp, out, "--state", state))
    assert r.exit_code == 0, r.output
    check_output(out, source_rows(inp))
    assert emu.stats.batches_created == 1
    billed_once(emu, 300)


@pytest.mark.parametrize("where", ["plan", "result_line", "before_rename"])
def test_a_full_disk_met_anywhere_is_one_line_and_resumable(emu, cli, tmp_path, tickets_csv, monkeypatch, where):
    """The same, with ENOSPC injected where the state's plan, a result or the output is written (for
    machines where no small filesystem can be mounted)."""
    out, state = tmp_path / "out.parquet", tmp_path / "state.sqlite"
    monkeypatch.setattr(failpoints, "_FULL", where)
    monkeypatch.setattr(failpoints, "_hits", {})
    no_space(cli(*run_args(tickets_csv, out, "--state", state)), out if where == "before_rename" else state)
    assert not out.exists()
    monkeypatch.setattr(failpoints, "_FULL", None)
    r = cli(*run_args(tickets_csv, out, "--state", state))
    assert r.exit_code == 0, r.output
    check_output(out, source_rows(tickets_csv))
    assert emu.stats.batches_created == 2              # sent once: by the first run, or (plan) the second
    billed_once(emu, 450)


# ---- 11. another program's database -------------------------------------------------------------------

def foreign_db(path, wal=False, app_id=0):
    c = sqlite3.connect(path)
    if wal:
        c.execute("PRAGMA journal_mode=WAL")
    if app_id:
        c.execute(f"PRAGMA application_id = {app_id}")
    c.execute("CREATE TABLE contacts (id INTEGER PRIMARY KEY, name TEXT)")
    c.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    c.executemany("INSERT INTO contacts (name) VALUES (?)", [("Zoë",), ("José",)])
    c.commit()
    c.close()
    os.chmod(path, 0o644)
    return path


@pytest.mark.parametrize("kind", ["rollback", "wal", "application_id", "not_sqlite"])
def test_another_programs_file_is_refused_and_left_as_it_was(emu, cli, tmp_path, tickets_csv, kind):
    state = tmp_path / "their.db"
    if kind == "not_sqlite":
        state.write_text("name,phone\nAna,555\n")
        os.chmod(state, 0o644)
    else:
        foreign_db(state, wal=kind == "wal", app_id=0x12345678 if kind == "application_id" else 0)
    before, files = snapshot(state), sorted(os.listdir(tmp_path))
    for args in (run_args(tickets_csv, tmp_path / "out.parquet", "--state", state),
                 ["status", "--state", state], ["jobs", "--state", state]):
        refused(cli(*args), ExitCode.BAD_INPUT, str(state), "is not a batchrun state file", "--state")
        assert snapshot(state) == before
        assert sorted(os.listdir(tmp_path)) == files     # no -wal, -shm, .locks or output beside it
    assert emu.stats.create_calls == 0


def test_state_files_carry_batchrun_s_mark_and_old_ones_get_it(emu, cli, tmp_path, tickets_csv):
    out, state = tmp_path / "out.parquet", tmp_path / "state.sqlite"
    assert cli(*run_args(tickets_csv, out, "--state", state, "--limit", 10)).exit_code == 0
    with sqlite3.connect(state) as c:
        assert c.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        c.execute("PRAGMA application_id = 0")            # as a batchrun older than the mark left it
        c.execute("DROP TABLE _batchrun_meta")
    r = cli(*run_args(tickets_csv, out, "--state", state, "--limit", 10))
    assert r.exit_code == 0, r.output
    assert emu.stats.batches_created == 1                 # the same job, found again: nothing re-sent
    with sqlite3.connect(state) as c:
        assert c.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID


def test_an_empty_file_becomes_a_state_file(emu, cli, tmp_path, tickets_csv):
    """0 bytes hold nothing to lose (a first run stopped before writing leaves one, as does `touch`)."""
    state = tmp_path / "state.sqlite"
    state.touch()
    r = cli(*run_args(tickets_csv, tmp_path / "out.parquet", "--state", state, "--limit", 10))
    assert r.exit_code == 0, r.output
    with sqlite3.connect(state) as c:
        assert c.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID


# ---- 12. symbolic links ---------------------------------------------------------------------------------

@pytest.mark.parametrize("target_kind", ["file", "state", "missing"])
def test_a_symlink_as_the_state_is_refused_and_its_target_untouched(emu, cli, tmp_path, tickets_csv, target_kind):
    target = tmp_path / "elsewhere" / "target.sqlite"
    target.parent.mkdir()
    if target_kind == "file":
        target.write_text("someone's notes\n")
        os.chmod(target, 0o644)
    elif target_kind == "state":   # even a real state file: the link is not followed
        assert cli(*run_args(tickets_csv, tmp_path / "o.parquet", "--state", target, "--limit", 5)).exit_code == 0
        os.chmod(target, 0o640)
    link = tmp_path / "state.sqlite"
    link.symlink_to(target)
    before = snapshot(target) if target.exists() else None
    listing = sorted(os.listdir(target.parent))
    for args in (run_args(tickets_csv, tmp_path / "out.parquet", "--state", link, "--limit", 5),
                 ["status", "--state", link]):
        refused(cli(*args), ExitCode.BAD_INPUT, f"state file {link} is a symbolic link")
        assert (snapshot(target) if target.exists() else None) == before
        assert sorted(os.listdir(target.parent)) == listing
        assert link.is_symlink()
    assert not os.path.exists(str(link) + ".locks")


@pytest.mark.parametrize("which", ["-wal", "-shm"])
def test_a_symlink_beside_the_state_is_refused(emu, cli, tmp_path, tickets_csv, which):
    state = tmp_path / "state.sqlite"
    victim = tmp_path / "victim.txt"
    victim.write_text("not batchrun's\n")
    os.chmod(victim, 0o644)
    (tmp_path / f"state.sqlite{which}").symlink_to(victim)
    before = snapshot(victim)
    refused(cli(*run_args(tickets_csv, tmp_path / "out.parquet", "--state", state, "--limit", 5)),
            ExitCode.BAD_INPUT, f"state.sqlite{which} is a symbolic link")
    assert snapshot(victim) == before


def test_the_locks_directory_and_its_files_are_never_followed(emu, cli, tmp_path, tickets_csv):
    out, state = tmp_path / "out.parquet", tmp_path / "state.sqlite"
    assert cli(*run_args(tickets_csv, out, "--state", state, "--limit", 5)).exit_code == 0
    locks = tmp_path / "state.sqlite.locks"
    (lock,) = list(locks.iterdir())
    # a link in place of a job's lock file: not followed (its target is not created)
    lock.unlink()
    lock.symlink_to(tmp_path / "created-through-a-link")
    refused(cli(*run_args(tickets_csv, out, "--state", state, "--limit", 5)), ExitCode.BAD_INPUT,
            "is a symbolic link")
    assert not (tmp_path / "created-through-a-link").exists()
    # a link in place of the locks directory: no lock file is made in the directory it points to
    shutil.rmtree(locks)
    other = tmp_path / "other-dir"
    other.mkdir()
    locks.symlink_to(other)
    refused(cli(*run_args(tickets_csv, out, "--state", state, "--limit", 5)), ExitCode.BAD_INPUT,
            "state.sqlite.locks", "symbolic link")
    assert os.listdir(other) == []


@pytest.mark.parametrize("partitioned", [False, True])
def test_an_output_that_is_a_symlink_is_replaced_never_written_through(emu, cli, tmp_path, tickets_csv, partitioned):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if partitioned:
        target = elsewhere / "dataset"
        (target / "priority=1").mkdir(parents=True)
        (target / "priority=1" / "part-0.parquet").write_bytes(b"their data")
        probe = target / "priority=1" / "part-0.parquet"
    else:
        target = probe = elsewhere / "theirs.parquet"
        target.write_bytes(b"their data")
    os.chmod(probe, 0o644)
    before = snapshot(probe)
    out = tmp_path / "out"
    out.symlink_to(target)
    extra = ("--partition-by", "priority") if partitioned else ()
    r = cli(*run_args(tickets_csv, out, "--state", tmp_path / "s.sqlite", "--limit", 20, *extra))
    assert r.exit_code == 0, r.output
    assert snapshot(probe) == before                      # the file the link pointed to is as it was
    assert not out.is_symlink()
    assert pq.read_table(out).num_rows == 20


# ---- 13. the key never goes through a proxy in clear -------------------------------------------------------

class RecordingProxy:
    """A proxy on loopback that records what it is sent and answers 407 to everything."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.received: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    pass
                self.received.append(data)
                try:
                    conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
                except OSError:
                    pass

    def close(self):
        self.sock.close()


@pytest.fixture
def proxy(monkeypatch):
    p = RecordingProxy()
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "http_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    yield p
    p.close()


@pytest.mark.parametrize("mode", ["batch", "messages"])
def test_plain_http_with_the_key_never_goes_through_a_proxy(emu, cli, tmp_path, tickets_csv, proxy, monkeypatch,
                                                            mode):
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("ALL_PROXY", proxy.url)
    r = cli(*run_args(tickets_csv, tmp_path / "out.parquet", "--state", tmp_path / "s.sqlite", "--limit", 30,
                      "--mode", mode))
    assert r.exit_code == 0, r.output
    assert proxy.received == []
    assert pq.read_table(tmp_path / "out.parquet").column("status").to_pylist() == ["succeeded"] * 30


def test_a_results_download_from_another_host_never_goes_through_a_proxy(emu, cli, tmp_path, tickets_csv, proxy,
                                                                         monkeypatch):
    """The API's results_url may name another host than the base URL (here `localhost` for 127.0.0.1,
    which NO_PROXY does not cover): the download carries the key too."""
    port = emu.base_url.rsplit(":", 1)[1]
    emu.config.results_host = f"localhost:{port}"
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    r = cli(*run_args(tickets_csv, tmp_path / "out.parquet", "--state", tmp_path / "s.sqlite", "--limit", 30))
    assert r.exit_code == 0, r.output
    assert emu.stats.results_downloads >= 1
    assert proxy.received == []


def test_a_socks_proxy_setting_does_not_stop_a_loopback_run(emu, cli, tmp_path, tickets_csv, proxy, monkeypatch):
    """ALL_PROXY=socks5://… (httpx needs socksio for it) is not needed for plain http to loopback."""
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:9")
    for mode in ("batch", "messages"):
        r = cli(*run_args(tickets_csv, tmp_path / f"{mode}.parquet", "--state", tmp_path / "s.sqlite", "--limit", 10,
                          "--mode", mode))
        assert r.exit_code == 0, r.output


def _closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("no_proxy", [False, True])
def test_https_keeps_the_proxy_settings_of_the_environment(proxy, monkeypatch, no_proxy):
    """https goes through HTTPS_PROXY, in a CONNECT tunnel (the key never reaches the proxy), unless
    NO_PROXY names the host: for the batch client and for the messages-mode async client."""
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    if no_proxy:
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    url = f"https://127.0.0.1:{_closed_port()}"
    api = ApiClient(api_key=KEY, base_url=url, retry=RetryPolicy(max_retries=0, max_elapsed=1))
    with pytest.raises(ApiError):
        api.retrieve_batch("msgbatch_1")
    api.close()

    async def post():
        async with http_client(httpx.AsyncClient, base_url=url, headers={"x-api-key": KEY}) as http:
            with pytest.raises(httpx.TransportError):
                await http.post("/v1/messages", content=b"{}")

    import asyncio
    asyncio.run(post())
    if no_proxy:
        assert proxy.received == []
    else:
        assert len(proxy.received) == 2
        for seen in proxy.received:
            assert seen.startswith(b"CONNECT 127.0.0.1:"), seen
            assert KEY.encode() not in seen


# ---- 16. the cost of rows the API does not bill ------------------------------------------------------------

def test_failed_rows_cost_zero_and_output_status_report_agree(emu, cli, tmp_path, tickets_csv):
    emu.config.errored_rate = 0.2
    emu.config.errored_types = ("invalid_request_error",)    # final at once
    emu.config.expired_rate = 0.2
    out, state = tmp_path / "out.parquet", tmp_path / "s.sqlite"
    r = cli(*run_args(tickets_csv, out, "--state", state, "--max-attempts", 1))
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    rows = pq.read_table(out).to_pylist()
    by = {s: [x for x in rows if x["status"] == s] for s in ("succeeded", "errored", "expired")}
    assert all(by.values()), {s: len(v) for s, v in by.items()}
    assert all(x["cost_usd"] == 0.0 for s in ("errored", "expired") for x in by[s])
    assert all(x["cost_usd"] > 0 for x in by["succeeded"])
    total = sum(x["cost_usd"] for x in rows)
    st = json.loads(cli("status", "--state", state, "--json").output)[0]
    assert st["cost_usd"] == pytest.approx(total, rel=1e-9)
    from batchrun.report import build_report_data
    from batchrun.store import Store
    with Store(str(state)) as s:
        data = build_report_data(s, s.find_jobs()[0])
    assert data["cost_usd"] == pytest.approx(total, rel=1e-9)


def test_canceled_rows_cost_zero(emu, cli, tmp_path, tickets_csv):
    emu.config.processing_seconds = 30
    out, state = tmp_path / "out.parquet", tmp_path / "s.sqlite"
    args = run_args(tickets_csv, out, "--state", state, "--limit", 40)
    assert cli(*args, "--no-wait").exit_code == ExitCode.IN_PROGRESS
    r = cli("cancel", *args[1:])
    assert r.exit_code == 0, r.output
    r = cli(*args)
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    rows = pq.read_table(out).to_pylist()
    assert {x["status"] for x in rows} == {"canceled"}
    assert [x["cost_usd"] for x in rows] == [0.0] * 40


def test_an_unpriced_model_keeps_null_for_what_it_answered_and_zero_for_what_failed(emu, cli, tmp_path,
                                                                                      tickets_csv):
    emu.config.extra_models = ("acme-unpriced-1",)
    emu.config.errored_rate = 0.3
    emu.config.errored_types = ("invalid_request_error",)
    out, state = tmp_path / "out.parquet", tmp_path / "s.sqlite"
    r = cli(*run_args(tickets_csv, out, "--state", state, "--limit", 40, "--model", "acme-unpriced-1",
                      "--allow-unknown-model"))
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    rows = pq.read_table(out).to_pylist()
    assert {x["cost_usd"] for x in rows if x["status"] == "succeeded"} == {None}    # price unknown
    assert {x["cost_usd"] for x in rows if x["status"] == "errored"} == {0.0}       # not billed
    assert json.loads(cli("status", "--state", state, "--json").output)[0]["cost_usd"] is None


def test_messages_mode_rows_refused_by_the_api_cost_zero(emu, cli, tmp_path, tickets_csv):
    emu.config.refuse_text = "ticket 3:"
    out = tmp_path / "out.parquet"
    r = cli(*run_args(tickets_csv, out, "--state", tmp_path / "s.sqlite", "--limit", 20, "--mode", "messages"))
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    rows = pq.read_table(out).to_pylist()
    failed = [x for x in rows if x["status"] == "errored"]
    assert len(failed) == 1 and failed[0]["cost_usd"] == 0.0
    assert all(x["cost_usd"] > 0 for x in rows if x["status"] == "succeeded")


# ---- 19. a state file from a newer batchrun ----------------------------------------------------------------

def test_a_state_file_of_a_newer_batchrun_is_refused_naming_the_versions(emu, cli, tmp_path, tickets_csv):
    out, state = tmp_path / "out.parquet", tmp_path / "state.sqlite"
    args = run_args(tickets_csv, out, "--state", state, "--limit", 10)
    assert cli(*args).exit_code == 0
    with sqlite3.connect(state) as c:
        c.execute("INSERT INTO _batchrun_migrations VALUES ('m099_from_the_future', '2027-01-01T00:00:00Z')")
        c.execute("CREATE TABLE IF NOT EXISTS _batchrun_meta (key TEXT PRIMARY KEY, value TEXT)")
        c.execute("INSERT OR REPLACE INTO _batchrun_meta VALUES ('batchrun_version', '9.1.0')")
    _checkpoint(state)
    before = snapshot(state)
    from batchrun import __version__
    for cmd in (args, ["status", "--state", state]):
        refused(cli(*cmd), ExitCode.BAD_INPUT, f"state file {state} was written by a newer batchrun (9.1.0)",
                "m099_from_the_future", f"batchrun {__version__} does not know", MIGRATIONS[-1].__name__)
        assert snapshot(state) == before
    assert emu.stats.batches_created == 1
