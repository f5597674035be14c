"""Issue 6: the budget (--max-cost) — refused up front, reserved while running, never collecting less.

What each request may cost at most and what it really cost are computed here independently of
batchrun, from the emulator's pure functions (count_tokens, reply_for) and the catalog prices of
claude-haiku-4-5 ($1 / $5 per million input / output tokens; half of that in batches).
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
import time
from decimal import Decimal

import httpx
import pytest

import batchrun
from batchrun.api import RetryPolicy
from batchrun import estimator
from batchrun.errors import BudgetError, ExitCode
from batchrun.emulator.replies import count_tokens, reply_for
from batchrun.store import Store
from tests.conftest import PROMPT, make_tickets
from tests.test_reliability import spawn

MILLION = Decimal(1_000_000)
IN, OUT = Decimal(1), Decimal(5)              # claude-haiku-4-5, USD per million tokens


def write_tickets(path, n: int, seed: int = 7):
    rows = make_tickets(n, seed=seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def job_args(inp, tmp_path, *extra, batch_size=200, max_tokens=300):
    return ["--input", inp, "--output", tmp_path / "o.parquet", "--state", tmp_path / "s.sqlite",
            "--id-column", "ticket_id", "--prompt", PROMPT, "--model", "claude-haiku-4-5",
            "--max-tokens", max_tokens, "--batch-size", batch_size, "--poll-interval", "0.1", *extra]


def params_by_id(state) -> dict:
    with Store(str(state)) as store:
        return {cid: p for _, cid, p in store.params()}


def true_max(params: dict, batch: bool = True) -> Decimal:
    """What one request can cost at most: its exact input, its full max_tokens of output."""
    usd = (count_tokens(params) * IN + params["max_tokens"] * OUT) / MILLION
    return usd / 2 if batch else usd


def real_cost(params: dict, batch: bool = True) -> Decimal:
    """What the emulator's reply to it costs."""
    usage = reply_for(params)["usage"]
    usd = (usage["input_tokens"] * IN + usage["output_tokens"] * OUT) / MILLION
    return usd / 2 if batch else usd


def spent(state) -> Decimal:
    with Store(str(state)) as store:
        rows = store.q("SELECT cost_usd FROM requests WHERE state IN ('succeeded', 'invalid_output')")
    return sum((Decimal(str(r["cost_usd"])) for r in rows), Decimal(0))


def status(cli, state) -> dict:
    r = cli("status", "--state", state, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.output)[0]


