"""Shared pieces of the CLI: the job options every command takes, and the error boundary."""
from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import time
import traceback
from typing import Any, Callable, Optional

import click

from ..errors import (ApiError, AuthError, BatchrunError, ExitCode, NoBatchApiError, SpecError, redact,
                      register_secret)
from ..spec import CACHE_TTLS, EFFORT_LEVELS, JobSpec

EXIT_CODES_HELP = """\b
Exit codes:
  0  every row succeeded
  2  bad input (job file, flags, input data; a state file that is not batchrun's,
     damaged or from a newer batchrun): nothing was sent; or the input changed
     while its job ran: nothing was written
  3  the job finished, but some rows failed (errored, expired, canceled, invalid_output)
  4  API unreachable, auth / gateway failure, rate limits past patience, or no space left on disk
     (rows not answered stay pending; run again)
  5  --no-wait: batches are still running; run the same command again later
  6  another run holds this job (or kept the state file locked for more than 30 s)
  7  the budget (--max-cost) stops the job
  130 interrupted by Ctrl-C or SIGTERM (the job stays resumable)
"""


JOB_OPTIONS = [
    click.argument("job_file", metavar="[JOB.toml]", required=False, type=click.Path(dir_okay=False)),
    click.option("--input", "input", metavar="PATH", help="CSV, Parquet (file or directory) or JSONL to read; local path or URI."),
    click.option("--output", metavar="PATH", help="Parquet file (a directory with --partition-by) to write; local path or URI (default: <input>.results.parquet)."),
    click.option("--id-column", metavar="COL", help="Column whose values become custom_ids (default: row position)."),
    click.option("--prompt", metavar="TEMPLATE", help="Jinja2 template over the row's columns, e.g. 'Classify: {{ text }}'."),
    click.option("--prompt-file", metavar="PATH", help="Read the prompt template from a file."),
    click.option("--system", metavar="TEXT", help="System prompt."),
    click.option("--system-file", metavar="PATH", help="Read the system prompt from a file."),
    click.option("--model", metavar="MODEL", help="Model id or alias (default: claude-haiku-5-5)."),
    click.option("--max-tokens", type=int, metavar="N", help="Max output tokens per request (default: 1024)."),
    click.option("--batch-size", type=int, metavar="N", help="Requests per batch (default: 10000; max 100000)."),
    click.option("--poll-interval", metavar="DURATION", help="Longest wait between polls, e.g. 30, 2m (default: 60s)."),
    click.option("--state", metavar="PATH", help="SQLite state file, a local path (default: batchrun-state.sqlite next to the output; in the working directory when the output is a URI)."),
    click.option("--max-attempts", type=int, metavar="N", help="Attempts per row that may be paid without an answer (timeout, dropped connection) or that expired; 429, 529 and other service errors never use one (default: 3)."),
    click.option("--api-version", metavar="YYYY-MM-DD", help="anthropic-version header: 2023-06-01 (default) or "
                 "2026-10-21; another date only for a gateway that documents it (its rules unknown: those of "
                 "2023-06-01 are checked)."),
    click.option("--mode", type=click.Choice(["batch", "messages"]), help="Message Batches (default) or plain Messages."),
    click.option("--output-schema", metavar="FILE", help="JSON Schema file: each top-level property becomes a typed column."),
    click.option("--labels", multiple=True, metavar="A,B,C", help="Label set: the reply is one of these (column 'label')."),
    click.option("--multi-label", is_flag=True, default=None, help="With --labels: a list of labels per row."),
    click.option("--cache-system/--no-cache-system", default=None,
                 help="Send the system prompt (and the few-shot turns) as a cached prefix."),
    click.option("--cache-ttl", type=click.Choice(CACHE_TTLS),
                 help="Cache lifetime for --cache-system (default: 1h in batch mode, 5m in messages mode)."),
    click.option("--cache-prime/--no-cache-prime", default=None,
                 help="Batch mode, cached prefix: send one request alone first to write the cache, then the rest "
                      "to read it (default: on)."),
    click.option("--temperature", type=float, help="Sampling temperature (refused by models that take none)."),
    click.option("--top-p", type=float),
    click.option("--top-k", type=int),
    click.option("--thinking", metavar="adaptive|disabled|N", help="Thinking mode, or a budget of N tokens."),
    click.option("--effort", type=click.Choice(EFFORT_LEVELS)),
    click.option("--stop-sequences", "stop_sequences", multiple=True, metavar="TEXT",
                 help="Stop generating at this text (repeat for several)."),
    click.option("--stop-sequence", "stop_sequence_alias", multiple=True, hidden=True),   # the old spelling
    click.option("--prefill", metavar="TEXT", help="Start of the reply; the model continues it (column text holds the continuation)."),
    click.option("--prefill-in-text", is_flag=True, default=None,
                 help="With --prefill: column text holds the prefill followed by the continuation."),
    click.option("--image-column", metavar="COL", help="Column with an image path, URL or bytes per row."),
    click.option("--image-dir", metavar="DIR", help="Folder relative image paths are read from (default: the input file's)."),
    click.option("--max-tokens-column", metavar="COL", help="Column with a per-row max_tokens."),
    click.option("--max-cost", type=float, metavar="USD", help="Budget: never spend more than this on the job."),
    click.option("--limit", type=int, metavar="N", help="Only the first N rows (a smoke run)."),
    click.option("--shard", metavar="K/N", help="Only shard K of N (rows split by a hash of the id column, or "
                 "by position without one); run each shard as its own job with its own state and output."),
    click.option("--concurrency", type=int, metavar="N", help="Messages mode: requests in flight at once."),
    click.option("--rpm", type=int, help="Messages mode: cap on requests per minute."),
    click.option("--tpm", type=int, help="Messages mode: cap on tokens per minute."),
    click.option("--auth-header", type=click.Choice(["x-api-key", "bearer"])),
    click.option("--partition-by", metavar="COL", help="Write a Hive-partitioned Parquet dataset (OUTPUT/COL=value/part-N.parquet) by this input, result or schema column."),
    click.option("--models-file", metavar="FILE", help="Extra model catalog (TOML) to extend or override the built-in one."),
    click.option("--models", "models_file_alias", hidden=True),                          # the old spelling
    click.option("--allow-unknown-model", is_flag=True, default=None,
                 help="Run a model the catalog does not know (its cost stays unknown)."),
    click.option("--name", metavar="NAME", help="A name for the job (shown by status)."),
]


