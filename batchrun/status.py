"""What a state file knows about its jobs: rows by status, batches, tokens and cost."""
from __future__ import annotations

import json
from typing import Optional

from .errors import InputError
from .store import Store

ROW_STATES = ("pending", "in_flight", "succeeded", "errored", "expired", "canceled", "invalid_output")


def job_status(store: Store, job: dict) -> dict:
    jid = job["id"]
    counts = {s: 0 for s in ROW_STATES}
    counts.update(store.counts(jid))
    tokens = store.one(
        "SELECT coalesce(sum(input_tokens),0) AS input, coalesce(sum(output_tokens),0) AS output, "
        "coalesce(sum(cache_creation_input_tokens),0) AS cache_write, "
        "coalesce(sum(cache_read_input_tokens),0) AS cache_read, sum(cost_usd) AS cost, "
        "count(*) FILTER (WHERE state = 'succeeded' AND cost_usd IS NULL) AS unpriced, "
        "count(*) FILTER (WHERE reused_from IS NOT NULL) AS reused "
        "FROM requests WHERE job_id = ? AND state IN ('succeeded', 'invalid_output')", (jid,))
    batches = [
        {"batch_id": b["api_id"], "state": b["state"], "api_status": b["api_status"],
         "requests": b["request_count"], "created_at": b["created_at"], "ended_at": b["ended_at"],
         "request_counts": json.loads(b["request_counts"]) if b["request_counts"] else None,
         "adopted": bool(b["adopted"])}
        for b in store.q("SELECT * FROM batches WHERE job_id = ? AND state != 'abandoned' ORDER BY id", (jid,))]
    spec = json.loads(job["spec"])
    finished = bool(job["finished_at"]) and counts["pending"] == 0 and counts["in_flight"] == 0
    return {
        "job_id": jid, "name": job["name"], "model": job["model"], "mode": job["mode"],
        "input": job["input"], "output": job["output"], "rows": job["rows"] or 0,
        "created_at": job["created_at"], "finished_at": job["finished_at"], "finished": finished,
        "canceled": bool(job["canceled_at"]), "counts": counts,
        "tokens": {k: tokens[k] for k in ("input", "output", "cache_write", "cache_read")},
        "cost_usd": None if tokens["unpriced"] else round(tokens["cost"] or 0.0, 10),
        "reused_rows": tokens["reused"], "max_cost": spec.get("max_cost"), "batches": batches,
    }


def find_job(store: Store, ref: Optional[str]) -> dict:
    jobs = store.find_jobs(ref)
    if not jobs:
        raise InputError(f"no job {ref!r} in {store.path}" if ref else f"no jobs in {store.path}")
    if ref and len(jobs) > 1:
        raise InputError(f"{ref!r} matches {len(jobs)} jobs in {store.path}; give more of the job id")
    return jobs[0]
