"""What a state file knows about its jobs: rows by status, batches, tokens and cost."""
from __future__ import annotations

import json
import os
from decimal import Decimal
from typing import Optional

from .errors import InputError
from .store import Store

ROW_STATES = ("pending", "in_flight", "succeeded", "errored", "expired", "canceled", "invalid_output")


# rows whose reply this job paid for (a reply that did not fit the schema was paid for too)
PAID = "state IN ('succeeded', 'invalid_output') AND reused_from IS NULL"


def job_cost(store: Store, job_id: str) -> Optional[float]:
    """What the job has spent, from the usage of every reply it paid for; None if any is unpriced."""
    row = store.one(f"SELECT sum(cost_usd) AS c, count(*) FILTER (WHERE cost_usd IS NULL) AS unknown "
                    f"FROM requests WHERE job_id = ? AND {PAID}", (job_id,))
    if row["unknown"]:
        return None
    return round(row["c"] or 0.0, 10)


def budget_text(max_cost: float) -> str:
    """A budget as given, with every digit it has: $5.00, $0.16, $0.001."""
    d = Decimal(str(max_cost))
    return f"${d:.2f}" if d == d.quantize(Decimal("0.01")) else f"${d.normalize():f}"


def job_state(finished: bool, canceled: bool, counts: dict, sent: bool) -> str:
    """finished, canceled, planned (nothing sent yet: only planned or estimated) or in progress."""
    if finished:
        return "finished"
    if canceled:
        return "canceled"
    if not sent and not counts.get("in_flight"):
        return "planned"
    return "in progress"


def job_status(store: Store, job: dict) -> dict:
    jid = job["id"]
    counts = {s: 0 for s in ROW_STATES}
    counts.update(store.counts(jid))
    # tokens this job paid for: rows reused from another job's answers were paid there
    tokens = store.one(
        "SELECT coalesce(sum(input_tokens),0) AS input, coalesce(sum(output_tokens),0) AS output, "
        "coalesce(sum(cache_creation_input_tokens),0) AS cache_write, "
        "coalesce(sum(cache_read_input_tokens),0) AS cache_read "
        f"FROM requests WHERE job_id = ? AND {PAID}", (jid,))
    reused = store.one("SELECT count(*) AS n FROM requests WHERE job_id = ? AND reused_from IS NOT NULL", (jid,))["n"]
    batches = [
        {"batch_id": b["api_id"], "state": b["state"], "api_status": b["api_status"],
         "requests": b["request_count"], "created_at": b["created_at"], "ended_at": b["ended_at"],
         "request_counts": json.loads(b["request_counts"]) if b["request_counts"] else None,
         "adopted": bool(b["adopted"]), "primer": bool(b["primer"]), "note": b["note"]}
        for b in store.q("SELECT * FROM batches WHERE job_id = ? AND state != 'abandoned' ORDER BY id", (jid,))]
    spec = json.loads(job["spec"])
    finished = bool(job["finished_at"]) and counts["pending"] == 0 and counts["in_flight"] == 0
    # sent: a batch was created (or tried) for the job, or a row of it was sent (messages mode)
    sent = not store.unsent(jid)
    return {
        "job_id": jid, "name": job["name"], "model": job["model"], "mode": job["mode"],
        "input": job["input"], "output": job["output"], "rows": job["rows"] or 0,
        "created_at": job["created_at"], "finished_at": job["finished_at"], "finished": finished,
        "state": job_state(finished, bool(job["canceled_at"]), counts, bool(sent)),
        "canceled": bool(job["canceled_at"]), "counts": counts,
        "tokens": {k: tokens[k] for k in ("input", "output", "cache_write", "cache_read")},
        # the budget of the job's latest run (each run records the max_cost it ran with)
        "cost_usd": job_cost(store, jid), "reused_rows": reused, "max_cost": spec.get("max_cost"), "batches": batches,
        # the prompt cache: rows that read it of those that could, and a primer batch in flight
        "cache": {**cache_use(store, jid), "priming": store.primer_requests(jid)},
    }


def find_job(store: Store, ref: Optional[str]) -> dict:
    jobs = store.find_jobs(ref)
    if not jobs:
        raise InputError(f"no job {ref!r} in {store.path}" if ref else f"no jobs in {store.path}")
    if ref and len(jobs) > 1:
        raise InputError(f"{ref!r} matches {len(jobs)} jobs in {store.path}; give more of the job id")
    return jobs[0]


CAUSES = {
    "authentication_error": "authentication", "permission_error": "permission",
    "rate_limit_error": "rate limit", "overloaded_error": "overloaded", "api_error": "API error",
    "invalid_request_error": "invalid request", "not_found_error": "not found",
    "invalid_output": "invalid output", "expired": "expired", "canceled": "canceled",
    "results_gone": "results gone", "result_missing": "result never came",
    "batch_unproven": "lost create's batch not provably the job's",
}