# ---- a refusal stops sending, never collecting ------------------------------------------------------
@pytest.mark.parametrize("first_budget", [None, "10"], ids=["sent-without-budget", "sent-with-budget"])
def test_budget_refusal_still_collects_batches_in_flight(emu, cli, tmp_path, first_budget, monkeypatch):
    """300 rows: a first run sends the first 200 in one batch and is killed before the second; the
    next runs get a budget the last 100 rows fit only once the first batch's real cost is known."""
    # the intent the killed run left is resolved at once (no batch of its size appeared), not waited for
    # as a create that may still land (60 s by default)
    monkeypatch.setenv("BATCHRUN_CREATE_GRACE", "0")
    inp = write_tickets(tmp_path / "t.csv", 300)
    state = tmp_path / "s.sqlite"
    emu.config.processing_seconds = 3600                     # batch 1 stays in flight until we say
    argv = ["run", *map(str, job_args(inp, tmp_path))] + (["--max-cost", first_budget] if first_budget else [])
    proc = spawn(emu, argv, failpoint="after_intent:2")      # killed after committing batch 2's intent
    proc.communicate(timeout=120)
    assert proc.returncode == -9 and emu.stats.batches_created == 1

    params = params_by_id(state)
    ids = list(params)                                        # in row order: batch 1 holds the first 200
    cost_first = sum(real_cost(params[c]) for c in ids[:200])
    max_rest = sum(true_max(params[c]) for c in ids[200:])    # what `estimate` prints for the last 100
    max_first = sum(true_max(params[c]) for c in ids[:200])
    fits_after = first_budget is None
    budget = cost_first + max_rest + (Decimal("0.002") if fits_after else Decimal("-0.002"))
    assert budget < max_first + max_rest - Decimal("0.01")   # before batch 1 is collected, the rest cannot fit
    budget = f"{budget:.6f}"

    # --no-wait, batch 1 still running: nothing more is sent; the refusal says the rows in flight are
    # collected by the next run (batch 1 reserves its maximum even when it was sent without a budget)
    r = cli("run", *job_args(inp, tmp_path, "--max-cost", budget, "--no-wait"))
    assert r.exit_code == ExitCode.BUDGET, r.output
    assert "200 rows still in flight: the next run collects them" in r.stderr and "Traceback" not in r.output
    assert "100 rows still to send" in r.stderr and "spent $0.000000" in r.stderr
    assert emu.stats.batches_created == 1
    st = status(cli, state)
    assert st["counts"]["in_flight"] == 200 and st["counts"]["pending"] == 100
    assert st["max_cost"] == float(budget)

    # batch 1 ends; the same command polls and collects it before judging the budget again
    emu.config.processing_seconds = 0.05
    time.sleep(0.1)
    r = cli("run", *job_args(inp, tmp_path, "--max-cost", budget))
    st = status(cli, state)
    assert st["counts"]["succeeded"] >= 200                   # batch 1 was read either way
    assert float(spent(state)) == pytest.approx(float(cost_first) + (float(sum(real_cost(params[c]) for c in ids[200:]))
                                                              if fits_after else 0), rel=1e-6)
    if fits_after:
        assert r.exit_code == ExitCode.OK, r.output
        assert st["finished"] and st["counts"]["succeeded"] == 300 and emu.stats.batches_created == 2
        return
    # the rest still does not fit: stopped, saying what was spent and how to continue
    assert r.exit_code == ExitCode.BUDGET, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert f"spent ${cost_first:.6f}" in line and "200 rows paid so far, 100 not sent, nothing is in flight" in line
    assert st["state"] == "in progress" and st["counts"] == {**st["counts"], "succeeded": 200, "pending": 100}
    assert st["cost_usd"] == pytest.approx(float(cost_first), rel=1e-6)
    assert emu.stats.batches_created == 1
    need = re.search(r"run again with --max-cost ([0-9.]+) or more", line).group(1)
    assert Decimal(need) >= cost_first + max_rest > Decimal(budget)
    r = cli("run", *job_args(inp, tmp_path, "--max-cost", need))
    assert r.exit_code == ExitCode.OK, r.output
    assert status(cli, state)["counts"]["succeeded"] == 300


# ---- a budget read off the estimate passes, and reservations hold while running ------------------
def test_budget_of_the_estimates_maximum_runs_and_reservations_never_pass_it(emu, cli, tmp_path):
    inp = write_tickets(tmp_path / "t.csv", 300)
    state = tmp_path / "s.sqlite"
    args = job_args(inp, tmp_path, batch_size=100)
    r = cli("estimate", *args)
    assert r.exit_code == 0, r.output
    shown = re.search(r"cost \(min … max\)\s+\$[0-9.,]+ … \$([0-9.,]+)", r.output).group(1)
    est = json.loads(cli("estimate", *args, "--json").output)
    assert est["method"] == "sampled" and est["cost_usd_max"] <= float(shown)
    assert emu.stats.create_calls == 0
    budget = Decimal(shown)
    params = params_by_id(state)

    peaks = []

    def check(progress) -> None:
        """At every round: what was spent plus the most the rows in flight can still cost, within budget."""
        with Store(str(state)) as store:
            flying = [r["custom_id"] for r in store.q("SELECT custom_id FROM requests WHERE state = 'in_flight'")]
        peaks.append(spent(state) + sum((true_max(params[c]) for c in flying), Decimal(0)))
        assert peaks[-1] <= budget

    result = batchrun.run(dict(input=str(inp), output=str(tmp_path / "o.parquet"), state=str(state),
                               id_column="ticket_id", prompt=PROMPT, model="claude-haiku-4-5", max_tokens=300,
                               batch_size=100, poll_interval=0.1, max_cost=float(shown)), on_progress=check)
    assert result.exit_code == ExitCode.OK and result.counts == {"succeeded": 300}
    assert result.cost_usd <= float(budget)
    # each batch reserved the estimate's own figures for its rows: all three were sent at once, none cut
    assert emu.stats.batches_created == 3
    assert max(peaks) > budget * Decimal("0.5")


