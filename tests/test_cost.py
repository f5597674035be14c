"""Issue 6: estimate before paying, budgets, status."""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from decimal import ROUND_CEILING, Decimal

import httpx
import pyarrow.parquet as pq
import pytest

import batchrun
from batchrun.api import RetryPolicy
from batchrun.emulator.replies import count_tokens
from batchrun.errors import ExitCode, GaveUpError
from batchrun.store import Store
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


# ---- helpers for the tests below -------------------------------------------------------------------
QUICK = RetryPolicy(max_retries=1, max_elapsed=2)   # a refused create gives up at once


class RefuseCreates(httpx.BaseTransport):
    """Forwards to the emulator over loopback, but answers batch creates after the first `allow` with
    529 overloaded (a reply that proves no batch was made): their rows stay pending."""

    def __init__(self, allow: int):
        self.inner = httpx.HTTPTransport()
        self.allow = allow

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith("/v1/messages/batches"):
            if self.allow <= 0:
                return httpx.Response(529, headers={"retry-after": "0"}, json={
                    "type": "error", "error": {"type": "overloaded_error", "message": "overloaded (test)"}})
            self.allow -= 1
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def library_job(inp, tmp_path, **extra) -> dict:
    return dict(input=str(inp), output=str(tmp_path / "o.parquet"), state=str(tmp_path / "s.sqlite"),
                id_column="ticket_id", prompt=PROMPT, model="claude-haiku-4-5", max_tokens=300, batch_size=100,
                poll_interval=0.1, **extra)


def first_rows(tickets_csv, tmp_path, n: int):
    """The first n rows of the tickets as a file of their own."""
    import pyarrow.csv as pacsv
    table = pacsv.read_csv(tickets_csv, parse_options=pacsv.ParseOptions(newlines_in_values=True)).slice(0, n)
    path = tmp_path / f"first-{n}.parquet"
    pq.write_table(table, path)
    return path


def pending_params(state) -> list:
    with Store(str(state)) as store:
        pending = {r["custom_id"] for r in store.q("SELECT custom_id FROM requests WHERE state = 'pending'")}
        return [p for _, cid, p in store.params() if cid in pending]


def ceil8(x: Decimal) -> float:
    return float(x.quantize(Decimal("0.00000001"), rounding=ROUND_CEILING))


# ---- estimate ---------------------------------------------------------------------------------------
def test_estimate_of_a_partly_done_job_prices_only_what_remains(emu, cli, tmp_path, tickets_csv):
    """300 rows: the first batch of 100 is collected (about a fifth errored, one attempt), the other
    creates were refused; the estimate then shows done / failed and prices the 200 rows left."""
    inp = first_rows(tickets_csv, tmp_path, 300)
    emu.config.errored_rate = 0.2
    emu.config.errored_types = ("invalid_request_error",)      # final (the service's errors are sent again)
    spec = library_job(inp, tmp_path, max_attempts=1)
    assert batchrun.run(spec, wait=False, transport=RefuseCreates(1), retry=QUICK).exit_code == ExitCode.IN_PROGRESS
    time.sleep(0.2)                                             # the batch ends (0.05 s)
    with pytest.raises(GaveUpError):           # collects the batch, then no create is taken
        batchrun.run(spec, wait=False, transport=RefuseCreates(0), retry=QUICK)
    result = json.loads(cli("status", "--state", tmp_path / "s.sqlite", "--json").output)[0]
    assert result["counts"]["pending"] == 200 and not result["counts"]["in_flight"]
    succeeded, errored = result["counts"]["succeeded"], result["counts"]["errored"]
    assert succeeded + errored == 100 and errored > 0
    calls = emu.stats.count_tokens_calls

    args = ["--input", inp, "--output", tmp_path / "o.parquet", "--state", tmp_path / "s.sqlite", "--id-column",
            "ticket_id", "--prompt", PROMPT, "--model", "claude-haiku-4-5", "--max-tokens", "300", "--batch-size",
            "100", "--max-attempts", "1"]
    est = json.loads(cli("estimate", *args, "--json").output)
    left = pending_params(tmp_path / "s.sqlite")
    assert len(left) == 200
    tokens = sum(count_tokens(p) for p in left)
    assert est["done"] == succeeded and est["failed"] == errored and est["in_flight"] == 0
    assert est["requests"] == est["remaining"] == 200 and est["method"] == "exact"
    assert est["input_tokens"] == tokens                        # only the rows left, each counted
    assert emu.stats.count_tokens_calls - calls >= 200
    assert est["cost_usd_min"] == pytest.approx(tokens * 1.0 / 1e6 / 2, rel=1e-9)
    assert est["cost_usd_max"] == ceil8((Decimal(tokens) + 200 * 300 * 5) / Decimal(10 ** 6) / 2)
    assert est["spent_usd"] == pytest.approx(result["cost_usd"]) and est["spent_usd"] > 0
    text = cli("estimate", *args).output
    assert f"rows done / failed / in flight  {succeeded} / {errored} / 0" in text
    assert "requests to send                200" in text
    assert emu.stats.batches_created == 1                        # the estimate created none


