"""#14 items 1, 2, 3, 7 tried as a hostile user would: other spellings of an endpoint, messages mode,
in-flight twins, edits that keep the file's size and mtime, other input formats, the library's steps,
and the API's thinking rules for a model the catalog does not know. Each against the emulator over
loopback."""
from __future__ import annotations

import json
import os
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import batchrun
from batchrun.errors import ExitCode, InputError

from tests.conftest import refused
from tests.test_identity import LEGACY_LOOPBACK, MODEL, _args, _jobs, _rows, _write


def _job(csv, tmp_path, **kw):
    return {"input": str(csv), "output": str(tmp_path / "out.parquet"), "id_column": "id",
            "prompt": "Say: {{ body }}", "model": MODEL, "max_tokens": 50, "poll_interval": 0.05,
            "state": str(tmp_path / "state.sqlite"), **kw}


# ---- 1. whose endpoint ------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["{u}/", "{U}/"])
def test_one_endpoint_spelled_otherwise_is_the_same_endpoint(cli, emu, tmp_path, small_csv, monkeypatch, spelling):
    """A trailing slash or upper-case scheme and host name the same server: nothing is sent again."""
    assert cli(*_args(small_csv, tmp_path)).exit_code == 0
    monkeypatch.setenv("ANTHROPIC_BASE_URL", spelling.format(u=emu.base_url, U=emu.base_url.upper()))
    r = cli(*_args(small_csv, tmp_path, out="again.parquet"))
    assert r.exit_code == 0, r.output
    assert emu.stats.requests_created == 12 and len(_jobs(tmp_path / "state.sqlite")) == 1


def test_another_loopback_server_in_messages_mode(cli, emu, second_emulator, tmp_path, small_csv, monkeypatch):
    r = cli(*_args(small_csv, tmp_path, "--mode", "messages"))
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("ANTHROPIC_BASE_URL", second_emulator.base_url)
    r = cli(*_args(small_csv, tmp_path, "--mode", "messages", out="other.parquet"))
    assert r.exit_code == 0, r.output
    assert second_emulator.stats.messages_calls == 12
    assert all(row["cost_usd"] > 0 for row in _rows(tmp_path / "other.parquet"))   # paid there, not reused


def test_a_twin_in_flight_on_another_endpoint_lends_nothing(emu, second_emulator, tmp_path, small_csv):
    """Job A's batch still running on one server; job B (its first 6 rows) on another server with the same
    state file sends its own requests there rather than waiting for A's answers."""
    emu.config.processing_seconds = 1.0
    first = batchrun.run(_job(small_csv, tmp_path), wait=False, api_key="k", base_url=emu.base_url)
    assert first.exit_code == ExitCode.IN_PROGRESS
    other = batchrun.run(_job(small_csv, tmp_path, output=str(tmp_path / "b.parquet"), limit=6), api_key="k",
                         base_url=second_emulator.base_url)
    assert other.exit_code == 0 and second_emulator.stats.requests_created == 6
    assert {r["batch_id"] for r in _rows(tmp_path / "b.parquet")} <= set(second_emulator.stats.accepted)


def test_the_built_in_emulator_in_messages_mode_and_estimate(cli, tmp_path, small_csv, monkeypatch):
    """`estimate --emulator`, then `run --emulator` twice (messages mode): one job, planned once."""
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    args = _args(small_csv, tmp_path, "--emulator", "--mode", "messages")
    r = cli("estimate", *args[1:])
    assert r.exit_code == 0, r.output
    for _ in range(2):
        r = cli(*args)
        assert r.exit_code == 0, r.output
    assert [e for _, e in _jobs(tmp_path / "state.sqlite")] == ["builtin:emulator"]


@pytest.mark.parametrize("how", ["env", "flag"])
@pytest.mark.parametrize("url", ["http://127.0.0.1:99999", "http://127.0.0.1:x1", "http://127.0.0.1:0"])
def test_a_base_url_with_a_bad_port_is_refused(cli, emu, tmp_path, small_csv, monkeypatch, how, url):
    """Not an internal error: one line naming the URL; nothing sent."""
    if how == "env":
        monkeypatch.setenv("ANTHROPIC_BASE_URL", url)
        r = cli(*_args(small_csv, tmp_path))
    else:
        r = cli(*_args(small_csv, tmp_path, "--base-url", url))
    refused(r, ExitCode.BAD_INPUT, url, "port")
    assert emu.stats.create_calls == 0


