"""Hostile probes of issue 19's promises (gateways): what a user meets when a gateway answers oddly,
when a run is killed between the refusal and its record, when a server lies about usage."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pyarrow.parquet as pq
import pytest

from batchrun.errors import ExitCode
from tests.conftest import refused
from tests.test_gateway import job_args, status

CLI = [sys.executable, "-c", "from batchrun.cli import main; main()"]


def spawn_run(emu, args, failpoint=None, timeout=60):
    env = {**os.environ, "ANTHROPIC_API_KEY": "sk-ant-test-0123456789", "ANTHROPIC_BASE_URL": emu.base_url}
    env.pop("BATCHRUN_FAILPOINT", None)
    env.pop("BATCHRUN_PAUSE", None)
    if failpoint:
        env["BATCHRUN_FAILPOINT"] = failpoint
    return subprocess.run(CLI + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)


# ---- (1) a gateway without batches ----------------------------------------------------------------
@pytest.mark.parametrize("only", ["", "create"])
def test_a_run_killed_after_its_batch_intent_at_a_gateway_without_batches_is_not_stuck(emu, cli, tmp_path, only,
                                                                                      monkeypatch):
    """Killed between the batch intent and the create's 404 (the gateway lists nothing, or lists but
    cannot create): the next run gives the same one line, the job shows as not started, and messages
    mode continues the same job. (Where the list works, the next run first waits the create grace for
    the dead run's batch to show: shortened here, as a slow gateway's would be lengthened.)"""
    monkeypatch.setenv("BATCHRUN_CREATE_GRACE", "1")
    emu.config.no_batches = True
    emu.config.no_batches_only = only
    args = job_args(tmp_path, n=6)
    p = spawn_run(emu, args, failpoint="after_intent")
    assert p.returncode == -9, p.stderr
    r = cli(*args)
    line = refused(r, ExitCode.API_ERROR, "no Message Batches API", "--mode messages")
    assert "resume" not in line
    jobs = status(cli, tmp_path)
    assert len(jobs) == 1 and jobs[0]["state"] == "planned" and jobs[0]["counts"]["pending"] == 6, jobs
    assert emu.stats.batches_created == 0
    r = cli(*args, "--mode", "messages")
    assert r.exit_code == 0, r.output
    jobs = status(cli, tmp_path)
    assert len(jobs) == 1 and jobs[0]["counts"]["succeeded"] == 6, jobs
    assert emu.stats.messages_calls == 6


@pytest.mark.parametrize("reply", ["html", "405"])
def test_a_gateway_answering_its_missing_batches_with_html_or_405_gets_the_same_one_line(emu, cli, tmp_path, reply):
    emu.config.no_batches = True
    emu.config.no_batches_reply = reply
    args = job_args(tmp_path, n=4)
    line = refused(cli(*args), ExitCode.API_ERROR, "no Message Batches API", "--mode messages",
                   emu.base_url + "/v1/messages/batches", "405" if reply == "405" else "404")
    assert "resume" not in line and "<html" not in line.lower()
    assert status(cli, tmp_path)[0]["state"] == "planned"
    r = cli(*args, "--mode", "messages")
    assert r.exit_code == 0, r.output
    assert len(status(cli, tmp_path)) == 1 and emu.stats.messages_calls == 4


def test_a_gateway_that_creates_batches_but_cannot_list_them_is_never_sent_twice(emu, cli, tmp_path):
    """Killed after the intent at a gateway whose list endpoint is missing: whether the create made a
    batch cannot be checked, so nothing is sent again (one line), and no batch is created."""
    emu.config.no_batches = True
    emu.config.no_batches_only = "list"
    args = job_args(tmp_path, n=4)
    p = spawn_run(emu, args, failpoint="after_intent")
    assert p.returncode == -9, p.stderr
    created = emu.stats.batches_created
    refused(cli(*args), ExitCode.API_ERROR, "does not list", "not sent again")
    assert emu.stats.batches_created == created


# ---- (4) usage a lying server reports ------------------------------------------------------------
LIES = [{"output_tokens": "503"}, {"output_tokens": -5000}, {"input_tokens": -100000},
        {"output_tokens": None}, {"input_tokens": "many"}, [1, 2], "lots", {"output_tokens": 1e30},
        {"cache_read_input_tokens": -7}, {"output_tokens": True}]


@pytest.mark.parametrize("mode", ["messages", "batch"])
@pytest.mark.parametrize("lie", LIES, ids=[json.dumps(x) for x in LIES])
def test_usage_a_server_lies_about_never_crashes_nor_lowers_the_cost_silently(emu, cli, tmp_path, mode, lie):
    emu.config.usage_patch = lie
    r = cli(*job_args(tmp_path, n=3), "--mode", mode)
    assert "Traceback" not in r.output and "internal error" not in r.output, r.output
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert [x["status"] for x in rows] == ["succeeded"] * 3
    for x in rows:   # never a negative token count or cost on record
        for k in ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                  "cost_usd"):
            assert x[k] is None or x[k] >= 0, (k, x)
    if lie != {"output_tokens": None}:   # (null is allowed by the API: missing, not a lie)
        assert "cannot be right" in r.output, r.output                    # said, not taken silently
    if not (isinstance(lie, dict) and "cache_read_input_tokens" in lie):
        assert "  usage: 3 replies reported no usage or counts that cannot be read" in r.output, r.output


# ---- (2) run --retry-errored ----------------------------------------------------------------------
def errored_job(emu, cli, tmp_path, *extra, n=10):
    """A finished batch job some rows of which ended errored (a final error: not retried by itself)."""
    emu.config.errored_rate, emu.config.errored_types = 0.4, ("invalid_request_error",)
    args = job_args(tmp_path, None, *extra, n=n)
    r = cli(*args)
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    errored = {g["custom_id"] for g in pq.read_table(tmp_path / "o.parquet").to_pylist() if g["status"] == "errored"}
    assert 1 <= len(errored) < n
    emu.config.errored_rate = 0.0
    return args, errored


def test_retry_errored_twice_the_second_sends_nothing_and_says_so(emu, cli, tmp_path):
    args, errored = errored_job(emu, cli, tmp_path)
    assert cli(*args, "--retry-errored").exit_code == 0
    sent = sum(emu.stats.submitted_custom_ids.values())
    r = cli(*args, "--retry-errored")
    assert r.exit_code == 0, r.output
    assert sum(emu.stats.submitted_custom_ids.values()) == sent
    assert "this run: nothing sent" in r.output, r.output
    assert [g["status"] for g in pq.read_table(tmp_path / "o.parquet").to_pylist()] == ["succeeded"] * 10


def test_retry_errored_on_a_canceled_job_sends_the_errored_rows_rather_than_canceling_them(emu, cli, tmp_path):
    args, errored = errored_job(emu, cli, tmp_path)
    r = cli("cancel", "--input", tmp_path / "t.csv", *args[3:])
    r = cli(*args, "--retry-errored")
    got = {g["custom_id"]: g for g in pq.read_table(tmp_path / "o.parquet").to_pylist()}
    assert r.exit_code == 0, r.output
    assert all(got[c]["status"] == "succeeded" for c in errored), [got[c]["status"] for c in errored]


def test_retry_errored_refused_by_the_budget_leaves_the_rows_errored(emu, cli, tmp_path):
    """Nothing sent: the rows keep their errors (a later run without the flag does not send them)."""
    args, errored = errored_job(emu, cli, tmp_path)
    sent = sum(emu.stats.submitted_custom_ids.values())
    r = cli(*args, "--retry-errored", "--max-cost", "0.0000001")
    refused(r, ExitCode.BUDGET, f"the {len(errored)} rows that ended errored", "nothing sent", "--max-cost")
    assert sum(emu.stats.submitted_custom_ids.values()) == sent
    r = cli(*args)
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    assert sum(emu.stats.submitted_custom_ids.values()) == sent
    got = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert {g["custom_id"] for g in got if g["status"] == "errored"} == errored
    assert all(g["error_type"] for g in got if g["status"] == "errored")


# ---- (6) api_version -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["2025-13-45", "2025-02-31", "latest", "2025-10-01T00:00:00", "20251001", ""])
def test_api_versions_that_are_not_days_are_refused_for_a_gateway_before_anything_is_sent(emu, cli, tmp_path, bad):
    refused(cli(*job_args(tmp_path, None, "--api-version", bad, "--mode", "messages", n=2)), ExitCode.BAD_INPUT,
            "api_version", "YYYY-MM-DD")
    assert emu.stats.messages_calls == 0 and sum(emu.stats.api_versions.values()) == 0


def test_an_api_version_with_spaces_around_it_is_the_version(emu, cli, tmp_path):
    r = cli(*job_args(tmp_path, None, "--api-version", " 2025-10-01 ", "--mode", "messages", n=2))
    assert r.exit_code == 0, r.output
    assert emu.stats.api_versions == {"2025-10-01": 2}


@pytest.mark.parametrize("base", ["https://api.anthropic.com/v1", "https://API.anthropic.com./", "https://api.anthropic.com:443"])
def test_the_anthropic_api_with_a_path_or_spelled_otherwise_takes_only_its_own_versions(emu, cli, tmp_path, base):
    refused(cli(*job_args(tmp_path, None, "--api-version", "2025-10-01", "--base-url", base, n=2)),
            ExitCode.BAD_INPUT, "api_version", "2023-06-01")


class Forward(httpx.BaseTransport):
    """Requests to any host, answered by the emulator over loopback (the URL's path kept)."""
    def __init__(self, base_url):
        self.base, self.inner = httpx.URL(base_url), httpx.HTTPTransport()

    def handle_request(self, request):
        request.url = request.url.copy_with(scheme=self.base.scheme, host=self.base.host, port=self.base.port)
        return self.inner.handle_request(request)


def test_a_404_on_creating_a_batch_at_the_anthropic_host_never_says_use_messages_mode(emu):
    """At api.anthropic.com (here with a mistyped /v1 path) a 404 is about the path, not a missing batch API:
    never "use --mode messages" (messages mode would meet the same 404)."""
    from batchrun.api import ApiClient
    from batchrun.errors import ApiError, NoBatchApiError
    emu.config.no_batches = True
    client = ApiClient(api_key="sk-ant-test-0123456789", base_url="https://api.anthropic.com/v1",
                       transport=Forward(emu.base_url))
    with pytest.raises(ApiError) as got:
        client.create_batch(b'{"requests": []}')
    assert not isinstance(got.value, NoBatchApiError) and "--mode messages" not in str(got.value)
    assert got.value.status == 404
    # the same reply at a gateway's URL is the missing batch API
    gateway = ApiClient(api_key="sk-ant-test-0123456789", base_url="https://gateway.example/anthropic",
                        transport=Forward(emu.base_url))
    with pytest.raises(NoBatchApiError):
        gateway.create_batch(b'{"requests": []}')


# ---- (7) the summary ---------------------------------------------------------------------------------
def test_invalid_output_reasons_that_differ_only_in_detail_are_one_cause(emu, cli, tmp_path):
    """Replies cut at max_tokens each break their JSON at their own character: one cause (reply is not
    JSON), not a list of distinct reasons of one row each."""
    rows = [{"ticket_id": f"T{i}", "customer": "", "priority": 1, "body": "word", "mt": i + 1} for i in range(8)]
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"},
                                  "c": {"type": "string"}}, "required": ["a", "b", "c"]}))
    args = job_args(tmp_path, rows, "--mode", "messages", "--output-schema", schema, "--max-tokens-column", "mt")
    i = args.index("--max-tokens")
    del args[i:i + 2]
    r = cli(*args)
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    got = pq.read_table(tmp_path / "o.parquet").to_pylist()
    reasons = {g["error_message"] for g in got}
    assert len(reasons) > 3, reasons          # (the case: more distinct details than the summary shows)
    line = [x for x in r.output.splitlines() if x.strip().startswith("invalid output:")]
    assert len(line) == 1, r.output
    assert line[0].strip().startswith("invalid output: 8 × reply is not JSON"), (reasons, line[0])
    assert "other reasons" not in line[0]


