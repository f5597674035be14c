"""Whose answer it is: an answer belongs to its request, its endpoint (port included) and its API
version, and is joined only to the input that was planned; requests the API would refuse are refused
before anything is sent."""
from __future__ import annotations

import re
import sqlite3
import threading
import time
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import batchrun
LEGACY_LOOPBACK = "http://loopback"   # how every loopback URL was keyed before ports counted
from batchrun.errors import ExitCode
from batchrun.models import load_catalog

from tests.conftest import refused
from tests.test_bodies import store_bodies_as_before

MODEL = "claude-haiku-4-5"


def _write(path, rows):
    path.write_text("id,body\n" + "".join(f"{i},{body}\n" for i, body in rows), encoding="utf-8")


def _args(csv, tmp_path, *extra, out="out.parquet", state="state.sqlite"):
    return ("run", "--input", csv, "--output", tmp_path / out, "--state", tmp_path / state, "--id-column", "id",
            "--prompt", "Say: {{ body }}", "--model", MODEL, "--max-tokens", "50", "--poll-interval", "0.05",
            *extra)


def _rows(path):
    return pq.read_table(path).to_pylist()


def _jobs(state):
    with sqlite3.connect(state) as db:
        return db.execute("SELECT id, endpoint FROM jobs ORDER BY created_at").fetchall()


# ---- 1. an endpoint is its scheme, host, port and path: loopback too -------------------------------
def test_another_server_on_loopback_is_another_endpoint(cli, emu, second_emulator, tmp_path, small_csv,
                                                        monkeypatch):
    """The same job against a second server on 127.0.0.1 (another port) with the same state file is sent
    there, and its rows are that server's answers — never the first one's replies reused."""
    r = cli(*_args(small_csv, tmp_path))
    assert r.exit_code == 0, r.output
    assert emu.stats.requests_created == 12

    monkeypatch.setenv("ANTHROPIC_BASE_URL", second_emulator.base_url)
    r = cli(*_args(small_csv, tmp_path, out="other.parquet"))
    assert r.exit_code == 0, r.output
    assert second_emulator.stats.requests_created == 12            # sent to the second server
    assert max(second_emulator.stats.submitted_custom_ids.values()) == 1
    rows = _rows(tmp_path / "other.parquet")
    assert len(rows) == 12 and all(r["cost_usd"] > 0 for r in rows)  # paid there, not reused at cost 0
    assert {r["batch_id"] for r in rows} <= set(second_emulator.stats.accepted)
    assert sorted(e for _, e in _jobs(tmp_path / "state.sqlite")) == sorted([emu.base_url, second_emulator.base_url])

    # and each server again: nothing sent anywhere
    for server in (emu, second_emulator):
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
        assert cli(*_args(small_csv, tmp_path, out="again.parquet")).exit_code == 0
    assert emu.stats.requests_created == 12 and second_emulator.stats.requests_created == 12


def test_the_built_in_emulator_is_an_endpoint_of_its_own(cli, second_emulator, tmp_path, small_csv, monkeypatch,
                                                        quick_builtin_emulator):
    """`run --emulator` (a new port each time) again sends nothing; the same job against a server on
    loopback with the same state file is sent there, never answered with the emulator's fake replies."""
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    state = tmp_path / "state.sqlite"
    r = cli(*_args(small_csv, tmp_path, "--emulator"))
    assert r.exit_code == 0, r.output
    with sqlite3.connect(state) as db:
        batches = db.execute("SELECT count(*) FROM batches").fetchone()[0]
    assert batches == 1 and [e for _, e in _jobs(state)] == ["builtin:emulator"]

    r = cli(*_args(small_csv, tmp_path, "--emulator"))                # another emulator, another port
    assert r.exit_code == 0, r.output
    with sqlite3.connect(state) as db:
        assert db.execute("SELECT count(*) FROM batches").fetchone()[0] == batches   # nothing sent again
    assert len(_jobs(state)) == 1

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-0123456789")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", second_emulator.base_url)
    r = cli(*_args(small_csv, tmp_path, out="real.parquet"))
    assert r.exit_code == 0, r.output
    assert second_emulator.stats.requests_created == 12
    assert all(r["cost_usd"] > 0 for r in _rows(tmp_path / "real.parquet"))


