"""Prices have one home (issue 16): `Catalog.cost_by_kind` prices a reply per token kind (input, output,
cache write 5m, cache write 1h, cache read); a row's cost_usd is its total; status, the run summary and
the report sum the same figures over a job's rows, so that they add up to its cost, with every cache write
priced at the rate of the lifetime its reply reported (stored per row since m010_cache_write_split)."""
from __future__ import annotations

import json
import re
from decimal import Decimal

import pyarrow.parquet as pq
import pytest

from batchrun.models import CostByKind, load_catalog
from batchrun.report import build_report_data, render_report
from batchrun.results import ResultParser
from batchrun.store import PARSED_FIELDS, Store, now_iso
from batchrun.summary import cache_saved, cost_by_kind, find_job, job_pricing
from tests.conftest import PROMPT

CATALOG = load_catalog()
M = Decimal(1_000_000)


def usage(i: int, o: int, *, w5: int = 0, w1: int = 0, unsplit: int = 0, r: int = 0) -> dict:
    """A reply's usage; its cache writes split by lifetime when w5 or w1 is given."""
    u = {"input_tokens": i, "output_tokens": o, "cache_creation_input_tokens": w5 + w1 + unsplit,
         "cache_read_input_tokens": r}
    if w5 or w1:
        u["cache_creation"] = {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1}
    return u


USAGES = [usage(0, 0), usage(120, 40), usage(90, 33, w5=4100), usage(80, 12, w1=4100), usage(70, 9, r=4100),
          usage(60, 20, w5=1000, w1=3000, r=500), usage(50, 5, unsplit=2000), usage(40, 7, w1=500, unsplit=700),
          usage(150_000, 300, w1=20_000, r=1000)]   # (above the 100k tier of claude-haiku-5-5)


# ---- one reply -------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["claude-haiku-4-5", "claude-haiku-5-5", "claude-opus-5"])
@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("ttl", ["5m", "1h"])
def test_a_replys_kinds_add_up_to_its_cost(model, batch, ttl):
    for u in USAGES:
        kinds = CATALOG.cost_by_kind(model, u, batch=batch, cache_ttl=ttl)
        assert kinds.total == CATALOG.cost(model, u, batch=batch, cache_ttl=ttl), u
        assert sum(kinds.shown().values()) == pytest.approx(float(kinds.total), rel=1e-12)


def test_each_kind_at_its_own_rate():
    p = CATALOG.resolve("claude-haiku-4-5").prices
    kinds = CATALOG.cost_by_kind("claude-haiku-4-5", usage(100, 10, w5=1000, w1=3000, unsplit=500, r=200),
                                 batch=False, cache_ttl="5m")
    assert kinds.input == 100 * p.input / M and kinds.output == 10 * p.output / M
    assert kinds.cache_write_5m == 1500 * p.cache_write_5m / M   # what the split does not account for: at cache_ttl
    assert kinds.cache_write_1h == 3000 * p.cache_write_1h / M
    assert kinds.cache_read == 200 * p.cache_read / M
    assert kinds.cache_saved == 4700 * p.input / M - kinds.cache_write - kinds.cache_read
    half = CATALOG.cost_by_kind("claude-haiku-4-5", usage(100, 10, w1=3000), batch=True, cache_ttl="5m")
    assert half.cache_write_1h == 3000 * p.cache_write_1h / M / 2 and half.cache_write_5m == 0
    assert CATALOG.cost_by_kind("no-such-model", usage(1, 1), batch=True) is None
    assert CostByKind() + kinds == kinds


