"""Shared pieces of the CLI: the job options every command takes, and the error boundary."""
from __future__ import annotations

import functools
import logging
import os
import sys
import time
import traceback
from typing import Any, Callable, Optional

import click

from ..errors import BatchrunError, ExitCode
from ..spec import JobSpec

EXIT_CODES_HELP = """\b
Exit codes:
  0  every row succeeded
  2  bad input (job file, flags, input data); nothing was sent
  3  the job finished, but some rows failed (errored, expired, canceled, invalid_output)
  4  API or authentication failure (the job stays resumable)
  5  --no-wait: batches are still running; run the same command again later
  6  another run holds this job
  7  the budget (--max-cost) stops the job
  130 interrupted (the job stays resumable)
"""


def _labels(ctx, param, value):
    if not value:
        return None
    out = []
    for v in value:
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


JOB_OPTIONS = [
    click.argument("job_file", metavar="[JOB.toml]", required=False, type=click.Path(dir_okay=False)),
    click.option("--input", "input", metavar="PATH", help="CSV, Parquet (file or directory) or JSONL to read; local path or URI."),
    click.option("--output", metavar="PATH", help="Parquet file to write (default: <input>.results.parquet)."),
    click.option("--id-column", metavar="COL", help="Column whose values become custom_ids (default: row position)."),
    click.option("--prompt", metavar="TEMPLATE", help="Jinja2 template over the row's columns, e.g. 'Classify: {{ text }}'."),
    click.option("--prompt-file", metavar="PATH", help="Read the prompt template from a file."),
    click.option("--system", metavar="TEXT", help="System prompt."),
    click.option("--system-file", metavar="PATH", help="Read the system prompt from a file."),
    click.option("--model", metavar="MODEL", help="Model id or alias (default: claude-haiku-5-5)."),
    click.option("--max-tokens", type=int, metavar="N", help="Max output tokens per request (default: 1024)."),
    click.option("--batch-size", type=int, metavar="N", help="Requests per batch (default: 10000; max 100000)."),
    click.option("--poll-interval", metavar="DURATION", help="Longest wait between polls, e.g. 30, 2m (default: 60s)."),
    click.option("--state", metavar="PATH", help="SQLite state file (default: batchrun-state.sqlite next to the output)."),
    click.option("--max-attempts", type=int, metavar="N", help="Attempts per row for transient failures (default: 3)."),
    click.option("--api-version", type=click.Choice(["2023-06-01", "2026-10-21"]), help="anthropic-version header."),
    click.option("--mode", type=click.Choice(["batch", "messages"]), help="Message Batches (default) or plain Messages."),
    click.option("--output-schema", metavar="FILE", help="JSON Schema file: each top-level property becomes a typed column."),
    click.option("--labels", multiple=True, callback=_labels, metavar="A,B,C", help="Label set: the reply is one of these (column 'label')."),
    click.option("--multi-label", is_flag=True, default=None, help="With --labels: a list of labels per row."),
    click.option("--cache-system/--no-cache-system", default=None, help="Send the system prompt as a cached block."),
    click.option("--cache-ttl", type=click.Choice(["5m", "1h"]), help="Cache lifetime for --cache-system."),
    click.option("--temperature", type=float, help="Sampling temperature (refused by models that take none)."),
    click.option("--top-p", type=float),
    click.option("--top-k", type=int),
    click.option("--thinking", metavar="adaptive|disabled|N", help="Thinking mode, or a budget of N tokens."),
    click.option("--effort", type=click.Choice(["low", "medium", "high", "xhigh", "max"])),
    click.option("--stop-sequence", "stop_sequences", multiple=True, metavar="TEXT"),
    click.option("--prefill", metavar="TEXT", help="Start of the reply; the model continues it."),
    click.option("--image-column", metavar="COL", help="Column with an image path, URL or bytes per row."),
    click.option("--max-tokens-column", metavar="COL", help="Column with a per-row max_tokens."),
    click.option("--max-cost", type=float, metavar="USD", help="Budget: never spend more than this on the job."),
    click.option("--limit", type=int, metavar="N", help="Only the first N rows (a smoke run)."),
    click.option("--concurrency", type=int, metavar="N", help="Messages mode: requests in flight at once."),
    click.option("--rpm", type=int, help="Messages mode: cap on requests per minute."),
    click.option("--tpm", type=int, help="Messages mode: cap on tokens per minute."),
    click.option("--auth-header", type=click.Choice(["x-api-key", "bearer"])),
    click.option("--partition-by", metavar="COL", help="Write a Hive-partitioned Parquet dataset by this column."),
    click.option("--models", "models_file", metavar="FILE", help="Extra model catalog (TOML) to extend or override the built-in one."),
    click.option("--name", metavar="NAME", help="A name for the job (shown by status)."),
]