def test_estimate_counts_with_the_jobs_own_tokenizer(emu, cli, tmp_path, tickets_csv):
    """Haiku 5.5 counts about 30% more tokens than Haiku 4.5 for the same text."""
    counts = {}
    for model in ("claude-haiku-4-5", "claude-haiku-5-5"):
        args = [*job(tickets_csv, tmp_path, "--limit", "40")]
        args[args.index("claude-haiku-4-5")] = model
        args[args.index("--max-tokens") + 1] = "2000"           # room for Haiku 5.5's thinking
        r = cli("estimate", *args, "--json")
        assert r.exit_code == 0, r.output
        est = json.loads(r.output)
        assert est["model"] == model and est["method"] == "exact"
        with Store(str(tmp_path / "s.sqlite")) as store:
            jid = [j["id"] for j in store.find_jobs() if j["model"] == model][0]
            assert est["input_tokens"] == sum(count_tokens(p) for _, _, p in store.params(jid))
        counts[model] = est["input_tokens"]
    assert 1.25 <= counts["claude-haiku-5-5"] / counts["claude-haiku-4-5"] <= 1.35


def test_estimate_bracket_with_a_cached_system_prompt(emu, cli, tmp_path, tickets_csv):
    """cache_system: the minimum counts the system prompt as cache reads (one write), the maximum as
    cache writes; the run's real cost, with its one write and its reads, lies inside."""
    system = "Policy: " + "billing " * 700                     # 1,403 tokens: cacheable on Sonnet 4.5 (1,024)
    base = [*job(tickets_csv, tmp_path, "--limit", "40", "--system", system)]
    base[base.index("claude-haiku-4-5")] = "claude-sonnet-4-5"
    plain = json.loads(cli("estimate", *base, "--json").output)
    # (the 5-minute cache, asked for: batch jobs cache for an hour by default)
    cached = json.loads(cli("estimate", *base, "--cache-system", "--cache-ttl", "5m", "--json").output)
    assert cached["system_tokens"] == 2 + 1 + 2 * 700 == 1403     # Poli|cy, ":", bill|ing × 700
    n, sys_t, rest = 40, 1403, cached["input_tokens"] - 40 * 1403
    # Sonnet 4.5 per million: input 3, output 15, cache write (5 m) 3.75, cache read 0.30; batch: half
    low = (rest * 3 + (n - 1) * sys_t * Decimal("0.30") + sys_t * Decimal("3.75")) / Decimal(10 ** 6) / 2
    high = (rest * 3 + n * sys_t * Decimal("3.75") + n * 300 * 15) / Decimal(10 ** 6) / 2
    assert cached["cost_usd_min"] == pytest.approx(float(low), rel=1e-6)
    assert cached["cost_usd_max"] == pytest.approx(float(high), rel=1e-6)
    assert cached["cost_usd_min"] < plain["cost_usd_min"] and cached["cost_usd_max"] > plain["cost_usd_max"]
    assert cached["input_tokens"] == plain["input_tokens"]
    r = cli("run", *base, "--cache-system", "--cache-ttl", "5m")
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert sum(row["cache_creation_input_tokens"] for row in rows) == sys_t          # one write
    assert sum(row["cache_read_input_tokens"] for row in rows) == (n - 1) * sys_t    # the others read
    cost = sum(row["cost_usd"] for row in rows)
    assert cached["cost_usd_min"] <= cost <= cached["cost_usd_max"]