@pytest.mark.parametrize("mode", ["batch", "messages"])
def test_a_budget_of_the_printed_maximum_sends_every_row_of_a_sampled_job(emu, cli, tmp_path, mode):
    """600 rows (sampled: more than estimate.EXACT_LIMIT) whose sample comes out a little low (seed 9).
    The maximum prices the rows it did not count as their reservations do (padded), so a budget of the
    printed maximum runs every row, and that maximum stays above what the rows can really cost (it
    used to leave them unpadded: the job stopped with 52 rows unsent)."""
    inp = write_tickets(tmp_path / "t.csv", 600, seed=9)
    state = tmp_path / "s.sqlite"
    args = job_args(inp, tmp_path, "--mode", mode, *(["--concurrency", "8"] if mode == "messages" else []),
                    max_tokens=1)
    est = json.loads(cli("estimate", *args, "--json").output)
    assert est["method"] == "sampled" and est["requests"] == 600 > estimator.EXACT_LIMIT
    shown = re.search(r"cost \(min … max\)\s+\$[0-9.,]+ … \$([0-9.,]+)", cli("estimate", *args).output).group(1)
    r = cli("run", *args, "--max-cost", shown)
    assert r.exit_code == ExitCode.OK, r.output
    st = status(cli, state)
    assert st["finished"] and st["counts"]["succeeded"] == 600
    assert spent(state) <= Decimal(shown)
    params = params_by_id(state)
    assert sum(true_max(p, batch=mode == "batch") for p in params.values()) <= Decimal(str(est["cost_usd_max"]))


def test_budget_refused_up_front_names_the_whole_budget(emu, cli, tmp_path, tickets_csv):
    r = cli("run", *job_args(tickets_csv, tmp_path, "--max-cost", "0.001"))
    assert r.exit_code == ExitCode.BUDGET and emu.stats.create_calls == 0
    assert "of the $0.001 budget is left" in r.stderr and "450 rows still to send" in r.stderr
    assert "--max-cost" in r.stderr and "Traceback" not in r.output
    r = cli("run", *job_args(tickets_csv, tmp_path, "--max-cost", "0.25"))
    assert r.exit_code == ExitCode.BUDGET and "of the $0.25 budget" in r.stderr


def test_status_and_report_show_the_budget_of_the_latest_run(emu, cli, tmp_path, tickets_csv):
    state = tmp_path / "s.sqlite"
    assert cli("run", *job_args(tickets_csv, tmp_path, "--max-cost", "5", "--limit", "30")).exit_code == 0
    assert status(cli, state)["max_cost"] == 5
    assert "(budget $5.00)" in cli("status", "--state", state).output
    assert cli("run", *job_args(tickets_csv, tmp_path, "--max-cost", "0.125", "--limit", "30")).exit_code == 0
    assert status(cli, state)["max_cost"] == 0.125
    assert "(budget $0.125)" in cli("status", "--state", state).output
    jobs = json.loads(cli("jobs", "--state", state, "--json").output)
    assert jobs[0]["max_cost"] == 0.125
    assert cli("report", "--state", state, "--html", tmp_path / "r.html").exit_code == 0
    assert "of a $0.125 budget" in (tmp_path / "r.html").read_text(encoding="utf-8")


# ---- messages mode ------------------------------------------------------------------------------
class Watch(httpx.AsyncBaseTransport):
    """Forwards to the emulator, and at each request sent records the peak of what was really billed
    plus the most the requests on the wire can cost. With `fail`, the first send of one request in
    six fails that way: "timeout" and "500" after the emulator has run (and billed) it, "529" and
    "400" without sending it."""

    def __init__(self, fail: str = ""):
        self.inner = httpx.AsyncHTTPTransport()
        self.fail = fail
        self.spent = Decimal(0)
        self.on_wire = Decimal(0)
        self.peak = Decimal(0)
        self.sent = 0
        self.seen: set = set()
        self.failed = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        first = request.content not in self.seen
        self.seen.add(request.content)
        if self.fail and first and int(hashlib.sha256(request.content).hexdigest()[:8], 16) % 6 == 0:
            self.failed += 1
            if self.fail in ("529", "400"):
                kind = "overloaded_error" if self.fail == "529" else "invalid_request_error"
                return httpx.Response(int(self.fail), headers={"retry-after-ms": "1"},
                                      json={"type": "error", "error": {"type": kind, "message": "(test)"}})
        else:
            first = False
        params = json.loads(request.content)
        most = true_max(params, batch=False)
        self.on_wire += most
        self.peak = max(self.peak, self.spent + self.on_wire)
        self.sent += 1
        try:
            response = await self.inner.handle_async_request(request)
            await response.aread()
        finally:
            self.on_wire -= most
        usage = response.json()["usage"]
        self.spent += (usage["input_tokens"] * IN + usage["output_tokens"] * OUT) / MILLION
        if first and self.fail == "timeout":
            raise httpx.ReadTimeout("the reply was lost (test)", request=request)
        if first and self.fail == "500":
            return httpx.Response(500, headers={"retry-after-ms": "1"},
                                  json={"type": "error", "error": {"type": "api_error", "message": "(test)"}})
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_messages_mode_budget_refused_up_front(emu, cli, tmp_path, tickets_csv):
    r = cli("run", *job_args(tickets_csv, tmp_path, "--mode", "messages", "--max-cost", "0.01"))
    assert r.exit_code == ExitCode.BUDGET, r.output
    assert emu.stats.messages_calls == 0 and "of the $0.01 budget" in r.stderr