def job_options(fn: Callable) -> Callable:
    for option in reversed(JOB_OPTIONS):
        fn = option(fn)
    return fn


SPEC_KEYS = ("input", "output", "id_column", "prompt", "prompt_file", "system", "system_file", "model",
             "max_tokens", "batch_size", "poll_interval", "state", "max_attempts", "api_version", "mode",
             "output_schema", "labels", "multi_label", "cache_system", "cache_ttl", "temperature", "top_p",
             "top_k", "thinking", "effort", "stop_sequences", "prefill", "image_column", "max_tokens_column",
             "max_cost", "limit", "concurrency", "rpm", "tpm", "auth_header", "partition_by", "models_file", "name")


def spec_from_options(job_file: Optional[str], options: dict) -> JobSpec:
    overrides: dict[str, Any] = {k: options.get(k) for k in SPEC_KEYS}
    if overrides.get("stop_sequences"):
        overrides["stop_sequences"] = list(overrides["stop_sequences"])
    thinking = overrides.get("thinking")
    if thinking:
        overrides["thinking"] = ({"type": "enabled", "budget_tokens": int(thinking)} if thinking.isdigit()
                                 else {"type": thinking})
    return JobSpec.load(job_file, overrides)


def handle_errors(fn: Callable) -> Callable:
    """Turn every user-facing failure into one line on stderr and a documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BatchrunError as exc:
            click.echo(f"batchrun: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("batchrun: interrupted; run the same command again to resume", err=True)
            sys.exit(ExitCode.INTERRUPTED)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except Exception as exc:  # a bug: say so plainly, traceback only on request
            if os.environ.get("BATCHRUN_DEBUG"):
                traceback.print_exc()
            click.echo(f"batchrun: internal error: {type(exc).__name__}: {exc} "
                       "(this is a bug in batchrun; set BATCHRUN_DEBUG=1 for a traceback)", err=True)
            sys.exit(ExitCode.INTERNAL)

    return wrapper


def setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logger = logging.getLogger("batchrun")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


class ProgressPrinter:
    """Progress on stderr: a line whenever the counts change, and at least every `every` seconds."""

    def __init__(self, every: float = 30.0):
        self.every = every
        self.last: Optional[tuple] = None
        self.last_at = 0.0

    def __call__(self, p) -> None:
        key = (p.done, p.counts.get("in_flight", 0), p.batches_total)
        now = time.monotonic()
        if key == self.last and now - self.last_at < self.every:
            return
        self.last, self.last_at = key, now
        cost = f"${p.cost_usd:.4f}" if p.cost_usd is not None else "cost unknown"
        eta = ""
        if 0 < p.done < p.total and p.elapsed > 5:
            eta = f", ETA {format_seconds(p.elapsed / p.done * (p.total - p.done))}"
        click.echo(f"progress: {p.done}/{p.total} rows done ({p.failed} failed), "
                   f"{p.counts.get('in_flight', 0)} in flight in {p.batches_in_flight} batches "
                   f"({p.batches_total} created), {cost}, {format_seconds(p.elapsed)} elapsed{eta}", err=True)


def format_seconds(s: float) -> str:
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