def job_options(fn: Callable) -> Callable:
    for option in reversed(JOB_OPTIONS):
        fn = option(fn)
    return fn


SPEC_KEYS = ("input", "output", "id_column", "prompt", "prompt_file", "system", "system_file", "model",
             "max_tokens", "batch_size", "poll_interval", "state", "max_attempts", "api_version", "mode",
             "output_schema", "labels", "multi_label", "cache_system", "cache_ttl", "cache_prime", "temperature",
             "top_p", "top_k", "thinking", "effort", "stop_sequences", "prefill", "prefill_in_text", "image_column",
             "image_dir", "max_tokens_column",
             "max_cost", "limit", "shard", "concurrency", "rpm", "tpm", "auth_header", "partition_by", "models_file",
             "allow_unknown_model", "name")
# Old flag spellings, kept (hidden) so that existing command lines still work: flag -> job key.
FLAG_ALIASES = {"stop_sequence_alias": "stop_sequences", "models_file_alias": "models_file"}


def spec_from_options(job_file: Optional[str], options: dict) -> JobSpec:
    for alias, key in FLAG_ALIASES.items():
        value = options.pop(alias, None)
        if not value:
            continue
        if isinstance(value, tuple):      # a repeatable flag: both spellings add up
            options[key] = tuple(options.get(key) or ()) + value
        elif options.get(key):
            raise SpecError(f"--{key.replace('_', '-')} is given twice (once by its old name)")
        else:
            options[key] = value
    overrides: dict[str, Any] = {k: options.get(k) for k in SPEC_KEYS}
    for key in ("labels", "stop_sequences"):   # repeatable flags: each value parsed as the job key's string is
        overrides[key] = tuple(overrides[key]) if overrides.get(key) else None
    return JobSpec.load(job_file, overrides)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds like Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # a second SIGTERM kills at once
    raise Terminated()


