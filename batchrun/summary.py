"""What a state file knows about its jobs: rows by status, batches, tokens and cost (the store's named reads,
put together for status, jobs, the run summary and the report; no SQL here).

The figures of a job's rows (rows by state, what it paid, tokens, reused rows, cache use, usage problems,
the usage per price tier) are read in one scan of them (`Store.figures`), once, and handed to whatever
shows them: `job_status`, `job_pricing`, `usage_problems`, `cache_use` take them (`figures`); without them
each reads its own."""
from __future__ import annotations

import json
import os
from decimal import Decimal
from typing import Optional

from .errors import InputError
from .states import CANCELED, EXPIRED, IN_FLIGHT, INVALID_OUTPUT, PENDING, ROW_STATES
from .store import Store
from .store.views import FAILED


def job_cost(store: Store, job_id: str) -> Optional[float]:
    """What the job has spent, from the usage of every reply it paid for; None if any is unpriced."""
    return store.job_cost(job_id)


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
    if not sent and not counts.get(IN_FLIGHT):
        return "planned"
    return "in progress"


def job_figures(store: Store, job_id: str, catalog=None, model: Optional[str] = None) -> dict:
    """The figures of the job's rows (see Store.figures), in one scan; with the job's catalog and model, its
    paid usage per price tier too (for job_pricing)."""
    return store.figures(job_id, price_tiers(catalog, model))


def price_tiers(catalog, model: Optional[str]) -> tuple:
    """The bounds of the model's price tiers (its ascending `above_prompt_tokens`; () without a catalog)."""
    info = catalog.resolve(model) if catalog is not None and model is not None else None
    return tuple(t.above_prompt_tokens for t in info.tiers) if info is not None and info.prices is not None else ()


def job_status(store: Store, job: dict, figures: Optional[dict] = None) -> dict:
    """What status shows of a job (`figures`: its rows' figures, read here if not given)."""
    jid = job["id"]
    figures = figures or store.figures(jid)
    counts = {s: 0 for s in ROW_STATES}
    counts.update(figures["counts"])
    # tokens this job paid for: rows reused from another job's answers were paid there
    tokens = figures["tokens"]
    batches = [
        {"batch_id": b["api_id"], "state": b["state"], "api_status": b["api_status"],
         "requests": b["request_count"], "created_at": b["created_at"], "ended_at": b["ended_at"],
         "request_counts": json.loads(b["request_counts"]) if b["request_counts"] else None,
         "adopted": bool(b["adopted"]), "primer": bool(b["primer"]), "note": b["note"]}
        for b in store.batches_of(jid)]
    spec = json.loads(job["spec"])
    finished = bool(job["finished_at"]) and counts[PENDING] == 0 and counts[IN_FLIGHT] == 0
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
        "cost_usd": figures["cost"], "reused_rows": figures["reused"], "max_cost": spec.get("max_cost"),
        "batches": batches,
        # the prompt cache: rows that read it of those that could, and a primer batch in flight
        "cache": {**cache_use(store, jid, figures), "priming": store.primer_requests(jid)},
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
    INVALID_OUTPUT: "invalid output", EXPIRED: "expired", CANCELED: "canceled",
    "results_gone": "results gone", "result_missing": "result never came",
    "batch_unproven": "lost create's batch not provably the job's",
}


def failures_by_cause(store: Store, job_id: str, counts: Optional[dict] = None) -> list[tuple[str, str, int]]:
    """(cause, error_type, rows) for the job's failed rows, most frequent first (`counts`: the job's rows by
    state, when known: none failed, nothing to read)."""
    if counts is not None and not any(counts.get(s) for s in FAILED):
        return []
    return [(CAUSES.get(t, t), t, n) for t, n in store.failures_by_type(job_id)]


def invalid_output_reasons(store: Store, job_id: str, first: int = 3,
                           counts: Optional[dict] = None) -> tuple[list[tuple[str, int]], int]:
    """Why replies ended invalid_output: the `first` most frequent causes with their rows, and how many rows
    have another cause. A cause is a reason's text before its first ": " (`reply is not JSON`, `reply does
    not fit the schema at score`): reasons that differ only in their detail (the value, the character
    where the JSON broke) are one cause, shown with its most frequent detail and how many others it has."""
    causes: dict = {}   # cause -> [rows, first (most frequent) reason, distinct reasons]
    if counts is not None and not counts.get(INVALID_OUTPUT):   # (`counts`: as failures_by_cause)
        return [], 0
    for reason, n in store.invalid_output_reasons(job_id):
        cause = reason.split(": ", 1)[0]
        seen = causes.setdefault(cause, [0, reason, 0])
        seen[0] += n
        seen[2] += 1
    ranked = sorted(causes.values(), key=lambda c: (-c[0], c[1]))
    shown = [(m if d == 1 else f"{m} (and {d - 1} more like it)", n) for n, m, d in ranked[:first]]
    return shown, sum(n for n, _, _ in ranked[first:])


def usage_problems(store: Store, job_id: str, figures: Optional[dict] = None) -> dict:
    """Replies this job paid for whose usage cannot be right, recorded and priced as reported: `over`, more
    output tokens than the request's max_tokens allow; `missing`, no usage, or input or output tokens that
    cannot be read (null, a string, negative: recorded as missing and priced at 0)."""
    return figures["usage"] if figures is not None else store.usage_problems(job_id)