# ---- the end-of-run summary, jobs and status ------------------------------------------------------
def test_run_summary_groups_failures_by_cause(emu, cli, tmp_path, tickets_csv):
    emu.config.errored_rate = 0.15
    emu.config.errored_types = ("invalid_request_error",)      # final (the service's errors are sent again)
    emu.config.expired_rate = 0.1
    r = cli("run", *job(tickets_csv, tmp_path, "--max-attempts", "1"))
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    by_status = Counter(row["status"] for row in rows)
    causes = Counter(row["error_type"] for row in rows if row["status"] != "succeeded")
    assert set(causes) == {"invalid_request_error", "expired"}
    names = {"invalid_request_error": "invalid request (invalid_request_error)", "expired": "expired"}
    expected = ", ".join(f"{n} {names[t]}" for t, n in sorted(causes.items(), key=lambda kv: (-kv[1], kv[0])))
    lines = r.stderr.splitlines()
    head = [l for l in lines if l.startswith("job ") and "finished after" in l]
    assert head and head[0].endswith(f"{by_status['succeeded']} succeeded, {by_status['errored']} errored, "
                                     f"{by_status['expired']} expired")
    assert f"  failures: {expected}" in lines
    cost = sum(row["cost_usd"] for row in rows if row["status"] == "succeeded")
    (line,) = [l for l in lines if l.startswith("  cost: ")]
    total, *kinds = map(float, re.fullmatch(r"  cost: \$([0-9.]+) \(input \$([0-9.]+), output \$([0-9.]+), "
                                            r"cache write \$([0-9.]+), cache read \$([0-9.]+)\)", line).groups())
    assert total == pytest.approx(cost, abs=1e-6) and sum(kinds) == pytest.approx(total, abs=4e-6)


def test_jobs_and_status_in_plain_text(emu, cli, tmp_path, tickets_csv):
    """One job with a batch collected (some rows expired) and one in flight; another only estimated."""
    inp = first_rows(tickets_csv, tmp_path, 200)
    state = tmp_path / "s.sqlite"
    emu.config.expired_rate = 0.3
    spec = library_job(inp, tmp_path, max_attempts=1, name="tickets")
    batchrun.run(spec, wait=False, transport=RefuseCreates(1), retry=QUICK)
    time.sleep(0.2)
    with pytest.raises(GaveUpError):                     # collects the first batch, sends nothing
        batchrun.run(spec, wait=False, transport=RefuseCreates(0), retry=QUICK)
    emu.config.processing_seconds = 3600                        # the second batch stays in flight
    args = ["--input", inp, "--output", tmp_path / "o.parquet", "--state", state, "--id-column", "ticket_id",
            "--prompt", PROMPT, "--model", "claude-haiku-4-5", "--max-tokens", "300", "--batch-size", "100",
            "--max-attempts", "1", "--name", "tickets"]
    assert cli("run", *args, "--no-wait").exit_code == ExitCode.IN_PROGRESS
    other = ["--input", inp, "--output", tmp_path / "p.parquet", "--state", state, "--prompt", "Tag: {{ body }}",
             "--model", "claude-haiku-4-5", "--max-tokens", "50", "--limit", "50"]
    assert cli("estimate", *other).exit_code == 0

    jobs = {j["name"] or "-": j for j in json.loads(cli("jobs", "--state", state, "--json").output)}
    live, planned = jobs["tickets"], jobs["-"]
    c = live["counts"]
    assert c["in_flight"] == 100 and c["expired"] > 0 and c["succeeded"] + c["expired"] == 100
    assert live["state"] == "in progress" and planned["state"] == "planned" and not planned["finished"]
    text = cli("jobs", "--state", state).output.splitlines()
    assert sorted(text) == sorted([
        f"{live['job_id'][:12]}  tickets               claude-haiku-4-5       100/200 rows  in progress  "
        f"${live['cost_usd']:.4f}",
        f"{planned['job_id'][:12]}  -                     claude-haiku-4-5       0/50 rows  "
        "planned (nothing sent yet)  $0.0000"])

    out = cli("status", "--state", state).output.splitlines()
    at = out.index(f"job {live['job_id'][:12]} (tickets): in progress")
    assert out[at + 2] == f"  rows: 100 in flight, {c['succeeded']} succeeded, {c['expired']} expired (of 200)"
    batches = [l for l in out[at:] if l.startswith("  batch ")][:2]
    assert re.fullmatch(r"  batch msgbatch_\w+: ended, 100 requests", batches[0])
    assert re.fullmatch(r"  batch msgbatch_\w+: in_progress, 100 requests", batches[1])
    assert f"job {planned['job_id'][:12]}: planned (nothing sent yet)" in out
    assert "  rows: 50 pending (of 50)" in out
    one = json.loads(cli("status", planned["job_id"][:12], "--state", state, "--json").output)
    assert one["state"] == "planned" and one["batches"] == []