def test_a_job_planned_when_loopback_ports_did_not_count(emu, second_emulator, tmp_path, small_csv, monkeypatch):
    """A job left in flight on a local server by a version that keyed every loopback URL as one endpoint:
    that server (it knows the job's batches) continues it and nothing is sent again; another server on
    loopback (it does not) gets a new job of its own."""
    import batchrun.runner as runner_mod
    job = {"input": str(small_csv), "output": str(tmp_path / "a.parquet"), "id_column": "id",
           "prompt": "Say: {{ body }}", "model": MODEL, "max_tokens": 50, "poll_interval": 0.05,
           "state": str(tmp_path / "state.sqlite")}
    emu.config.processing_seconds = 0.5
    with monkeypatch.context() as old:   # the old version: every loopback URL is "http://loopback"
        old.setattr(runner_mod, "endpoint_key", lambda base: LEGACY_LOOPBACK)
        first = batchrun.run(job, wait=False, api_key="k", base_url=emu.base_url)
    assert first.exit_code == ExitCode.IN_PROGRESS and emu.stats.requests_created == 12

    other = batchrun.run({**job, "output": str(tmp_path / "b.parquet")}, api_key="k",
                         base_url=second_emulator.base_url)
    assert other.job_id != first.job_id and other.exit_code == 0
    assert second_emulator.stats.requests_created == 12             # its own job, sent there

    # by its id (cancel, a twin's collect): only the server that knows its batches may move it
    from batchrun.errors import InputError
    from batchrun.runner import Runner
    with pytest.raises(InputError, match="was sent to a loopback address"):
        Runner.for_stored_job(job["state"], first.job_id, api_key="k", base_url=second_emulator.base_url)

    again = batchrun.run(job, api_key="k", base_url=emu.base_url)
    assert again.job_id == first.job_id and again.exit_code == 0
    assert emu.stats.requests_created == 12                           # continued: nothing sent twice
    assert dict(_jobs(job["state"]))[first.job_id] == emu.base_url    # its endpoint now recorded in full
    assert all(r["text"].startswith("Reply to: Say: row") for r in _rows(tmp_path / "a.parquet"))


# ---- 2. the API version is part of a request's identity ---------------------------------------------
def test_answers_are_not_reused_across_api_versions(cli, emu, tmp_path, small_csv):
    r = cli(*_args(small_csv, tmp_path))
    assert r.exit_code == 0, r.output
    assert emu.stats.api_versions.get("2026-10-21", 0) == 0

    r = cli(*_args(small_csv, tmp_path, "--api-version", "2026-10-21", out="new.parquet"))
    assert r.exit_code == 0, r.output
    assert emu.stats.requests_created == 24 and emu.stats.batches_created == 2   # sent under the new version
    assert all(row["cost_usd"] > 0 for row in _rows(tmp_path / "new.parquet"))

    # under the new version again, and a smaller job sharing its requests: answered, nothing sent
    assert cli(*_args(small_csv, tmp_path, "--api-version", "2026-10-21", out="new.parquet")).exit_code == 0
    r = cli(*_args(small_csv, tmp_path, "--api-version", "2026-10-21", "--limit", "5", out="five.parquet"))
    assert r.exit_code == 0, r.output
    assert emu.stats.requests_created == 24