def usage_text(problems: dict) -> Optional[str]:
    """The one line that flags usage that cannot be right (None when there is none)."""
    parts = []
    if problems["over"]:
        parts.append(f"{problems['over']} replies reported more output tokens than their max_tokens")
    if problems["missing"]:
        parts.append(f"{problems['missing']} replies reported no usage or counts that cannot be read (those priced at $0)")
    return "; ".join(parts) + " (recorded and priced as reported)" if parts else None


def job_pricing(store: Store, job_id: str, catalog, model: str, *, batch: bool, cache_ttl: str,
                figures: Optional[dict] = None):
    """What the job paid per token kind (a models.CostByKind: rows reused from other jobs excluded), priced
    by the catalog as it priced each row, in one pass: the replies' usage summed per price tier, each sum
    priced as one request of its tier (`figures`: the job's, read with these tiers). None if unpriced."""
    info = catalog.resolve(model)
    if info is None or info.prices is None:
        return None
    bounds = price_tiers(catalog, model)
    by_tier = figures["by_tier"] if figures is not None and figures["tiers"] == bounds else \
        store.paid_usage_by_tier(job_id, bounds)
    total = None
    for tier, usage in by_tier:
        kinds = catalog.cost_by_kind(model, usage, batch=batch, cache_ttl=cache_ttl,
                                     prompt_tokens=bounds[tier - 1] + 1 if tier else 0)
        if kinds is None:
            return None
        total = kinds if total is None else total + kinds
    if total is None:   # nothing paid yet: zero of each kind
        from .models import CostByKind   # (here: status and jobs start without the catalog's module)
        total = CostByKind()
    return total


def cost_by_kind(store: Store, job_id: str, catalog, model: str, *, batch: bool, cache_ttl: str) -> Optional[dict]:
    """What the job paid per token kind, {input, output, cache_write, cache_read} in USD (they add up to
    its cost_usd; rows reused from other jobs excluded); None if unpriced."""
    pricing = job_pricing(store, job_id, catalog, model, batch=batch, cache_ttl=cache_ttl)
    return None if pricing is None else pricing.shown()


def cache_saved(store: Store, job_id: str, catalog, model: str, *, batch: bool, cache_ttl: str) -> Optional[float]:
    """What prompt caching saved the job against sending the same tokens uncached (negative: what it cost
    more, as when every row wrote the cache); None if unpriced."""
    pricing = job_pricing(store, job_id, catalog, model, batch=batch, cache_ttl=cache_ttl)
    return None if pricing is None else float(pricing.cache_saved)


def kinds_text(pricing, money) -> str:
    """A job's cost by token kind in one phrase: `input $a, output $b, cache write $c, cache read $d`, the
    cache writes split by lifetime when the job wrote at both (`cache write $c (5m $x, 1h $y)`)."""
    parts = []
    for kind, value in pricing.shown().items():
        text = f"{kind.replace('_', ' ')} {money(value)}"
        if kind == "cache_write" and pricing.cache_write_5m and pricing.cache_write_1h:
            split = pricing.cache_write_by_ttl()
            text += f" (5m {money(split['5m'])}, 1h {money(split['1h'])})"
        parts.append(text)
    return ", ".join(parts)


def cache_use(store: Store, job_id: str, figures: Optional[dict] = None) -> dict:
    """Rows this job paid for that read the cache, that wrote it, and that could have read it (every row
    whose prefix was cached: it wrote or read); read_rate = read / could (None when none could)."""
    r = figures["cache"] if figures is not None else store.cache_use(job_id)
    return {"rows_read": r["read"], "rows_wrote": r["wrote"], "rows_could": r["could"],
            "read_rate": round(r["read"] / r["could"], 4) if r["could"] else None}


def priming_text(requests: int, *, rest: bool = True) -> str:
    """`priming the cache: N requests` (with `rest`: and that the rest of the job waits for them): the one
    wording of a primer in flight, for the progress, status and the run summary."""
    text = f"priming the cache: {requests} request{'s' if requests != 1 else ''}"
    return text + " (the rest is sent once it has ended)" if rest else text


def cache_line(use: dict, saved: Optional[float], priming: int = 0) -> Optional[str]:
    """One line on the job's prompt cache, for the run summary and status; None when nothing was cached."""
    parts = []
    if priming:
        parts.append(priming_text(priming))
    if use["rows_could"]:
        parts.append(f"cache: {use['rows_read']:,} of {use['rows_could']:,} rows read it ({use['read_rate']:.1%}), "
                     f"{use['rows_wrote']:,} wrote it")
        if saved is not None:
            parts.append(f"caching saved ${saved:,.6f} against no cache" if saved >= 0
                         else f"caching cost ${-saved:,.6f} more than no cache")
    return "; ".join(parts) if parts else None


def stored_pricing(store: Store, job: dict, figures: Optional[dict] = None, catalog=False):
    """job_pricing for a stored job, at the prices of the catalog it was run with (None: unpriced); `catalog`:
    that catalog, when loaded already (see stored_figures)."""
    spec = json.loads(job["spec"] or "{}")
    catalog = stored_catalog(spec) if catalog is False else catalog
    if catalog is None:
        return None
    return job_pricing(store, job["id"], catalog, job["model"], batch=(job["mode"] or "batch") == "batch",
                       cache_ttl=spec.get("cache_ttl") or "5m", figures=figures)


def stored_status(store: Store, job: dict) -> tuple[dict, object]:
    """(job_status, stored_pricing) of a stored job, from one scan of its rows (status)."""
    catalog = stored_catalog(json.loads(job["spec"] or "{}"))
    figures = job_figures(store, job["id"], catalog, job["model"])
    return job_status(store, job, figures), stored_pricing(store, job, figures, catalog)


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