# ---- (3) estimate and budgets without count_tokens ---------------------------------------------------
@pytest.mark.parametrize("model", ["claude-haiku-4-5", "claude-haiku-5-5"])
def test_batch_mode_budget_of_exactly_the_approximate_maximum_with_a_cached_system_prompt(emu, cli, tmp_path, model):
    from tests.test_gateway import estimate_json, mixed_rows
    emu.config.no_count_tokens = True
    args = job_args(tmp_path, mixed_rows(15), "--model", model, "--system", "Answer in one word. " * 300,
                    "--batch-size", "4")
    est = estimate_json(cli, args)
    assert est["method"] == "approximate"
    r = cli(*args, "--max-cost", est["cost_usd_max"])
    assert r.exit_code == 0, r.output
    cost = sum(g["cost_usd"] for g in pq.read_table(tmp_path / "o.parquet").to_pylist())
    assert est["cost_usd_min"] <= cost <= est["cost_usd_max"]


def test_count_tokens_missing_then_back_the_next_estimate_counts(emu, cli, tmp_path):
    from tests.test_gateway import estimate_json, mixed_rows
    args = job_args(tmp_path, mixed_rows(6))
    emu.config.no_count_tokens = True
    assert estimate_json(cli, args)["method"] == "approximate"
    emu.config.no_count_tokens = False
    assert estimate_json(cli, args)["method"] == "exact"