def failures_by_cause(store: Store, job_id: str) -> list[tuple[str, str, int]]:
    """(cause, error_type, rows) for the job's failed rows, most frequent first."""
    rows = store.q("SELECT coalesce(error_type, state) AS t, count(*) AS n FROM requests WHERE job_id = ? "
                   "AND state NOT IN ('succeeded', 'pending', 'in_flight') GROUP BY t ORDER BY n DESC, t", (job_id,))
    return [(CAUSES.get(r["t"], r["t"]), r["t"], r["n"]) for r in rows]


def invalid_output_reasons(store: Store, job_id: str, first: int = 3) -> tuple[list[tuple[str, int]], int]:
    """Why replies ended invalid_output: the `first` most frequent causes with their rows, and how many rows
    have another cause. A cause is a reason's text before its first ": " (`reply is not JSON`, `reply does
    not fit the schema at score`): reasons that differ only in their detail (the value, the character
    where the JSON broke) are one cause, shown with its most frequent detail and how many others it has."""
    rows = store.q("SELECT coalesce(error_message, '(no reason recorded)') AS m, count(*) AS n FROM requests "
                   "WHERE job_id = ? AND state = 'invalid_output' GROUP BY m ORDER BY n DESC, m", (job_id,))
    causes: dict = {}   # cause -> [rows, first (most frequent) reason, distinct reasons]
    for r in rows:
        cause = r["m"].split(": ", 1)[0]
        seen = causes.setdefault(cause, [0, r["m"], 0])
        seen[0] += r["n"]
        seen[2] += 1
    ranked = sorted(causes.values(), key=lambda c: (-c[0], c[1]))
    shown = [(m if d == 1 else f"{m} (and {d - 1} more like it)", n) for n, m, d in ranked[:first]]
    return shown, sum(n for n, _, _ in ranked[first:])


def usage_problems(store: Store, job_id: str) -> dict:
    """Replies this job paid for whose usage cannot be right, recorded and priced as reported: `over`, more
    output tokens than the request's max_tokens allow; `missing`, no usage, or input or output tokens that
    cannot be read (null, a string, negative: recorded as missing and priced at 0)."""
    job = store.job(job_id)
    shared = json.loads(job["shared_params"] or "{}") if job else {}
    paid = f"SELECT body_id, input_tokens, output_tokens FROM requests WHERE job_id = ? AND {PAID}"
    # no usage, or none that can be read (results.clean_usage drops counts that cannot be right)
    missing = "count(*) FILTER (WHERE r.output_tokens IS NULL OR r.input_tokens IS NULL) AS missing"
    if shared.get("max_tokens") is not None:   # one max_tokens for every row: no need to read the bodies
        row = store.one(f"SELECT count(*) FILTER (WHERE r.output_tokens > ?) AS over, {missing} FROM ({paid}) r",
                        (shared["max_tokens"], job_id))
    else:                                      # each row's own (max_tokens_column)
        row = store.one(f"SELECT count(*) FILTER (WHERE r.output_tokens > json_extract(b.body, '$.max_tokens')) "
                        f"AS over, {missing} FROM ({paid}) r JOIN bodies b ON b.id = r.body_id", (job_id,))
    return {"over": row["over"] or 0, "missing": row["missing"] or 0}


def usage_text(problems: dict) -> Optional[str]:
    """The one line that flags usage that cannot be right (None when there is none)."""
    parts = []
    if problems["over"]:
        parts.append(f"{problems['over']} replies reported more output tokens than their max_tokens")
    if problems["missing"]:
        parts.append(f"{problems['missing']} replies reported no usage or counts that cannot be read (those priced at $0)")
    return "; ".join(parts) + " (recorded and priced as reported)" if parts else None


def cost_by_kind(store: Store, job_id: str, catalog, model: str, *, batch: bool, cache_ttl: str) -> Optional[dict]:
    """What the job paid per token kind (rows reused from other jobs excluded); None if unpriced."""
    totals = _priced(store, job_id, catalog, model, cache_ttl)
    if totals is None:
        return None
    scale = Decimal("0.5") if batch else Decimal(1)
    return {k: float(totals[k] * scale) for k in ("input", "output", "cache_write", "cache_read")}


def cache_saved(store: Store, job_id: str, catalog, model: str, *, batch: bool, cache_ttl: str) -> Optional[float]:
    """What prompt caching saved the job against sending the same tokens uncached (negative: what it cost
    more, as when every row wrote the cache); None if unpriced."""
    totals = _priced(store, job_id, catalog, model, cache_ttl)
    if totals is None:
        return None
    scale = Decimal("0.5") if batch else Decimal(1)
    return float((totals["cache_as_input"] - totals["cache_write"] - totals["cache_read"]) * scale)