def test_a_state_file_from_before_versions_counted_keeps_sharing_answers(emu, tmp_path, small_csv):
    """Requests planned under 2026-10-21 before the version was hashed in are hashed again on upgrade
    (migration m005): a later job of that version sharing them is answered, not sent again."""
    from batchrun.requests import params_hash
    from batchrun.store import Store
    state = str(tmp_path / "state.sqlite")
    job = {"input": str(small_csv), "output": str(tmp_path / "a.parquet"), "id_column": "id",
           "prompt": "Say: {{ body }}", "model": MODEL, "max_tokens": 50, "poll_interval": 0.05, "state": state,
           "api_version": "2026-10-21"}
    assert batchrun.run(job, api_key="k", base_url=emu.base_url).exit_code == 0
    store_bodies_as_before(state)   # (the old version stored every body)
    with Store(state) as store:   # as the old version stored it: the version not hashed in
        (endpoint, shared), = store.conn.execute("SELECT endpoint, shared_params FROM jobs").fetchall()
        store.conn.create_function("old_hash", 1, lambda body: params_hash(body, params_hash(shared + endpoint)))
        store.conn.execute("UPDATE requests SET params_hash = old_hash((SELECT body FROM bodies "
                           "WHERE bodies.id = requests.body_id))")
        store.conn.execute("DELETE FROM _batchrun_migrations WHERE name = 'm005_answer_scope'")
    smaller = batchrun.run({**job, "limit": 5, "output": str(tmp_path / "b.parquet")}, api_key="k",
                           base_url=emu.base_url)
    assert smaller.exit_code == 0 and emu.stats.requests_created == 12   # answered from the first job


# ---- 3. the input is checked again before the output is written -------------------------------------
@pytest.mark.parametrize("edit", ["reversed", "one cell"])
def test_an_input_edited_while_its_batches_run_is_not_joined(cli, emu, tmp_path, small_csv, edit):
    rows = [(f"r{i}", f"row {i} of the table") for i in range(12)]
    changed = rows[::-1] if edit == "reversed" else [*rows[:4], ("r4", "a new text for row 4"), *rows[5:]]
    emu.config.processing_seconds = 0.5

    def rewrite():   # once the batch is in progress
        deadline = time.monotonic() + 30
        while not emu.stats.batches_created and time.monotonic() < deadline:
            time.sleep(0.01)
        _write(small_csv, changed)

    thread = threading.Thread(target=rewrite)
    thread.start()
    r = cli(*_args(small_csv, tmp_path))
    thread.join()
    line = refused(r, ExitCode.BAD_INPUT, str(small_csv), "changed while the job ran", "nothing written",
                   "new job")
    assert "Traceback" not in r.output and line
    assert not (tmp_path / "out.parquet").exists()
    assert emu.stats.requests_created == 12

    # run again: the changed input is a new job; unchanged requests reuse the replies already paid for
    emu.config.processing_seconds = 0.05
    r = cli(*_args(small_csv, tmp_path))
    assert r.exit_code == 0, r.output
    out = _rows(tmp_path / "out.parquet")
    assert [(o["id"], o["body"]) for o in out] == changed
    assert all(o["text"].startswith(f"Reply to: Say: {o['body']} #") for o in out)   # every row its own reply
    assert emu.stats.requests_created == (12 if edit == "reversed" else 13)


def test_an_input_edited_while_it_is_planned_is_not_planned(emu, tmp_path, small_csv):
    """The rows planned must be the input the job is named after: an edit between the two is refused."""
    import os
    import subprocess
    import sys
    gate = tmp_path / "gate"
    env = {**os.environ, "BATCHRUN_PAUSE": f"plan={gate}", "ANTHROPIC_API_KEY": "sk-ant-test-0123456789",
           "ANTHROPIC_BASE_URL": emu.base_url}
    p = subprocess.Popen([sys.executable, "-c", "from batchrun.cli import main; main()",
                          *map(str, _args(small_csv, tmp_path))], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "gate.paused").exists() and time.monotonic() < deadline:   # the rows are read
        time.sleep(0.01)
    _write(small_csv, [("r0", "another table")])
    gate.touch()
    _, err = p.communicate(timeout=60)
    assert p.returncode == ExitCode.BAD_INPUT, err
    assert "changed while it was being read" in err and "Traceback" not in err
    assert emu.stats.create_calls == 0 and not _jobs(tmp_path / "state.sqlite")