def test_image_rows_without_count_tokens_hold_the_bracket(emu, cli, tmp_path):
    from tests.test_gateway import estimate_json
    import base64
    png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
    for i in range(3):
        (tmp_path / f"i{i}.png").write_bytes(png)
    rows = [{"ticket_id": f"T{i}", "customer": "", "priority": 1, "body": "what is this?", "img": str(tmp_path / f"i{i}.png")}
            for i in range(3)]
    emu.config.no_count_tokens = True
    args = job_args(tmp_path, rows, "--image-column", "img", "--mode", "messages")
    est = estimate_json(cli, args)
    assert est["method"] == "approximate"
    r = cli(*args, "--max-cost", est["cost_usd_max"])
    assert r.exit_code == 0, r.output
    cost = sum(g["cost_usd"] for g in pq.read_table(tmp_path / "o.parquet").to_pylist())
    assert est["cost_usd_min"] <= cost <= est["cost_usd_max"], (est, cost)


# ---- (7) full URLs in logs and errors ------------------------------------------------------------------
def test_full_urls_in_logs_and_errors_never_show_a_password_in_the_base_url(emu, cli, tmp_path, monkeypatch):
    emu.config.no_batches = True
    monkeypatch.setenv("ANTHROPIC_BASE_URL", emu.base_url.replace("http://", "http://user:pw8chars@") + "/gw")
    args = job_args(tmp_path, n=3)
    r = cli(*args)
    refused(r, ExitCode.API_ERROR, "no Message Batches API", f"POST {emu.base_url}/gw/v1/messages/batches")
    assert "pw8chars" not in r.output
    r = cli(*args, "--mode", "messages")
    assert r.exit_code == 0, r.output
    assert f"over POST {emu.base_url}/gw/v1/messages" in r.output and "pw8chars" not in r.output
    for f in tmp_path.iterdir():
        if f.is_file():
            assert b"pw8chars" not in f.read_bytes(), f