def test_a_handle_of_a_job_planned_under_the_old_loopback_key(emu, tmp_path, small_csv, monkeypatch):
    """Job.from_handle settles which job it is as `run` does (the server that knows its batches continues
    it), instead of calling it an input changed since it was planned."""
    import batchrun.runner as runner_mod
    emu.config.processing_seconds = 0.5
    with monkeypatch.context() as old:   # the old version: every loopback URL is "http://loopback"
        old.setattr(runner_mod, "endpoint_key", lambda base: LEGACY_LOOPBACK)
        with batchrun.Job(_job(small_csv, tmp_path), api_key="k", base_url=emu.base_url) as job:
            job.submit()
            handle = job.handle
    with batchrun.Job.from_handle(handle, api_key="k", base_url=emu.base_url) as job:
        assert job.id == handle["job_id"]
        while not job.poll():
            time.sleep(0.05)
        assert job.collect().exit_code == 0
    assert emu.stats.requests_created == 12                              # nothing sent twice
    assert all(r["text"].startswith("Reply to: Say: row") for r in _rows(tmp_path / "out.parquet"))


# ---- 2. the API version -----------------------------------------------------------------------------
def test_answers_are_not_reused_across_api_versions_in_messages_mode(cli, emu, tmp_path, small_csv):
    assert cli(*_args(small_csv, tmp_path, "--mode", "messages")).exit_code == 0
    r = cli(*_args(small_csv, tmp_path, "--mode", "messages", "--api-version", "2026-10-21", out="new.parquet"))
    assert r.exit_code == 0, r.output
    assert emu.stats.messages_calls == 24
    assert all(row["cost_usd"] > 0 for row in _rows(tmp_path / "new.parquet"))


# ---- 3. an input edited while its job runs ----------------------------------------------------------
def _edit_while_running(emu, edit):
    """Run `edit` once the job's first request is out (a batch in progress, or a message answered)."""
    def go():
        deadline = time.monotonic() + 30
        while not (emu.stats.batches_created or emu.stats.messages_calls) and time.monotonic() < deadline:
            time.sleep(0.01)
        edit()
    thread = threading.Thread(target=go)
    thread.start()
    return thread


def _same_size_same_mtime(path):
    """One cell changed (row 3's text becomes row 4's), the size kept and the mtime put back (touch -r)."""
    st = os.stat(path)
    text = path.read_text()
    changed = text.replace("row 3 of", "row 4 of", 1)
    assert changed != text and len(changed) == len(text)
    path.write_text(changed)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("extra", [(), ("--mode", "messages", "--concurrency", "1"), ("--limit", "5"),
                                   ("--shard", "1/2"), ("--partition-by", "id")])
def test_an_edit_that_keeps_size_and_mtime_is_seen(cli, emu, tmp_path, small_csv, extra):
    emu.config.processing_seconds, emu.config.latency = 0.5, 0.05
    thread = _edit_while_running(emu, lambda: _same_size_same_mtime(small_csv))
    r = cli(*_args(small_csv, tmp_path, *extra))
    thread.join()
    refused(r, ExitCode.BAD_INPUT, str(small_csv), "changed while the job ran")
    assert not (tmp_path / "out.parquet").exists()


def test_an_input_rewritten_byte_for_byte_is_not_a_change(cli, emu, tmp_path, small_csv):
    emu.config.processing_seconds = 0.5
    thread = _edit_while_running(emu, lambda: small_csv.write_bytes(small_csv.read_bytes()))
    r = cli(*_args(small_csv, tmp_path))
    thread.join()
    assert r.exit_code == 0, r.output
    assert [o["id"] for o in _rows(tmp_path / "out.parquet")] == [f"r{i}" for i in range(12)]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_a_parquet_or_jsonl_input_reversed_while_it_runs(cli, emu, tmp_path, fmt):
    rows = [{"id": f"r{i}", "body": f"row {i}"} for i in range(12)]
    path = tmp_path / f"in.{fmt}"

    def write(rs):
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(rs), path)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rs))
    write(rows)
    emu.config.processing_seconds = 0.5
    thread = _edit_while_running(emu, lambda: write(rows[::-1]))
    r = cli(*_args(path, tmp_path))
    thread.join()
    refused(r, ExitCode.BAD_INPUT, "changed while the job ran")
    assert not (tmp_path / "out.parquet").exists()