# ---- 7. requests the API would refuse are refused before anything is sent ----------------------------
@pytest.mark.parametrize("model, extra", [
    ("claude-nonexistent-9", ("--allow-unknown-model",)),       # a model the catalog does not know
    ("claude-haiku-4-5-20261015", ()),                          # a dated id the catalog lacks (a known family)
    ("claude-new-family-1-20261015", ("--allow-unknown-model",)),   # a dated id of no family it knows
])
def test_the_versions_rules_hold_for_every_model(cli, emu, tmp_path, small_csv, model, extra):
    r = cli(*_args(small_csv, tmp_path, "--model", model, "--api-version", "2026-10-21", "--temperature", "0.5",
                   *extra))
    refused(r, ExitCode.BAD_INPUT, "temperature", "2026-10-21")
    assert emu.stats.create_calls == 0


def test_a_dated_id_of_a_known_family_takes_its_entry(cli, emu, tmp_path, small_csv):
    """A newer snapshot the catalog lacks runs as its family (its prices, its rules), said once."""
    dated = "claude-haiku-4-5-20261015"
    emu.config.extra_models = (dated,)
    r = cli(*_args(small_csv, tmp_path, "--model", dated))
    assert r.exit_code == 0, r.output
    assert r.output.count("taken as a snapshot of claude-haiku-4-5") == 1
    catalog = load_catalog()
    for row in _rows(tmp_path / "out.parquet"):
        usage = {k: row[k] for k in ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                                     "cache_read_input_tokens")}
        assert Decimal(str(row["cost_usd"])) == pytest.approx(catalog.cost(MODEL, usage, batch=True))
        assert row["cost_usd"] > 0
    # its family's rules: haiku 4.5 takes at most 64,000 output tokens
    r = cli(*_args(small_csv, tmp_path, "--model", dated, "--max-tokens", "64001", out="big.parquet"))
    refused(r, ExitCode.BAD_INPUT, "max_tokens 64001", "claude-haiku-4-5")
    assert emu.stats.create_calls == 1


@pytest.mark.parametrize("model, extra", [
    ("claude-opus-5-5", ()),                  # cannot turn thinking off
    ("claude-fable-5-1", ()),
    ("claude-sonnet-5", ()),                  # thinks unless thinking = "disabled"
    ("claude-haiku-5-5", ()),
    ("claude-opus-5-5-20261015", ()),         # a snapshot of a family that thinks
])
def test_a_prefill_on_a_model_that_thinks_by_default_is_refused(cli, emu, tmp_path, small_csv, model, extra):
    r = cli(*_args(small_csv, tmp_path, "--model", model, "--max-tokens", "2000", "--prefill", "The answer:", *extra))
    refused(r, ExitCode.BAD_INPUT, "prefill", "thinks by default")
    assert emu.stats.create_calls == 0


def test_a_prefill_with_thinking_turned_off_is_sent(cli, emu, tmp_path, small_csv):
    r = cli(*_args(small_csv, tmp_path, "--model", "claude-sonnet-5", "--thinking", "disabled",
                   "--prefill", "The answer:"))
    assert r.exit_code == 0, r.output
    assert emu.stats.requests_created == 12


@pytest.mark.parametrize("flag, value, needle", [
    ("--temperature", "1.5", "temperature: must be between 0 and 1"),
    ("--temperature", "-0.1", "temperature: must be between 0 and 1"),
    ("--top-p", "1.01", "top_p: must be between 0 and 1"),
    ("--top-k", "0", "top_k: must be at least 1"),
    ("--top-k", "-3", "top_k: must be at least 1"),
])
def test_sampling_values_out_of_range_are_refused(cli, emu, tmp_path, small_csv, flag, value, needle):
    r = cli(*_args(small_csv, tmp_path, "--model", "claude-sonnet-4-5", flag, value))
    refused(r, ExitCode.BAD_INPUT, needle)
    assert emu.stats.create_calls == 0