def test_the_estimator_keeps_no_request_bodies(emu, tmp_path):
    """It remembers each counted request's tokens by a digest of its body: rows with large cells
    (a document, an image's base64) are not kept in memory by the estimate of a run."""
    from batchrun.runner import Runner
    path = tmp_path / "docs.csv"
    with open(path, "w", encoding="utf-8") as f:
        f.write("doc_id,text\n")
        for i in range(30):
            f.write(f"d{i},{'word ' * 40_000}{i}\n")                # 200 kB a row
    spec = batchrun.JobSpec.from_mapping({"input": str(path), "output": str(tmp_path / "o.parquet"),
                                          "state": str(tmp_path / "s.sqlite"), "id_column": "doc_id",
                                          "prompt": "Summarise: {{ text }}", "model": "claude-haiku-4-5",
                                          "max_tokens": 100})
    runner = Runner(spec, api_key="sk-ant-test-0123456789", base_url=emu.base_url)
    try:
        est = runner.estimate()
        counted = runner.estimator._counted
        assert est.method == "exact" and len(counted) == 30
        assert sum(len(key) for key in counted) < 30 * 100
        with Store(str(tmp_path / "s.sqlite")) as store:
            tokens = sum(count_tokens(p) for _, _, p in store.params())
        assert est.input_tokens == sum(counted.values()) == tokens
    finally:
        runner.close()


def test_the_maximum_and_the_reservations_take_each_rows_own_max_tokens(emu, cli, tmp_path):
    """max_tokens_column: each row's maximum is priced at its own max_tokens (the job's where the cell
    is empty); a budget of exactly that maximum sends every row."""
    path = tmp_path / "t.csv"
    path.write_text("id,body,budget\n" + "".join(f"{i},ticket {i} says hello,{'' if i % 3 else 10 + i}\n"
                                                 for i in range(30)))
    args = ["--input", path, "--output", tmp_path / "o.parquet", "--state", tmp_path / "s.sqlite", "--id-column",
            "id", "--prompt", "Tag: {{ body }}", "--model", "claude-haiku-4-5", "--max-tokens", "60",
            "--max-tokens-column", "budget", "--poll-interval", "0.1"]
    est = json.loads(cli("estimate", *args, "--json").output)
    with Store(str(tmp_path / "s.sqlite")) as store:
        params = [p for _, _, p in store.params()]
    assert sorted({p["max_tokens"] for p in params})[:2] == [10, 13] and 60 in {p["max_tokens"] for p in params}
    most = sum(Decimal(count_tokens(p)) + p["max_tokens"] * 5 for p in params) / Decimal(10 ** 6) / 2
    assert est["method"] == "exact" and est["cost_usd_max"] == ceil8(most)
    r = cli("run", *args, "--max-cost", str(est["cost_usd_max"]))
    assert r.exit_code == 0, r.output
    assert json.loads(cli("status", "--state", tmp_path / "s.sqlite", "--json").output)[0]["counts"]["succeeded"] == 30