def test_an_input_reversed_between_the_librarys_steps(emu, tmp_path, small_csv):
    """submit, the input reversed, collect (the same Job object, or one from its handle): never joined."""
    with batchrun.Job(_job(small_csv, tmp_path), api_key="k", base_url=emu.base_url) as job:
        job.submit()
        handle = job.handle
        _write(small_csv, [(f"r{i}", f"row {i} of the table") for i in reversed(range(12))])
        while not job.poll():
            time.sleep(0.05)
        with pytest.raises(InputError, match="changed while the job ran"):
            job.collect()
    with pytest.raises(InputError, match="has changed since it was planned"):
        batchrun.Job.from_handle(handle, api_key="k", base_url=emu.base_url)
    assert not (tmp_path / "out.parquet").exists()


# ---- 7. what the API refuses is refused before sending ----------------------------------------------
@pytest.mark.parametrize("mode", ["batch", "messages"])
@pytest.mark.parametrize("model", ["claude-opus-5-5", "claude-sonnet-5-20261015"])
def test_a_prefill_on_a_model_that_thinks_by_default_in_either_mode(cli, emu, tmp_path, small_csv, mode, model):
    r = cli(*_args(small_csv, tmp_path, "--model", model, "--mode", mode, "--max-tokens", "2000",
                   "--prefill", "The answer:"))
    refused(r, ExitCode.BAD_INPUT, "prefill", "thinks by default")
    assert emu.stats.create_calls == 0 and emu.stats.messages_calls == 0


@pytest.mark.parametrize("key, value", [("temperature", True), ("temperature", "0.5"), ("temperature", -0.0001),
                                        ("top_p", 2), ("top_p", float("nan")), ("top_k", 0), ("top_k", True)])
def test_sampling_values_from_a_job_mapping_are_refused(emu, tmp_path, small_csv, key, value):
    with pytest.raises(batchrun.BatchrunError, match=key):
        batchrun.run(_job(small_csv, tmp_path, model="claude-sonnet-4-5", **{key: value}))
    assert emu.stats.create_calls == 0


@pytest.mark.parametrize("mode", ["batch", "messages"])
@pytest.mark.parametrize("extra, needle", [
    (("--thinking", "2000", "--max-tokens", "3000", "--temperature", "0.5"), "temperature 0.5"),
    (("--thinking", "2000", "--max-tokens", "3000", "--top-k", "3"), "top_k"),
    (("--thinking", "2000", "--max-tokens", "3000", "--top-p", "0.5"), "top_p 0.5"),
    (("--thinking", "2000", "--max-tokens", "1500"), "less than max_tokens 1500"),
    (("--thinking", "500", "--max-tokens", "1500"), "at least 1024"),
    (("--thinking", "adaptive", "--prefill", "Answer:"), "prefill"),
])
def test_the_apis_thinking_rules_hold_for_a_model_the_catalog_lacks(cli, emu, tmp_path, small_csv, mode, extra,
                                                                     needle):
    """--allow-unknown-model runs a model whose own rules are not known, but thinking's rules are the API's
    for every model: a request that breaks them would only come back errored, every row of it."""
    emu.config.extra_models = ("claude-nonexistent-9",)
    r = cli(*_args(small_csv, tmp_path, "--model", "claude-nonexistent-9", "--allow-unknown-model",
                   "--mode", mode, *extra))
    refused(r, ExitCode.BAD_INPUT, needle, "claude-nonexistent-9")
    assert emu.stats.create_calls == 0 and emu.stats.messages_calls == 0


