"""Gateways as users meet them (issue 19): no batch endpoint, no count_tokens, usage that cannot be
right, their own anthropic-version values, and what a run says about itself. Against the emulator on
loopback (a non-Anthropic endpoint) with its gateway flags."""
from __future__ import annotations

import csv
import json
import re

import pyarrow.parquet as pq
import pytest

from batchrun.errors import ExitCode
from tests.conftest import PROMPT, make_tickets, refused, row_id

MODEL = "claude-haiku-4-5"


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def job_args(tmp_path, rows=None, *extra, n=12):
    inp = tmp_path / "t.csv"
    if not inp.exists():
        write_csv(inp, rows or make_tickets(n))
    return ["run", "--input", inp, "--output", tmp_path / "o.parquet", "--id-column", "ticket_id",
            "--prompt", PROMPT, "--model", MODEL, "--max-tokens", "100", "--state", tmp_path / "s.sqlite",
            "--poll-interval", "0.1", *extra]


def status(cli, tmp_path):
    r = cli("status", "--state", tmp_path / "s.sqlite", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    return data if isinstance(data, list) else data.get("jobs", data)


# ---- (1) a gateway without the Message Batches API ----------------------------------------------------
def test_batch_mode_at_a_gateway_without_batches_says_use_messages_mode_then_continues_the_same_job(
        emu, cli, tmp_path):
    emu.config.no_batches = True
    args = job_args(tmp_path)
    r = cli(*args)
    line = refused(r, ExitCode.API_ERROR, "no Message Batches API", "--mode messages", "standard prices",
                   emu.base_url + "/v1/messages/batches")
    assert "resume" not in line and "Traceback" not in r.output
    assert emu.stats.batches_created == 0 and emu.stats.status_counts[404] == 1   # one try, at once
    jobs = status(cli, tmp_path)
    assert len(jobs) == 1 and jobs[0]["state"] == "planned", jobs          # not "in progress"
    assert jobs[0]["counts"]["pending"] == 12 and not jobs[0]["batches"]
    first = jobs[0]["job_id"]

    # again: the same one line, still not started, never an ever-growing list of intents
    r = cli(*args)
    refused(r, ExitCode.API_ERROR, "--mode messages")
    assert status(cli, tmp_path)[0]["state"] == "planned"

    r = cli(*args, "--mode", "messages")
    assert r.exit_code == 0, r.output
    jobs = status(cli, tmp_path)
    assert len(jobs) == 1, jobs                          # the same job, not a second one beside the first
    assert jobs[0]["state"] == "finished" and jobs[0]["mode"] == "messages" and jobs[0]["counts"]["succeeded"] == 12
    assert jobs[0]["job_id"] != first                    # (its id is the messages-mode job's)
    assert emu.stats.messages_calls == 12
    got = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert [g["status"] for g in got] == ["succeeded"] * 12 and all(g["attempts"] == 1 for g in got)
    # and a later run of the same command sends nothing
    r = cli(*args, "--mode", "messages")
    assert r.exit_code == 0 and emu.stats.messages_calls == 12


def test_a_job_already_sent_in_batch_mode_is_not_taken_over_by_messages_mode(emu, cli, tmp_path):
    """Only a job nothing of which was sent continues in the other mode; one that ran stays itself."""
    args = job_args(tmp_path, n=5)
    assert cli(*args).exit_code == 0
    r = cli(*args, "--mode", "messages")
    assert r.exit_code == 0, r.output
    jobs = status(cli, tmp_path)
    assert sorted(j["mode"] for j in jobs) == ["batch", "messages"]
    assert emu.stats.messages_calls == 0                 # its rows reuse the answers already paid for


# ---- (3) estimate and budget without count_tokens ----------------------------------------------------
MIXED = ["plain English words about a refund that never came", "李雷和韩梅梅在北京的咖啡馆见面，讨论了退款问题。",
         "!!! ??? ... ;;; ((( ))) --- +++ *** ### @@@", "naïve café 🚀🚀🚀 Zoë Ołeksandr Nguyễn", "1234567890 " * 5]


def mixed_rows(n):
    return [{"ticket_id": f"T-{i}", "customer": "Zoë" if i % 2 else "", "priority": i % 5,
             "body": " ".join(MIXED[(i + k) % len(MIXED)] for k in range(1 + i % 4))} for i in range(n)]


def estimate_json(cli, args, *extra):
    r = cli("estimate", *args[1:], *extra, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("model", ["claude-haiku-4-5", "claude-haiku-5-5"])   # old and new tokenizer
def test_estimate_without_count_tokens_is_approximate_once_and_brackets_the_counted_figures(emu, cli, tmp_path,
                                                                                            model):
    import time
    args = job_args(tmp_path, mixed_rows(30), "--model", model, "--system", "Answer briefly. " * 20)
    counted = estimate_json(cli, args)
    assert counted["method"] == "exact"
    calls = emu.stats.count_tokens_calls
    emu.config.no_count_tokens = True
    started = time.monotonic()
    r = cli("estimate", *args[1:])
    assert r.exit_code == 0, r.output
    assert time.monotonic() - started < 5                       # one try, no 35 s of retries
    assert r.output.count("approximate: this endpoint does not count tokens") == 1, r.output
    assert emu.stats.count_tokens_calls == calls + 1
    approx = estimate_json(cli, args)
    assert approx["method"] == "approximate"
    assert approx["cost_usd_min"] <= counted["cost_usd_min"] and approx["cost_usd_max"] >= counted["cost_usd_max"]
    assert approx["requests"] == counted["requests"] == 30


def test_failing_count_tokens_then_budget_enforced_on_the_approximate_maximum(emu, cli, tmp_path):
    import time
    emu.config.count_tokens_fails = True                        # a gateway whose upstream is down: 500
    args = job_args(tmp_path, mixed_rows(20), "--mode", "messages")
    started = time.monotonic()
    est = estimate_json(cli, args)
    assert time.monotonic() - started < 5 and est["method"] == "approximate"
    assert emu.stats.count_tokens_calls == 1
    # a budget just under the maximum: refused before anything is sent
    r = cli(*args, "--max-cost", est["cost_usd_max"] * 0.98)
    assert r.exit_code == ExitCode.BUDGET, r.output
    assert emu.stats.messages_calls == 0
    # the maximum itself: every row sent, and what they cost lies in the bracket
    r = cli(*args, "--max-cost", est["cost_usd_max"])
    assert r.exit_code == 0, r.output
    assert emu.stats.messages_calls == 20
    assert r.output.count("approximate: this endpoint does not count tokens") == 1, r.output
    cost = sum(g["cost_usd"] for g in pq.read_table(tmp_path / "o.parquet").to_pylist())
    assert est["cost_usd_min"] <= cost <= est["cost_usd_max"]


# ---- (6) a gateway's own anthropic-version ------------------------------------------------------------
def test_a_gateways_own_api_version_is_sent_with_a_warning(emu, cli, tmp_path):
    r = cli(*job_args(tmp_path, None, "--api-version", "2025-10-01", "--mode", "messages", n=4))
    assert r.exit_code == 0, r.output
    assert emu.stats.api_versions == {"2025-10-01": 4}
    warning = [line for line in r.output.splitlines() if "2025-10-01" in line]
    assert len(warning) == 1 and "unknown" in warning[0] and "2023-06-01" in warning[0], r.output


def test_the_anthropic_api_takes_only_its_own_versions(emu, cli, tmp_path):
    args = job_args(tmp_path, None, "--api-version", "2025-10-01", "--base-url", "https://api.anthropic.com", n=4)
    refused(cli(*args), ExitCode.BAD_INPUT, "api_version", "2025-10-01", "2023-06-01", "2026-10-21")
    for bad in ("latest", "2025-13-01", "2025-10-1"):
        refused(cli(*job_args(tmp_path, None, "--api-version", bad)), ExitCode.BAD_INPUT, "api_version", "YYYY-MM-DD")
    assert sum(emu.stats.api_versions.values()) == 0


def test_a_job_file_api_version_written_as_a_toml_date(emu, cli, tmp_path):
    write_csv(tmp_path / "t.csv", make_tickets(3))
    job = tmp_path / "job.toml"
    job.write_text(f'input = "t.csv"\noutput = "o.parquet"\nprompt = "Hi {{{{ body }}}}"\nmodel = "{MODEL}"\n'
                   'mode = "messages"\napi_version = 2025-10-01\n')
    r = cli("run", job)
    assert r.exit_code == 0, r.output
    assert emu.stats.api_versions == {"2025-10-01": 3}


# ---- (2) run --retry-errored ----------------------------------------------------------------------------
def test_retry_errored_in_batch_mode_sends_only_the_errored_rows_again(emu, cli, tmp_path):
    emu.config.errored_rate, emu.config.errored_types = 0.4, ("invalid_request_error",)   # final: not retried
    args = job_args(tmp_path, n=30)
    r = cli(*args)
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    first = pq.read_table(tmp_path / "o.parquet").to_pylist()
    errored = {g["custom_id"] for g in first if g["status"] == "errored"}
    assert 3 <= len(errored) < 30
    emu.config.errored_rate = 0.0
    assert cli(*args).exit_code == ExitCode.FAILED_ROWS           # without the flag: nothing sent
    assert sum(emu.stats.submitted_custom_ids.values()) == 30

    r = cli(*args, "--retry-errored")
    assert r.exit_code == 0, r.output
    told = [line for line in r.output.splitlines() if "--retry-errored" in line]
    assert len(told) == 1 and f"{len(errored)} rows" in told[0] and "$" in told[0], r.output
    sent = emu.stats.submitted_custom_ids
    assert {row_id(c) for c, n in sent.items() if n == 2} == errored and sum(sent.values()) == 30 + len(errored)
    got = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert [g["status"] for g in got] == ["succeeded"] * 30
    assert all(g["attempts"] == 1 and g["error_type"] is None for g in got)
    assert [g["text"] for g in got if g["custom_id"] not in errored] == \
        [g["text"] for g in first if g["custom_id"] not in errored]


def test_retry_errored_in_messages_mode_respects_the_budget(emu, cli, tmp_path):
    rows = make_tickets(10)
    for i in (2, 5, 7):
        rows[i]["body"] = "REFUSE ME " + rows[i]["body"]
    emu.config.refuse_text = "REFUSE ME"
    args = job_args(tmp_path, rows, "--mode", "messages")
    assert cli(*args).exit_code == ExitCode.FAILED_ROWS
    assert emu.stats.messages_calls == 10
    emu.config.refuse_text = None
    r = cli(*args, "--retry-errored", "--max-cost", "0.0000001")   # too little for even one of them
    assert r.exit_code == ExitCode.BUDGET, r.output
    assert "3 rows that ended errored" in r.output and emu.stats.messages_calls == 10
    r = cli(*args, "--retry-errored")
    assert r.exit_code == 0, r.output
    assert emu.stats.messages_calls == 13
    got = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert [g["status"] for g in got] == ["succeeded"] * 10
    assert [g["attempts"] for g in got] == [1] * 10


# ---- (4) usage that cannot be right ------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["batch", "messages"])
def test_output_tokens_above_max_tokens_are_recorded_as_reported_and_flagged(emu, cli, tmp_path, mode):
    from batchrun.models import load_catalog
    emu.config.report_output_tokens = 503                     # as LiteLLM's mock replies do, for max_tokens 100
    r = cli(*job_args(tmp_path, None, "--mode", mode, n=6))
    assert r.exit_code == 0, r.output
    flagged = [line for line in r.output.splitlines() if "more output tokens than their max_tokens" in line]
    assert len(flagged) == 1 and "6 replies" in flagged[0], r.output
    prices = load_catalog().resolve(MODEL).prices
    scale = 0.5 if mode == "batch" else 1.0
    for g in pq.read_table(tmp_path / "o.parquet").to_pylist():
        assert g["output_tokens"] == 503
        assert g["cost_usd"] == pytest.approx(scale * float(g["input_tokens"] * prices.input + 503 * prices.output) / 1e6)
    html = tmp_path / "r.html"
    assert cli("report", "--state", tmp_path / "s.sqlite", "--html", html).exit_code == 0
    assert "6 replies reported more output tokens than their max_tokens" in html.read_text()


def test_replies_without_usage_are_flagged(emu, cli, tmp_path):
    emu.config.omit_usage = True
    r = cli(*job_args(tmp_path, None, "--mode", "messages", n=4))
    assert r.exit_code == 0, r.output
    assert "4 replies reported no usage" in r.output
    got = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert all(g["output_tokens"] is None and g["status"] == "succeeded" for g in got)


def test_the_budget_settles_over_reported_usage_at_what_was_reported(emu, cli, tmp_path):
    args = job_args(tmp_path, None, "--mode", "messages", "--concurrency", "1", n=10)
    est = estimate_json(cli, args)
    emu.config.report_output_tokens = 1000                    # ten times the max_tokens each was reserved at
    r = cli(*args, "--max-cost", est["cost_usd_max"])
    assert r.exit_code == ExitCode.BUDGET, r.output
    assert emu.stats.messages_calls < 10                       # each reply spent what it reported
    got = [g for g in status(cli, tmp_path)]
    spent = got[0]["cost_usd"]
    assert spent >= est["cost_usd_max"] * 0.5 and got[0]["counts"]["succeeded"] == emu.stats.messages_calls


# ---- (7) what a run says about itself --------------------------------------------------------------------
def test_the_summary_tells_this_run_apart_from_the_job(emu, cli, tmp_path):
    args = job_args(tmp_path, None, n=5)
    r = cli(*args)
    assert r.exit_code == 0
    line = [x for x in r.output.splitlines() if "this run:" in x]
    assert len(line) == 1 and "5 requests sent, 5 replies recorded" in line[0], r.output
    r = cli(*args)
    line = [x for x in r.output.splitlines() if "this run:" in x]
    assert len(line) == 1 and re.search(r"this run: nothing sent; the job cost \$0\.\d+", line[0]), r.output


def test_invalid_output_causes_are_grouped_and_logs_name_the_full_url(emu, cli, tmp_path, monkeypatch):
    emu.config.off_schema_rate = 1.0
    monkeypatch.setenv("ANTHROPIC_BASE_URL", emu.base_url + "/gw/anthropic")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}},
                                  "required": ["n"]}))
    r = cli(*job_args(tmp_path, None, "--mode", "messages", "--output-schema", schema, n=6))
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    line = [x for x in r.output.splitlines() if x.strip().startswith("invalid output:")]
    assert len(line) == 1 and re.search(r"invalid output: 6 × reply does not fit the schema at n: \d+ is greater "
                                        r"than the maximum of 3$", line[0]), r.output
    url = f"POST {emu.base_url}/gw/anthropic/v1/messages"
    assert "replies recorded in" in r.output and f"over {url};" in r.output
    assert "POST /v1/messages" not in r.output


def test_the_emulator_command_plays_a_gateway_without_batches_or_count_tokens(cli, monkeypatch):
    import batchrun.emulator as emulator_pkg
    seen = {}
    monkeypatch.setattr(emulator_pkg, "run_server", lambda host, port, config, on_ready: seen.update(config=config))
    assert cli("emulator", "--no-batches", "--no-count-tokens").exit_code == 0
    assert seen["config"].no_batches and seen["config"].no_count_tokens


def test_over_reported_usage_is_judged_against_each_rows_own_max_tokens(emu, cli, tmp_path):
    rows = make_tickets(6)
    for i, row in enumerate(rows):
        row["budget"] = 600 if i < 2 else 100            # 503 output tokens fit the first two rows' own max_tokens
    emu.config.report_output_tokens = 503
    r = cli(*job_args(tmp_path, rows, "--mode", "messages", "--max-tokens-column", "budget"))
    assert r.exit_code == 0, r.output
    assert "usage: 4 replies reported more output tokens than their max_tokens" in r.output