# ---- one cache minimum (spec.cache_minimum) --------------------------------------------------------
def _estimate(model: str, cache_system: bool, system_tokens: int):
    """An estimate of three rows by the estimator alone: handed the store's figures and a count_tokens
    (here a fake counting `system_tokens` for the system prompt and 50 for the rest), no runner."""
    from batchrun.estimator import Estimator
    from batchrun.models import load_catalog
    from batchrun.spec import JobSpec
    from batchrun.store import JobFigures
    catalog = load_catalog()
    spec = JobSpec.from_mapping({"input": "in.csv", "output": "o.parquet", "prompt": "{{ body }}", "model": model,
                                 "max_tokens": 300, "cache_system": cache_system, "system": "x " * system_tokens * 2})
    body = json.dumps({"model": model, "max_tokens": 300, "system": [{"type": "text", "text": spec.system}],
                       "messages": [{"role": "user", "content": "hi"}]})
    count = lambda params, retry: 50 + (system_tokens if params.get("system") else 0)   # noqa: E731
    estimator = Estimator(spec, catalog, catalog.resolve(model), count_tokens=count,
                          figures=lambda: JobFigures(counts={"pending": 3}, first=body, pending=[body] * 3),
                          sample=lambda: [body] * 3)
    return spec, catalog.resolve(model), estimator.estimate()


def test_a_cache_minimum_not_known_is_not_primed_and_its_estimate_spans_both_outcomes():
    """The minimum cacheable prompt is read once (spec.cache_minimum / prefix_cached) by priming, pricing
    and warnings. A model whose minimum the catalog does not know (claude-sonnet-5-5) may or may not have
    its prefix cached: it is not primed (a primer would hold the job back for a cache that may never be
    written), and its estimate spans both outcomes — the minimum reads the prefix, the maximum writes it
    for every request. They disagreed: priming took an unknown minimum as none (and primed), the
    estimator as 1024 (a 600-token prefix was priced as never written, the maximum below what a model
    that caches it costs)."""
    from batchrun.job import warnings_for
    from batchrun.spec import cache_minimum, prefix_cached, primes_cache
    spec, unknown, cached = _estimate("claude-sonnet-5-5", True, 600)
    _, _, plain = _estimate("claude-sonnet-5-5", False, 600)
    assert cache_minimum(unknown) is None and cache_minimum(None) is None
    assert prefix_cached(600, unknown) is None and prefix_cached(0, unknown) is False
    assert not primes_cache(spec, unknown)
    assert any("is not known" in w for w in warnings_for(spec, unknown))
    assert cached.cost_usd_min < plain.cost_usd_min and cached.cost_usd_max > plain.cost_usd_max
    assert "not known" in cached.cache and "not primed" in cached.cache
    # a known minimum the prefix is below: never cached, priced as plain input, not primed
    spec, known, below = _estimate("claude-sonnet-4-5", True, 600)
    _, _, plain = _estimate("claude-sonnet-4-5", False, 600)
    assert cache_minimum(known) == 1024 and prefix_cached(600, known) is False and not primes_cache(spec, known)
    assert (below.cost_usd_min, below.cost_usd_max, below.cache) == (plain.cost_usd_min, plain.cost_usd_max, None)
    # and above it: cached (one write, then reads), primed
    spec, known, above = _estimate("claude-sonnet-4-5", True, 1500)
    _, _, plain = _estimate("claude-sonnet-4-5", False, 1500)
    assert prefix_cached(1500, known) is True and primes_cache(spec, known)
    assert above.cost_usd_min < plain.cost_usd_min and above.cost_usd_max > plain.cost_usd_max
