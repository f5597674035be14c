"""Issue 6: estimate before paying, budgets, status."""
from __future__ import annotations

import json

import pyarrow.parquet as pq

from batchrun.errors import ExitCode
from tests.conftest import PROMPT


def job(inp, tmp_path, *extra):
    return ["--input", inp, "--output", tmp_path / "o.parquet", "--state", tmp_path / "s.sqlite",
            "--id-column", "ticket_id", "--prompt", PROMPT, "--model", "claude-haiku-4-5", "--max-tokens", "300",
            "--batch-size", "200", "--poll-interval", "0.1", *extra]


def test_estimate_then_run_lands_inside_the_bracket(emu, cli, tmp_path, tickets_csv):
    r = cli("estimate", *job(tickets_csv, tmp_path), "--json")
    assert r.exit_code == 0, r.output
    est = json.loads(r.output)
    assert emu.stats.create_calls == 0                           # no batch for an estimate
    assert est["requests"] == 450 and est["method"] == "sampled"
    r = cli("run", *job(tickets_csv, tmp_path))
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    used = sum(row["input_tokens"] + row["cache_read_input_tokens"] + row["cache_creation_input_tokens"]
               for row in rows)
    assert abs(est["input_tokens"] - used) <= 0.10 * used
    cost = sum(row["cost_usd"] for row in rows)
    assert est["cost_usd_min"] <= cost <= est["cost_usd_max"]
    # a finished job: nothing remains to price
    again = json.loads(cli("estimate", *job(tickets_csv, tmp_path), "--json").output)
    assert again["requests"] == 0 and again["done"] == 450 and again["cost_usd_max"] == 0


def test_exact_estimate_for_small_jobs(emu, cli, tmp_path, tickets_csv):
    est = json.loads(cli("estimate", *job(tickets_csv, tmp_path, "--limit", "40"), "--json").output)
    assert est["method"] == "exact" and est["requests"] == 40


def test_budget_far_below_is_refused_before_any_batch(emu, cli, tmp_path, tickets_csv):
    r = cli("run", *job(tickets_csv, tmp_path, "--max-cost", "0.001"))
    assert r.exit_code == ExitCode.BUDGET, r.output
    assert "max_cost" in r.output and "Traceback" not in r.output
    assert emu.stats.create_calls == 0
    r = cli("run", *job(tickets_csv, tmp_path, "--max-cost", "5"))
    assert r.exit_code == 0, r.output


def test_status_of_a_finished_job(emu, cli, tmp_path, tickets_csv):
    assert cli("run", *job(tickets_csv, tmp_path)).exit_code == 0
    r = cli("status", "--state", tmp_path / "s.sqlite")
    assert r.exit_code == 0
    assert "finished" in r.output and "450 succeeded" in r.output
    data = json.loads(cli("status", "--state", tmp_path / "s.sqlite", "--json").output)
    assert data[0]["finished"] and data[0]["counts"]["succeeded"] == 450
    assert data[0]["cost_usd"] > 0 and len(data[0]["batches"]) == 3
    jobs = json.loads(cli("jobs", "--state", tmp_path / "s.sqlite", "--json").output)
    assert len(jobs) == 1
