"""`batchrun status` and `batchrun jobs`: what a state file knows."""
from __future__ import annotations

import json

import click

from ..errors import InputError
from ..states import IN_FLIGHT, INTENT, PENDING
from ..summary import ROW_STATES, budget_text, cache_line, job_status, kinds_text, stored_status
from ..store import Store, existing_state
from .common import handle_errors

STATE_WORDS = {"finished": "finished", "canceled": "canceled", "in progress": "in progress",
               "planned": "planned (nothing sent yet)"}

STATE_OPTION = click.option("--state", metavar="PATH", default="batchrun-state.sqlite", show_default=True,
                            help="The SQLite state file.")


def open_store(path: str) -> Store:
    existing_state(path)
    return Store(path)


@click.command()
@click.argument("job", required=False, metavar="[JOB]")
@STATE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def status(job, state, as_json):
    """Every job in the state file (or one, by id prefix or name): rows by status, batches, tokens, cost."""
    with open_store(state) as store:
        jobs = store.find_jobs(job)
        if job and not jobs:
            raise InputError(f"no job {job!r} in {state}")
        statuses = [stored_status(store, j) for j in jobs]
        reports, pricings = [r for r, _ in statuses], [p for _, p in statuses]
        for r, pricing in zip(reports, pricings):
            r["cost_by_kind"] = pricing.shown() if pricing is not None else None
            r["cache_write_by_ttl"] = pricing.cache_write_by_ttl() if pricing is not None else None
            r["cache"]["saved_usd"] = (float(pricing.cache_saved) if pricing is not None and r["cache"]["rows_could"]
                                       else None)
    if as_json:
        click.echo(json.dumps(reports if not job else reports[0], indent=2))
        return
    for r, pricing in zip(reports, pricings):
        flag = STATE_WORDS[r["state"]]
        name = f" ({r['name']})" if r["name"] else ""
        click.echo(f"job {r['job_id'][:12]}{name}: {flag}")
        click.echo(f"  input {r['input']} → output {r['output']}, model {r['model']}, mode {r['mode']}")
        click.echo("  rows: " + ", ".join(f"{r['counts'][s]} {s.replace('_', ' ')}" for s in ROW_STATES
                                          if r["counts"][s]) + f" (of {r['rows']})")
        t = r["tokens"]
        cost = f"${r['cost_usd']:.6f}" if r["cost_usd"] is not None else "unknown"
        click.echo(f"  tokens: {t['input']:,} input, {t['output']:,} output, {t['cache_write']:,} cache write, "
                   f"{t['cache_read']:,} cache read; cost {cost}"
                   + (f" (budget {budget_text(r['max_cost'])})" if r["max_cost"] is not None else ""))
        if pricing is not None and pricing.total:
            click.echo(f"  cost by kind: {kinds_text(pricing, lambda v: f'${v:.6f}')}")
        if r["cache"]["rows_could"] or r["cache"]["priming"]:
            click.echo(f"  {cache_line(r['cache'], r['cache']['saved_usd'], r['cache']['priming'])}")
        for b in r["batches"]:
            if b["state"] == INTENT and b["note"]:   # a create whose reply was lost: what it waits for
                click.echo(f"  batch (not known yet): {b['requests']} requests; {b['note']}")
                continue
            click.echo(f"  batch {b['batch_id'] or '(creating)'}: {b['api_status'] or b['state']}, "
                       f"{b['requests']} requests{', adopted' if b['adopted'] else ''}"
                       f"{', priming the cache' if b['primer'] else ''}")


@click.command()
@STATE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def jobs(state, as_json):
    """List the jobs in a state file."""
    with open_store(state) as store:
        reports = [job_status(store, j) for j in store.find_jobs()]
    if as_json:
        click.echo(json.dumps([{k: r[k] for k in ("job_id", "name", "model", "rows", "state", "finished", "counts",
                                                   "cost_usd", "max_cost", "created_at")} for r in reports], indent=2))
        return
    for r in reports:
        done = sum(r["counts"][s] for s in ROW_STATES if s not in (PENDING, IN_FLIGHT))
        cost = f"${r['cost_usd']:.4f}" if r["cost_usd"] is not None else "cost unknown"
        click.echo(f"{r['job_id'][:12]}  {r['name'] or '-':20}  {r['model']:22} {done}/{r['rows']} rows  "
                   f"{STATE_WORDS[r['state']]}  {cost}")