def install_signal_handlers() -> None:
    """SIGTERM (kill, systemd, a container stopping) ends a run like Ctrl-C: cleanly, exit 130, resumable."""
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (the CLI called from a test's thread): leave it be
        pass


def handle_errors(fn: Callable) -> Callable:
    """Turn every user-facing failure into one line on stderr and a documented exit code.

    The API key (from the environment or --api-key) never appears in that line, nor in a debug traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        register_secret(os.environ.get("ANTHROPIC_API_KEY"))
        register_secret(kwargs.get("api_key"))
        install_signal_handlers()
        try:
            return fn(*args, **kwargs)
        except BatchrunError as exc:
            _fail(exc)
        except KeyboardInterrupt as exc:
            how = " by SIGTERM" if isinstance(exc, Terminated) else ""
            click.echo(f"batchrun: interrupted{how}; the job is saved: run the same command again to resume", err=True)
            sys.exit(ExitCode.INTERRUPTED)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except Exception as exc:  # a bug: say so plainly, traceback only on request
            from ..store import state_error   # a damaged state file, a full disk: not a bug
            translated = state_error(exc)
            if translated is not None:
                _fail(translated)
            if os.environ.get("BATCHRUN_DEBUG"):
                click.echo(redact(traceback.format_exc()).rstrip("\n"), err=True)
            click.echo(redact(f"batchrun: internal error: {type(exc).__name__}: {exc} "
                              "(this is a bug in batchrun; set BATCHRUN_DEBUG=1 for a traceback)"), err=True)
            sys.exit(ExitCode.INTERNAL)

    return wrapper


def _fail(exc: BatchrunError) -> None:
    """One line on stderr, and the error's exit code."""
    hint = ""
    if isinstance(exc, ApiError) and not isinstance(exc, (AuthError, NoBatchApiError)):   # again: the same
        hint = " (the job is saved: run the same command again to resume)"
    click.echo(redact(f"batchrun: error: {exc}{hint}"), err=True)
    sys.exit(exc.exit_code)


class RedactingFormatter(logging.Formatter):
    """Log lines (and any traceback logged with them) without the API key."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logger = logging.getLogger("batchrun")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


class ProgressPrinter:
    """Progress of a run on stderr.

    On a terminal: a live display (rich) of rows submitted / finished / failed, batches in flight,
    cost, elapsed time and ETA, redrawn in place and left showing the final counts by `close()`.
    Otherwise (cron, a pipe, a log file): a plain `progress:` line whenever the counts change, and
    at least every `every` seconds. `close()` is safe to call more than once.
    """

    def __init__(self, every: float = 30.0, *, live: Optional[bool] = None, console: Any = None):
        self.every = every
        self.last: Optional[tuple] = None
        self.last_at = 0.0
        self.first: Optional[tuple] = None  # (done, elapsed) when this run first reported: the ETA baseline
        self.p = None
        self.p_at = 0.0
        self._live = None
        self._console = console
        self._swapped: list = []
        if live is None:
            live = console.is_terminal if console is not None else _stderr_isatty()
        self.live = live

    def __call__(self, p) -> None:
        now = time.monotonic()
        if self.first is None or p.done < self.first[0]:
            self.first = (p.done, p.elapsed)
        if self.live:
            self.p, self.p_at = p, now
            self._start_live()
            if self._live is not None:
                self._live.update(self, refresh=True)
                return
        key = (p.done, p.counts.get("in_flight", 0), p.batches_total)
        if key == self.last and now - self.last_at < self.every:
            return
        self.last, self.last_at = key, now
        cost = f"${p.cost_usd:.4f}" if p.cost_usd is not None else "cost unknown"
        eta = self.eta(p)
        eta = f", ETA {format_seconds(eta)}" if eta is not None else ""
        where = (f"in {p.batches_in_flight} batches ({p.batches_total} created)" if p.mode == "batch"
                 else f"over POST {p.url or '/v1/messages'}")
        if p.priming:
            where += f", priming the cache: {p.priming} request{'s' if p.priming != 1 else ''}"
        click.echo(f"progress: {p.done}/{p.total} rows done ({p.failed} failed), "
                   f"{p.counts.get('in_flight', 0)} in flight {where}, {cost}, "
                   f"{format_seconds(p.elapsed)} elapsed{eta}", err=True)

    def eta(self, p, elapsed: Optional[float] = None) -> Optional[float]:
        """Seconds left at this run's pace (rows finished by earlier runs are not counted as pace)."""
        elapsed = p.elapsed if elapsed is None else elapsed
        base_done, base_elapsed = self.first or (0, 0.0)
        done, spent = p.done - base_done, elapsed - base_elapsed
        if not (0 < p.done < p.total) or done <= 0 or elapsed <= 5 or spent <= 0:
            return None
        return spent / done * (p.total - p.done)

    # ---- the live display ---------------------------------------------------------------------
    def _start_live(self) -> None:
        if self._live is not None:
            return
        try:
            from rich.console import Console
            from rich.live import Live
        except ImportError:  # pragma: no cover - rich is a dependency; plain lines if it is missing
            self.live = False
            return
        console = self._console or Console(stderr=True)
        self._live = Live(self, console=console, refresh_per_second=4, transient=False,
                          redirect_stdout=True, redirect_stderr=True)
        self._live.start()
        # log lines must go through the live display, not under it: point the batchrun handlers that
        # write to the real stderr at the display's stderr proxy until close()
        for handler in logging.getLogger("batchrun").handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.__stderr__, console.file) \
                    and sys.stderr is not handler.stream:
                self._swapped.append((handler, handler.setStream(sys.stderr)))

    def __rich__(self):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        p = self.p
        elapsed = p.elapsed + (time.monotonic() - self.p_at if self._live is not None else 0.0)
        in_flight = p.counts.get("in_flight", 0)
        pending = p.counts.get("pending", 0)
        submitted = p.total - pending
        pct = 100.0 * p.done / p.total if p.total else 100.0
        bar = Table.grid(padding=(0, 1))
        bar.add_row(Text("batchrun", style="bold"), ProgressBar(total=max(p.total, 1), completed=p.done, width=40),
                    Text(f"{pct:5.1f}%  {p.done:,}/{p.total:,} rows"))
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim", justify="right")
        grid.add_column()
        rows = Text.assemble(f"{submitted:,} submitted · ", (f"{p.done - p.failed:,} succeeded", "green"), " · ",
                             (f"{p.failed:,} failed", "red" if p.failed else ""), f" · {in_flight:,} in flight",
                             f" · {pending:,} to send")
        grid.add_row("rows", rows)
        if p.mode == "batch":
            grid.add_row("batches", f"{p.batches_in_flight:,} in flight · {p.batches_total:,} created")
            if p.priming:
                grid.add_row("cache", f"priming the cache: {p.priming} request{'s' if p.priming != 1 else ''} "
                                      "(the rest is sent once it has ended)")
        else:
            grid.add_row("mode", f"messages (POST {p.url or '/v1/messages'}, no batches)")
        grid.add_row("cost", f"${p.cost_usd:,.4f}" if p.cost_usd is not None else "unknown (model not priced)")
        eta = self.eta(p, elapsed)
        grid.add_row("time", f"{format_seconds(elapsed)} elapsed"
                     + (f" · ETA {format_seconds(eta)}" if eta is not None else ""))
        return Group(bar, grid)

    def close(self) -> None:
        """Stop the live display (leaving its last frame on screen); a no-op in plain mode or when closed."""
        live, self._live = self._live, None
        for handler, old in reversed(self._swapped):
            if old is not None:
                handler.setStream(old)
        self._swapped = []
        if live is not None:
            if self.p is not None:
                live.update(self, refresh=True)
            live.stop()


def _stderr_isatty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def format_seconds(s: float) -> str:
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