def test_messages_mode_never_passes_the_budget(emu, cli, tmp_path):
    """Replies that use all of max_tokens, requests that overlap on the wire: at every request sent, what
    was spent plus the most the requests on the wire can cost stays within a budget of the estimate's
    maximum, and every row is sent."""
    inp = write_tickets(tmp_path / "t.csv", 300, seed=9)
    state = tmp_path / "s.sqlite"
    args = job_args(inp, tmp_path, "--mode", "messages", "--concurrency", "8", max_tokens=6)
    est = json.loads(cli("estimate", *args, "--json").output)
    params = params_by_id(state)
    assert all(reply_for(p)["usage"]["output_tokens"] == 6 for p in params.values())   # replies use it all
    budget = Decimal(str(est["cost_usd_max"]))
    emu.config.latency = 0.005                                # requests overlap on the wire
    watch = Watch()
    result = batchrun.run(dict(input=str(inp), output=str(tmp_path / "o.parquet"), state=str(state),
                               id_column="ticket_id", prompt=PROMPT, model="claude-haiku-4-5", max_tokens=6,
                               mode="messages", concurrency=8, max_cost=float(budget)), async_transport=watch)
    assert result.exit_code == ExitCode.OK and result.counts == {"succeeded": 300} and watch.sent == 300
    assert float(spent(state)) == pytest.approx(float(watch.spent), rel=1e-9) and watch.peak <= budget


@pytest.mark.parametrize("fail", ["timeout", "500", "529", "400"])
def test_messages_mode_counts_a_send_that_may_have_run_as_spent(emu, cli, tmp_path, fail):
    """120 rows (counted exactly), replies that use all of max_tokens, a budget of exactly the estimate's
    maximum. The first send of one request in six fails. After a timeout or a 500 the request may have
    run and been billed (here it was): its reservation stays spent and sending it again reserves again,
    so the job stops short of the budget instead of passing it (it used to give the reservation back
    and finish every row, billed ~15% over the budget). A 529 or a 400 proves the request was not run:
    its reservation is given back, and every row is sent."""
    inp = write_tickets(tmp_path / "t.csv", 120, seed=9)
    state = tmp_path / "s.sqlite"
    spec = dict(input=str(inp), output=str(tmp_path / "o.parquet"), state=str(state), id_column="ticket_id",
                prompt=PROMPT, model="claude-haiku-4-5", max_tokens=6, mode="messages", concurrency=8)
    est = json.loads(cli("estimate", *job_args(inp, tmp_path, "--mode", "messages", max_tokens=6), "--json").output)
    budget = Decimal(str(est["cost_usd_max"]))
    params = params_by_id(state)
    assert est["method"] == "exact" and budget == sum(real_cost(p, batch=False) for p in params.values())
    watch = Watch(fail)

    def run():
        return batchrun.run({**spec, "max_cost": float(budget)}, async_transport=watch, retry=RetryPolicy(max_wait=0.01))

    if fail in ("529", "400"):
        result = run()
        assert result.counts == ({"succeeded": 120} if fail == "529" else {"succeeded": 120 - watch.failed,
                                                                            "errored": watch.failed})
    else:
        with pytest.raises(BudgetError) as stop:
            run()
        assert "--max-cost" in str(stop.value)
        st = status(cli, state)
        assert st["counts"]["pending"] > 0 and st["counts"]["succeeded"] + st["counts"]["pending"] == 120
    assert watch.failed > 10 and watch.spent <= budget and watch.peak <= budget