def test_thinking_within_its_rules_on_a_model_the_catalog_lacks_is_sent(cli, emu, tmp_path, small_csv):
    emu.config.extra_models = ("claude-nonexistent-9",)
    r = cli(*_args(small_csv, tmp_path, "--model", "claude-nonexistent-9", "--allow-unknown-model",
                   "--thinking", "2000", "--max-tokens", "3000", "--top-p", "0.97", "--labels", "a,b"))
    assert r.exit_code == 0, r.output
    assert emu.stats.requests_created == 12


def test_an_edit_to_another_model_of_the_models_file_pays_nothing_again(cli, emu, tmp_path, small_csv):
    """The models file is part of the job's identity, whole: another job, but its requests are the same,
    so they are answered from the first job's replies."""
    models = tmp_path / "models.toml"
    models.write_text("[models.claude-haiku-4-5]\ncache_min_tokens = 2048\n")
    assert cli(*_args(small_csv, tmp_path, "--models-file", models)).exit_code == 0
    models.write_text(models.read_text() + '[models.my-gateway-name]\nlike = "claude-sonnet-4-5"\n')
    r = cli(*_args(small_csv, tmp_path, "--models-file", models, out="again.parquet"))
    assert r.exit_code == 0, r.output
    assert len(_jobs(tmp_path / "state.sqlite")) == 2 and emu.stats.requests_created == 12


@pytest.fixture
def answers_any_batch_id():
    """A server on loopback that answers a retrieve of any batch id with one batch of its own (a catch-all
    mock, a misrouting proxy): a 200 that proves nothing about the batch asked for."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"id": "msgbatch_someone_elses", "type": "message_batch", "processing_status": "ended",
                               "request_counts": {}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_old_loopback_job_is_not_claimed_by_a_reply_about_another_batch(emu, tmp_path, small_csv, monkeypatch,
                                                                            answers_any_batch_id):
    import batchrun.runner as runner_mod
    from batchrun.runner import Runner
    emu.config.processing_seconds = 0.5
    with monkeypatch.context() as old:   # the old version: every loopback URL is "http://loopback"
        old.setattr(runner_mod, "endpoint_key", lambda base: LEGACY_LOOPBACK)
        first = batchrun.run(_job(small_csv, tmp_path), wait=False, api_key="k", base_url=emu.base_url)
    with pytest.raises(InputError, match="was sent to a loopback address"):
        Runner.for_stored_job(str(tmp_path / "state.sqlite"), first.job_id, api_key="k",
                              base_url=answers_any_batch_id, retry=batchrun.RetryPolicy(max_retries=0))
    assert _jobs(tmp_path / "state.sqlite") == [(first.job_id, LEGACY_LOOPBACK)]   # not moved there


def test_a_handle_picked_up_through_another_endpoint_says_so(emu, second_emulator, tmp_path, small_csv):
    """Not 'its input has changed' (it has not): the job was sent elsewhere, and the line names where."""
    emu.config.processing_seconds = 0.5
    with batchrun.Job(_job(small_csv, tmp_path), api_key="k", base_url=emu.base_url) as job:
        job.submit()
        handle = job.handle
    with pytest.raises(InputError) as refusal:
        batchrun.Job.from_handle(handle, api_key="k", base_url=second_emulator.base_url)
    assert f"was sent to {emu.base_url}, not to {second_emulator.base_url}" in str(refusal.value)
    assert "changed" not in str(refusal.value)
    assert second_emulator.stats.create_calls == 0
    with batchrun.Job.from_handle(handle, api_key="k", base_url=emu.base_url) as job:   # its own endpoint
        while not job.poll():
            time.sleep(0.05)
        assert job.collect().exit_code == 0


def test_cancel_by_id_of_a_job_of_the_built_in_emulator(cli, tmp_path, small_csv, monkeypatch):
    """Its batches were the emulator's: the refusal says which command moves it on, not to set a base URL."""
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-0123456789")
    r = cli(*_args(small_csv, tmp_path, "--emulator", "--no-wait"))
    assert r.exit_code == ExitCode.IN_PROGRESS, r.output
    (job_id, _), = _jobs(tmp_path / "state.sqlite")
    r = cli("cancel", job_id[:12], "--state", tmp_path / "state.sqlite")
    refused(r, ExitCode.BAD_INPUT, "was sent to the built-in emulator", "batchrun run --emulator")