def _priced(store: Store, job_id: str, catalog, model: str, cache_ttl: str) -> Optional[dict]:
    """USD per token kind at full price (no batch discount), and what the cache tokens would have cost as
    plain input ("cache_as_input"); None if unpriced."""
    info = catalog.resolve(model)
    if info is None or info.prices is None:
        return None
    bounds = [0] + [t.above_prompt_tokens for t in info.tiers] + [None]
    totals = {"input": Decimal(0), "output": Decimal(0), "cache_write": Decimal(0), "cache_read": Decimal(0),
              "cache_as_input": Decimal(0)}
    prompt = ("(coalesce(input_tokens,0) + coalesce(cache_creation_input_tokens,0) + "
              "coalesce(cache_read_input_tokens,0))")
    for low, high in zip(bounds, bounds[1:]):
        cond = f"{prompt} > ?" if high is None else f"{prompt} > ? AND {prompt} <= ?"
        params = [job_id, low if low else -1] + ([] if high is None else [high])
        r = store.one("SELECT coalesce(sum(input_tokens),0) AS i, coalesce(sum(output_tokens),0) AS o, "
                      "coalesce(sum(cache_creation_input_tokens),0) AS w, coalesce(sum(cache_read_input_tokens),0) AS c "
                      f"FROM requests WHERE job_id = ? AND {PAID} AND {cond}", params)
        prices = info.prices_for((low or 0) + 1)
        write = prices.cache_write_1h if cache_ttl == "1h" else prices.cache_write_5m
        for kind, tokens, price in (("input", r["i"], prices.input), ("output", r["o"], prices.output),
                                    ("cache_write", r["w"], write), ("cache_read", r["c"], prices.cache_read),
                                    ("cache_as_input", r["w"] + r["c"], prices.input)):
            if tokens and price is None:
                return None
            totals[kind] += Decimal(tokens) * (price or 0) / Decimal(1_000_000)
    return totals


def cache_use(store: Store, job_id: str) -> dict:
    """Rows this job paid for that read the cache, that wrote it, and that could have read it (every row
    whose prefix was cached: it wrote or read); read_rate = read / could (None when none could)."""
    r = store.one("SELECT count(*) FILTER (WHERE coalesce(cache_read_input_tokens, 0) > 0) AS read, "
                  "count(*) FILTER (WHERE coalesce(cache_creation_input_tokens, 0) > 0) AS wrote, "
                  "count(*) FILTER (WHERE coalesce(cache_creation_input_tokens, 0) + "
                  "coalesce(cache_read_input_tokens, 0) > 0) AS could "
                  f"FROM requests WHERE job_id = ? AND {PAID}", (job_id,))
    return {"rows_read": r["read"], "rows_wrote": r["wrote"], "rows_could": r["could"],
            "read_rate": round(r["read"] / r["could"], 4) if r["could"] else None}


def cache_line(use: dict, saved: Optional[float], priming: int = 0) -> Optional[str]:
    """One line on the job's prompt cache, for the run summary and status; None when nothing was cached."""
    parts = []
    if priming:
        parts.append(f"priming the cache: {priming} request{'s' if priming != 1 else ''} "
                     "(the rest is sent once it has ended)")
    if use["rows_could"]:
        parts.append(f"cache: {use['rows_read']:,} of {use['rows_could']:,} rows read it ({use['read_rate']:.1%}), "
                     f"{use['rows_wrote']:,} wrote it")
        if saved is not None:
            parts.append(f"caching saved ${saved:,.6f} against no cache" if saved >= 0
                         else f"caching cost ${-saved:,.6f} more than no cache")
    return "; ".join(parts) if parts else None


def job_cache_saved(store: Store, job: dict) -> Optional[float]:
    """cache_saved for a stored job, at the prices of the catalog it was run with."""
    spec = json.loads(job["spec"] or "{}")
    catalog = stored_catalog(spec)
    if catalog is None:
        return None
    return cache_saved(store, job["id"], catalog, job["model"], batch=(job["mode"] or "batch") == "batch",
                       cache_ttl=spec.get("cache_ttl") or "5m")


def stored_catalog(spec: dict):
    """The model catalog a stored job was run with (its models_file if still there), or None."""
    from .models import load_catalog
    extra = spec.get("models_file")
    if extra and os.path.exists(extra):
        try:
            return load_catalog(extra)
        except Exception:  # a models file changed since the run: fall back to the shipped catalog
            pass
    try:
        return load_catalog()
    except Exception:
        return None
