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
from batchrun.store import Store
from tests.conftest import PROMPT, make_tickets, refused

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
