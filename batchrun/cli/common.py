"""Shared pieces of the CLI: the job options every command takes, and the error boundary."""
from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

import click

from ..errors import (ApiError, AuthError, BatchrunError, ExitCode, NoBatchApiError, SpecError, redact,
                      register_secret)
from ..spec import Flag, JobSpec, job_flags
from ..states import IN_FLIGHT, PENDING
from ..summary import priming_text

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


def _job_option(key: str, flag: Flag) -> list:
    """The click option(s) of one job key: `--key` (with dashes) feeding the key, and its old spelling, hidden."""
    opt = "--" + key.replace("_", "-")
    kw: dict[str, Any] = {"help": flag.help, "metavar": flag.metavar}
    if flag.choices:
        kw["type"] = click.Choice(flag.choices)
    elif flag.type is not None:
        kw["type"] = flag.type
    if flag.many:
        kw["multiple"] = True
    if flag.switch:
        kw.update(is_flag=True, default=None)
    if flag.negatable:
        opt, kw["default"] = f"{opt}/--no-{opt[2:]}", None
    options = [click.option(opt, key, **kw)]
    if flag.old:
        options.append(click.option(flag.old, f"{key}_alias", multiple=flag.many, hidden=True))
    return options


# The job options of run, validate, estimate and cancel: made from JobSpec's keys (spec.job_flags), so a
# key added there is a flag here.
JOB_OPTIONS = [click.argument("job_file", metavar="[JOB.toml]", required=False, type=click.Path(dir_okay=False)),
               *(option for key, flag in job_flags() for option in _job_option(key, flag))]


def job_options(fn: Callable) -> Callable:
    for option in reversed(JOB_OPTIONS):
        fn = option(fn)
    return fn


SPEC_KEYS = tuple(key for key, _ in job_flags())
# Old flag spellings, kept (hidden) so that existing command lines still work: flag -> job key.
FLAG_ALIASES = {f"{key}_alias": key for key, flag in job_flags() if flag.old}
_REPEATED = tuple(key for key, flag in job_flags() if flag.many)


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
    for key in _REPEATED:   # repeatable flags: each value parsed as the job key's string is
        overrides[key] = tuple(overrides[key]) if overrides.get(key) else None
    return JobSpec.load(job_file, overrides)


class Program(click.Group):
    """The `batchrun` group. Called as the program (the console script, `main()`), it ends the process at
    once after a command that asked for it (`end_at_once`: `run`, which loads pyarrow and pandas) has ended —
    what it says said, its state file closed — with the command's exit code, without the interpreter's
    teardown of every module loaded (~0.1 s), which a finished command does not need. Any other command, and
    callers in a process of their own (CliRunner, `main.main`), end with the usual SystemExit."""

    end_at_once = False
    as_program = False   # True while a command runs as the program: what it sets for its process is its own

    def __call__(self, *args, **kwargs):
        Program.end_at_once, Program.as_program = False, True
        try:
            self.main(*args, **kwargs)
        except SystemExit as exc:
            if not Program.end_at_once:
                raise
            end(exc.code)
        finally:
            Program.as_program = False


def end(code) -> None:
    """Exit with `code` (as sys.exit takes it) at once: streams and log handlers flushed, no teardown. The
    usual exit instead while a thread that is not a daemon still runs, when a stream cannot be flushed, or
    under a profiler or a tracer (cProfile, coverage, a debugger: they report at the usual exit)."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - (a closed pipe, say) left to the interpreter's exit, which reports it
        sys.exit(code)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    os._exit(code)


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
        key = (p.done, p.counts.get(IN_FLIGHT, 0), p.batches_total)
        if key == self.last and now - self.last_at < self.every:
            return
        self.last, self.last_at = key, now
        cost = f"${p.cost_usd:.4f}" if p.cost_usd is not None else "cost unknown"
        eta = self.eta(p)
        eta = f", ETA {format_seconds(eta)}" if eta is not None else ""
        where = (f"in {p.batches_in_flight} batches ({p.batches_total} created)" if p.mode == "batch"
                 else f"over POST {p.url or '/v1/messages'}")
        if p.priming:
            where += f", {priming_text(p.priming, rest=False)}"
        click.echo(f"progress: {p.done}/{p.total} rows done ({p.failed} failed), "
                   f"{p.counts.get(IN_FLIGHT, 0)} in flight {where}, {cost}, "
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
        in_flight = p.counts.get(IN_FLIGHT, 0)
        pending = p.counts.get(PENDING, 0)
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
                grid.add_row("cache", priming_text(p.priming))
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