# ---- a job's rows --------------------------------------------------------------------------------
def stored_job(path, model: str, usages: list, *, ttl: str = "5m", mode: str = "batch") -> Store:
    """A state file with one job whose rows hold the replies of `usages`, recorded as a run records them
    (ResultParser's fields, PARSED_FIELDS)."""
    parser = ResultParser(CATALOG, model, schema=None, batch=mode == "batch", cache_ttl=ttl)
    store = Store(str(path))
    jid = "cd" * 32
    spec = {"input": "in.csv", "output": "out.parquet", "prompt": "{{ x }}", "model": model, "mode": mode,
            "cache_ttl": ttl, "max_tokens": 1000}
    columns = ", ".join(PARSED_FIELDS)
    with store.transaction() as c:
        c.execute("INSERT INTO jobs (id, spec, input, output, input_fingerprint, mode, model, rows, created_at, "
                  "planned_at, finished_at) VALUES (?, ?, 'in.csv', 'out.parquet', 'fp', ?, ?, ?, ?, ?, ?)",
                  (jid, json.dumps(spec), mode, model, len(usages), now_iso(), now_iso(), now_iso()))
        for i, u in enumerate(usages):
            fields = parser.parse({"type": "succeeded", "message": {
                "model": model, "stop_reason": "end_turn", "content": [{"type": "text", "text": "ok"}], "usage": u}})
            c.execute("INSERT INTO bodies (id, body) VALUES (?, '{}')", (i + 1,))
            c.execute(f"INSERT INTO requests (job_id, custom_id, row_index, params_hash, body_id, state, attempts, "
                      f"{columns}) VALUES (?, ?, ?, ?, ?, 'succeeded', 1, {', '.join('?' * len(PARSED_FIELDS))})",
                      (jid, f"row-{i}", i, f"h{i}", i + 1, *(fields.get(k) for k in PARSED_FIELDS)))
    return store


@pytest.mark.parametrize("model", ["claude-haiku-4-5", "claude-haiku-5-5"])
@pytest.mark.parametrize("mode", ["batch", "messages"])
def test_a_jobs_kinds_add_up_to_its_cost_with_writes_of_both_lifetimes(tmp_path, model, mode):
    """A 5m job whose replies also wrote the 1-hour cache (and, on claude-haiku-5-5, prompts on both sides of
    its 100k tier): the sum over kinds is the sum of the rows' cost_usd. Priced at the job's cache_ttl, as
    the summary once did, the 1h writes would have cost less than they did."""
    batch = mode == "batch"
    with stored_job(tmp_path / "s.sqlite", model, USAGES * 3, mode=mode) as store:
        job = find_job(store, None)
        paid = sum(r["cost_usd"] for r in store.q("SELECT cost_usd FROM requests"))
        pricing = job_pricing(store, job["id"], CATALOG, model, batch=batch, cache_ttl="5m")
        kinds = cost_by_kind(store, job["id"], CATALOG, model, batch=batch, cache_ttl="5m")
        saved = cache_saved(store, job["id"], CATALOG, model, batch=batch, cache_ttl="5m")
        splits = store.q("SELECT cache_creation_5m_input_tokens AS w5, cache_creation_1h_input_tokens AS w1 "
                         "FROM requests ORDER BY row_index")
        data = build_report_data(store, job)
    assert set(kinds) == {"input", "output", "cache_write", "cache_read"}
    assert sum(kinds.values()) == pytest.approx(paid, rel=1e-12)
    expected = sum((CATALOG.cost_by_kind(model, u, batch=batch, cache_ttl="5m") for u in USAGES * 3), CostByKind())
    assert pricing == expected                                       # exact: the same Decimal figures
    assert saved == pytest.approx(float(expected.cache_saved), rel=1e-12)
    assert pricing.cache_write_1h > 0 and pricing.cache_write_5m > 0
    as_5m = sum(CATALOG.cost(model, {k: v for k, v in u.items() if k != "cache_creation"}, batch=batch)
                for u in USAGES * 3)
    assert float(as_5m) < paid                                       # what ignoring the split would have said
    # the split is stored per row, as each reply reported it (None: not split)
    assert splits[:9] == [{"w5": (u.get("cache_creation") or {}).get("ephemeral_5m_input_tokens"),
                           "w1": (u.get("cache_creation") or {}).get("ephemeral_1h_input_tokens")} for u in USAGES]
    # the report shows the same figures, the cache writes told by lifetime
    assert data["cost_by_kind"] == kinds and data["cost_usd"] == pytest.approx(paid, rel=1e-9)
    assert data["cache_write_by_ttl"] == pricing.cache_write_by_ttl()
    assert re.search(r"cache write: \$[0-9.,]+ · [0-9,]+ tokens \(\$[0-9.,]+ 5m, \$[0-9.,]+ 1h\)",
                     render_report(data))