def test_the_models_file_is_part_of_a_jobs_identity(cli, emu, tmp_path, small_csv):
    """A changed catalog is another job: here the model loses structured output, so labels are asked
    for with a forced tool — other requests, sent, not the old plan's."""
    models = tmp_path / "models.toml"
    models.write_text("[models.claude-haiku-4-5]\nstructured_output = true\n")
    labels = ("--labels", "good,bad", "--models-file", models)
    r = cli(*_args(small_csv, tmp_path, *labels))
    assert r.exit_code == 0, r.output
    assert emu.stats.requests_created == 12
    models.write_text("[models.claude-haiku-4-5]\nstructured_output = false\n")
    r = cli(*_args(small_csv, tmp_path, *labels))
    assert r.exit_code == 0, r.output
    assert emu.stats.requests_created == 24 and len(_jobs(tmp_path / "state.sqlite")) == 2
    assert {row["label"] for row in _rows(tmp_path / "out.parquet")} <= {"good", "bad"}
    # the same catalog again: the same job, nothing sent
    assert cli(*_args(small_csv, tmp_path, *labels)).exit_code == 0
    assert emu.stats.requests_created == 24


def test_a_job_in_flight_from_before_the_catalog_counted_is_not_paid_again(emu, tmp_path, small_csv, monkeypatch):
    """A job with a models file, left in flight by a version that did not hash the file in: after the
    upgrade it is another job, whose rows wait for the first one's batches and take their answers."""
    from batchrun.spec import JobSpec
    models = tmp_path / "models.toml"
    models.write_text("[models.claude-haiku-4-5]\ncache_min_tokens = 2048\n")
    job = {"input": str(small_csv), "output": str(tmp_path / "a.parquet"), "id_column": "id",
           "prompt": "Say: {{ body }}", "model": MODEL, "max_tokens": 50, "poll_interval": 0.05,
           "state": str(tmp_path / "state.sqlite"), "models_file": str(models)}
    emu.config.processing_seconds = 0.5
    identity = JobSpec.identity
    with monkeypatch.context() as old:   # the old version: the models file not in the identity
        old.setattr(JobSpec, "identity", lambda self, fp, endpoint=None, models=None: identity(self, fp, endpoint))
        first = batchrun.run(job, wait=False, api_key="k", base_url=emu.base_url)
    assert first.exit_code == ExitCode.IN_PROGRESS and emu.stats.requests_created == 12
    again = batchrun.run(job, api_key="k", base_url=emu.base_url)
    assert again.job_id != first.job_id and again.exit_code == 0
    assert emu.stats.requests_created == 12                            # nothing sent twice
    assert all(r["text"].startswith("Reply to: Say: row") for r in _rows(tmp_path / "a.parquet"))


# ---- #19: a gateway's own model names, `like` a catalog model ----------------------------------------
def test_a_gateway_model_name_like_a_catalog_model(cli, emu, tmp_path, small_csv):
    name = "claude-sonnet-4-5-20250929-thinking"
    emu.config.extra_models = (name,)
    r = cli(*_args(small_csv, tmp_path, "--model", name))
    refused(r, ExitCode.BAD_INPUT, "unknown model", name)             # not a dated id: the catalog must say
    models = tmp_path / "gateway-models.toml"   # the README's own example
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    (example,) = [block for block in re.findall(r"```toml\n(.*?)```", readme, re.S) if name in block]
    models.write_text(example)
    r = cli(*_args(small_csv, tmp_path, "--model", name, "--models-file", models))
    assert r.exit_code == 0, r.output
    rows = _rows(tmp_path / "out.parquet")
    assert all(row["cost_usd"] > 0 for row in rows)
    # and Sonnet 4.5's rules: no more than 64,000 output tokens
    r = cli(*_args(small_csv, tmp_path, "--model", name, "--models-file", models, "--max-tokens", "64001"))
    refused(r, ExitCode.BAD_INPUT, "max_tokens 64001")
