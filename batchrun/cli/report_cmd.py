"""`batchrun report`: one job of a state file as a self-contained HTML page."""
from __future__ import annotations

import click

from ..summary import find_job
from .common import handle_errors
from .state_cmd import STATE_OPTION, open_store


@click.command()
@click.argument("job", required=False, metavar="[JOB]")
@STATE_OPTION
@click.option("--html", "html_path", metavar="PATH", required=True,
              help="HTML file to write (one file; inline CSS and SVG, opens offline).")
@handle_errors
def report(job, state, html_path):
    """Write an HTML report of a job (by id prefix or name; default: the newest job in the state file):
    totals, cost by token kind, rows by status, output tokens, batch latency, label counts and the
    failed rows."""
    from ..report import write_report   # (here: it imports the request builder, which other commands skip)
    with open_store(state) as store:
        row = find_job(store, job)
        if job is None:
            others = len(store.find_jobs()) - 1
            if others:
                click.echo(f"batchrun: {others + 1} jobs in {state}: reporting the newest; "
                           "pass JOB (id prefix or name) to choose", err=True)
        write_report(store, row, html_path)
    name = f" ({row['name']})" if row["name"] else ""
    click.echo(f"wrote {html_path}: job {row['id'][:12]}{name}", err=True)