def test_status_prints_the_cost_by_kind(tmp_path, cli):
    store = stored_job(tmp_path / "s.sqlite", "claude-haiku-4-5", USAGES)
    store.close()
    data = json.loads(cli("status", "--state", tmp_path / "s.sqlite", "--json").output)[0]
    assert sum(data["cost_by_kind"].values()) == pytest.approx(data["cost_usd"], rel=1e-9)
    assert sum(data["cache_write_by_ttl"].values()) == pytest.approx(data["cost_by_kind"]["cache_write"], rel=1e-12)
    text = cli("status", "--state", tmp_path / "s.sqlite").output
    (line,) = [l for l in text.splitlines() if l.startswith("  cost by kind: ")]
    figures = [float(v) for v in re.findall(r"(?:input|output|cache write|cache read) \$([0-9.]+)", line)]
    assert len(figures) == 4 and sum(figures) == pytest.approx(data["cost_usd"], abs=4e-6)
    assert re.search(r"cache write \$[0-9.]+ \(5m \$[0-9.]+, 1h \$[0-9.]+\)", line), line


def test_a_job_nothing_paid_for_costs_zero_of_each_kind(tmp_path):
    with stored_job(tmp_path / "s.sqlite", "claude-haiku-4-5", []) as store:
        pricing = job_pricing(store, "cd" * 32, CATALOG, "claude-haiku-4-5", batch=True, cache_ttl="1h")
    assert pricing == CostByKind() and pricing.total == 0


# ---- over the emulator: both ways a reply is recorded --------------------------------------------------
GUIDE = "\n".join(f"Rule {i}: label the ticket by its main request, and say why in one line." for i in range(300))


@pytest.mark.parametrize("mode, ttl", [("batch", "1h"), ("messages", "5m"), ("messages", "1h")])
def test_cache_writes_are_recorded_and_priced_by_lifetime(emu, cli, tmp_path, tickets_csv, mode, ttl):
    """Batch collect and messages mode both store each reply's split; the run summary, status and the
    report give the cost by kind that adds up to the job's cost, its cache writes at their lifetime's rate."""
    guide = tmp_path / "guide.txt"
    guide.write_text(GUIDE, encoding="utf-8")
    state, out = tmp_path / "s.sqlite", tmp_path / "o.parquet"
    r = cli("run", "--input", tickets_csv, "--output", out, "--state", state, "--id-column", "ticket_id",
            "--prompt", PROMPT, "--model", "claude-haiku-4-5", "--max-tokens", 50, "--limit", 12,
            "--batch-size", 6, "--system-file", guide, "--cache-system", "--cache-ttl", ttl, "--mode", mode,
            "--poll-interval", "0.05")
    assert r.exit_code == 0, r.output
    rows = pq.read_table(out).to_pylist()
    assert any(row["cache_creation_input_tokens"] for row in rows)
    with Store(str(state)) as store:
        stored = store.q("SELECT cache_creation_input_tokens AS w, cache_creation_5m_input_tokens AS w5, "
                         "cache_creation_1h_input_tokens AS w1 FROM requests")
        report = build_report_data(store, find_job(store, None))
    other = "5m" if ttl == "1h" else "1h"
    for row in stored:
        assert row[f"w{ttl[:-1]}"] == row["w"] and row[f"w{other[:-1]}"] == 0, row
    total = sum(row["cost_usd"] for row in rows)
    (line,) = [l for l in r.stderr.splitlines() if l.startswith("  cost: ")]
    shown, *kinds = map(float, re.fullmatch(r"  cost: \$([0-9.]+) \(input \$([0-9.]+), output \$([0-9.]+), "
                                            r"cache write \$([0-9.]+), cache read \$([0-9.]+)\)", line).groups())
    assert shown == pytest.approx(total, abs=1e-6) and sum(kinds) == pytest.approx(total, abs=4e-6)
    data = json.loads(cli("status", "--state", state, "--json").output)[0]
    assert sum(data["cost_by_kind"].values()) == pytest.approx(data["cost_usd"], rel=1e-9)
    assert data["cache_write_by_ttl"][other] == 0 and data["cache_write_by_ttl"][ttl] > 0
    p = CATALOG.resolve("claude-haiku-4-5").prices
    rate = p.cache_write_1h if ttl == "1h" else p.cache_write_5m
    written = sum(row["w"] for row in stored)
    scale = Decimal("0.5") if mode == "batch" else Decimal(1)
    assert data["cache_write_by_ttl"][ttl] == pytest.approx(float(written * rate / M * scale), rel=1e-12)
    assert report["cost_by_kind"] == data["cost_by_kind"]
