"""`batchrun run`, `validate` and `cancel`."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import TYPE_CHECKING, Iterator, Optional

import click

from ..errors import ExitCode, InputError

if TYPE_CHECKING:
    from ..runner import Runner
from .common import (EXIT_CODES_HELP, JOB_OPTIONS, SPEC_KEYS, Program, ProgressPrinter, handle_errors,
                     job_options, setup_logging, spec_from_options)

EMULATOR_OPTION = click.option("--emulator", "use_emulator", is_flag=True,
                               help="Run against the built-in API emulator on loopback (no key needed, nothing is "
                               "billed). Its replies go to batchrun-emulator-state.sqlite where the default state "
                               "file would be, unless --state (or the job's state) names one.")
CONNECTION_OPTIONS = [
    click.option("--api-key", envvar=None, metavar="KEY", help="API key (default: $ANTHROPIC_API_KEY). Never stored."),
    click.option("--base-url", metavar="URL", help="API base URL (default: $ANTHROPIC_BASE_URL or https://api.anthropic.com)."),
    EMULATOR_OPTION,
    click.option("-v", "--verbose", is_flag=True, help="More log lines."),
    click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors."),
]


EMULATOR_STATE = "batchrun-emulator-state.sqlite"


def connection_options(fn):
    for option in reversed(CONNECTION_OPTIONS):
        fn = option(fn)
    return fn


@contextlib.contextmanager
def maybe_emulator(enabled: bool, options: dict) -> Iterator[Optional[str]]:
    """Start the built-in emulator on a free loopback port for this command when asked."""
    if not enabled:
        yield None
        return
    from ..emulator import Emulator, EmulatorConfig, serve_in_thread

    # batches that do not read each other's cache writes, as the API's cold batches (see cache priming)
    handle = serve_in_thread(Emulator(EmulatorConfig(processing_seconds=2.0, cold_batches=True)), host="127.0.0.1",
                             port=0)
    click.echo(f"batchrun: using the built-in emulator at {handle.base_url} (no API key needed; nothing billed)",
               err=True)
    try:
        yield handle.base_url
    finally:
        handle.stop()


def lean_malloc(arenas: int = 2, mmap_threshold: int = 128 * 1024) -> None:
    """Keep what `run`'s process frees from staying in its RSS (glibc's malloc; elsewhere nothing is done):
    - at most `arenas` malloc arenas: glibc gives threads that allocate arenas of their own (up to 8 per core),
      each keeping what was freed in it, and a run has several (the plan's writer, the chunk rendered ahead,
      the next batch's download, the output's join);
    - blocks from `mmap_threshold` bytes up always mapped on their own, and unmapped when freed: glibc raises
      that threshold to the size of any mapped block freed (up to 32 MiB), after which a batch's create body
      (megabytes) comes from an arena that keeps it.
    Issue #17, bench.py's job, peak RSS in process at 100k / 20k rows: 341-355 / ~255 MiB as glibc left it;
    325-329 / 254-280 with two arenas; 295-296 / 236-244 with both. Called before `run` starts its threads,
    and only when batchrun is the program (`Program.as_program`): a process that calls the command itself
    (CliRunner, `main.main`, the library) keeps its malloc as it set it."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.mallopt(-8, arenas)           # M_ARENA_MAX
        libc.mallopt(-3, mmap_threshold)   # M_MMAP_THRESHOLD (set: no longer raised by glibc)
    except (OSError, AttributeError):
        pass


def make_runner(job_file, options: dict, base_url_override: Optional[str] = None, **kw) -> "Runner":
    from ..fingerprint import ahead
    spec = spec_from_options(job_file, options)
    ahead(spec.input, spec.limit, spec.shard_pair)   # the input hashed (without the GIL) while the rest imports
    from ..api import BUILTIN_EMULATOR, check_secure_url
    from ..runner import Runner   # (imported here: `batchrun --help`, `jobs`, `status` start without them)
    api_key = options.get("api_key")
    base_url = options.get("base_url")
    if base_url and not base_url_override:
        check_secure_url(base_url, "--base-url")   # named as given (the client knows only the URL)
    if base_url_override:
        # the emulator started for this command: an endpoint of its own, whatever its (free) port, so
        # that running the demo again sends nothing, and no other server's answers are taken for its own
        base_url, api_key, kw["endpoint"] = base_url_override, api_key or "emulator", BUILTIN_EMULATOR
        if not spec.state:
            # a state file of its own (its answers are the emulator's, not a model's), where the
            # default one would be; a state given by the job file or a flag is used as given
            from pathlib import Path
            spec.state = str(Path(spec.state_path).with_name(EMULATOR_STATE))
        else:
            click.echo(f"batchrun: note: the emulator's replies are recorded in {spec.state}, as the built-in "
                       "emulator's own: a run against any other endpoint with this state file never takes them "
                       f"for its answers (leave state unset to keep them in a file apart, {EMULATOR_STATE})",
                       err=True)
    return Runner(spec, api_key=api_key, base_url=base_url, allow_unknown_model=spec.allow_unknown_model, **kw)


@click.command(epilog=EXIT_CODES_HELP)
@job_options
@connection_options
@click.option("--no-wait", is_flag=True, help="Submit what can be submitted, collect what has ended, then exit "
              "(code 5 while batches still run). For cron.")
@click.option("--resume-canceled", is_flag=True, help="Send rows that ended canceled again.")
@click.option("--resend-lost", is_flag=True, help="Send again rows whose batch the API no longer knows (404), "
              "whose results are gone (after 29 days), whose result line never came (result_missing) or whose lost "
              "create's batch could not be proved the job's (batch_unproven): they may have been paid for once "
              "already.")
@click.option("--retry-errored", is_flag=True, help="Send again the rows that ended errored (never the succeeded "
              "ones), saying first how many and the most they may cost; --max-cost still holds.")
@click.option("--wait-lock", is_flag=True, help="If another run holds the job, wait for it instead of exiting.")
@handle_errors
def run(job_file, no_wait, resume_canceled, resend_lost, retry_errored, wait_lock, **options):
    """Run a job: plan, submit, poll, collect, retry and write the output.

    Idempotent: run it again after any interruption and it continues where it stopped; a finished
    job submits nothing and rewrites the same output.

    \b
    Examples:
      batchrun run jobs/classify-reviews.toml --emulator
      batchrun run --input tickets.csv --id-column id --prompt 'Summarise: {{ body }}' \\
                   --model claude-haiku-5-5 --max-tokens 200 --output out.parquet
    """
    if Program.as_program:
        lean_malloc()
    setup_logging(options.get("verbose"), options.get("quiet"))
    with maybe_emulator(options.pop("use_emulator"), options) as emu_url:
        printer = None if options.get("quiet") else ProgressPrinter()
        runner = make_runner(job_file, options, emu_url, resume_canceled=resume_canceled, resend_lost=resend_lost,
                             retry_errored=retry_errored,
                             wait_lock=wait_lock,
                             on_progress=printer)
        try:
            try:
                result = runner.run(wait=not no_wait)
            finally:
                if printer is not None:
                    printer.close()
            print_summary(runner, result)
        finally:
            runner.close()
    Program.end_at_once = True   # (pyarrow and pandas loaded: their teardown is not waited for)
    sys.exit(result.exit_code)


def print_summary(runner, result) -> None:
    """The end-of-run summary: rows by status, failures by cause, tokens and cost by kind."""
    from ..summary import (cache_line, failures_by_cause, invalid_output_reasons, job_pricing, job_status,
                           kinds_text, usage_problems, usage_text)
    from .common import format_seconds
    store, spec = runner.store, runner.spec
    job = store.job(result.job_id)
    figures = result.figures or runner.figures()   # (read once, when the run ended)
    st = job_status(store, job, figures)
    counts = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in st["counts"].items() if n)
    money = lambda v: f"${v:,.6f}" if v is not None else "unknown"
    head = "finished" if result.finished else "in progress"
    echo = lambda line: click.echo(line, err=True)
    echo(f"job {result.job_id[:12]}: {head} after {format_seconds(runner.elapsed)}: {counts}")
    causes = failures_by_cause(store, result.job_id, st["counts"])
    if causes:
        echo("  failures: " + ", ".join(f"{n} {cause}" + (f" ({t})" if t != cause else "") for cause, t, n in causes))
    reasons, others = invalid_output_reasons(store, result.job_id, counts=st["counts"])
    if reasons:
        echo("  invalid output: " + "; ".join(f"{n} × {_shorten(reason, 120)}" for reason, n in reasons)
             + (f"; {others} with other reasons" if others else ""))
    usage = usage_text(usage_problems(store, result.job_id, figures))
    if usage:
        echo(f"  usage: {usage}")
    t = st["tokens"]
    echo(f"  tokens: {t['input']:,} input, {t['output']:,} output, {t['cache_write']:,} cache write, "
         f"{t['cache_read']:,} cache read")
    pricing = job_pricing(store, result.job_id, runner.job.catalog, spec.model, batch=spec.mode == "batch",
                          cache_ttl=spec.cache_ttl, figures=figures)
    detail = f" ({kinds_text(pricing, money)})" if pricing is not None else ""
    if st["reused_rows"]:
        detail += f"; {st['reused_rows']} rows reused answers already paid for"
    echo(f"  cost: {money(result.cost_usd)}{detail}")
    if not result.sent and not result.replies:
        echo(f"  this run: nothing sent; the job cost {money(result.cost_usd)}")
    else:
        echo(f"  this run: {result.sent:,} requests sent, {result.replies:,} replies recorded, "
             f"{money(result.run_cost_usd)} spent; the job cost {money(result.cost_usd)} in all")
    cache = cache_line(st["cache"], float(pricing.cache_saved) if pricing is not None else None,
                       st["cache"]["priming"])
    if cache:
        echo(f"  {cache}")
    if result.finished:
        echo(f"  output: {result.output}")
    else:
        echo("  batches are still running: run the same command again to continue")


@click.command()
@job_options
@click.option("--show", type=int, default=2, show_default=True, metavar="N", help="Rendered requests to print.")
@handle_errors
def validate(job_file, show, **options):
    """Check a job without sending anything: read the whole input, check the spec against the model
    catalog, and print the first rendered requests."""
    from ..validation import validate_job
    spec = spec_from_options(job_file, options)
    report = validate_job(spec, show=show)
    for warning in report["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"ok: {report['rows']} rows, model {spec.model}, job {report['job_id'][:12]}")
    for item in report["requests"]:
        click.echo(json.dumps(_shorten(item), ensure_ascii=False, indent=2))


def _shorten(value, limit: int = 600):
    """Long strings (a system prompt of many pages, an image) cut for display."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"… (+{len(value) - limit:,} characters)"
    if isinstance(value, dict):
        return {k: _shorten(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_shorten(v, limit) for v in value]
    return value


def cancel_options(fn):
    """The job options of `run` behind a JOB argument, and the connection options but --emulator (an
    emulator started for one command knows no batches to cancel)."""
    options = [click.argument("job", metavar="[JOB]", required=False), *JOB_OPTIONS[1:],
               *(o for o in CONNECTION_OPTIONS if o is not EMULATOR_OPTION)]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command()
@cancel_options
@click.option("--no-wait", is_flag=True, help="Send the cancels and exit, without waiting for the batches to end "
              "(the next run, or cancel, records their results).")
@handle_errors
def cancel(job, no_wait, **options):
    """Cancel a job: its batches in flight are canceled and its rows not yet sent end canceled.

    JOB is the job's id, a unique prefix of it, or its name, as `batchrun status` shows them, in the
    state file --state (default: batchrun-state.sqlite); the job's input is not needed. JOB can also
    be a job file (JOB.toml), or left out, with the flags given to `run`.

    Then cancel waits (up to a minute; not with --no-wait) for the canceled batches to end and records
    their results: rows end canceled, or succeeded if they ran before the cancel. `batchrun run
    --resume-canceled` sends the canceled rows again later.

    \b
    Examples:
      batchrun cancel c95fcc6007ce --state runs/state.sqlite
      batchrun cancel jobs/classify-reviews.toml
    """
    from ..runner import Runner
    setup_logging(options.get("verbose"), options.get("quiet"))
    if job is not None and not (os.path.exists(job) or job.endswith(".toml")):
        flags = [k for k in SPEC_KEYS if k != "state" and options.get(k) not in (None, (), [])]
        if flags:
            raise InputError(f"--{flags[0].replace('_', '-')}: {job!r} names a stored job by its id; flags that "
                             "describe a job go with a job file or with no JOB")
        state = options.get("state") or "batchrun-state.sqlite"
        if not os.path.exists(state):
            raise InputError(f"{job}: no such job file, and no state file {state} to find a job {job!r} in "
                             "(pass --state PATH)")
        runner = Runner.for_stored_job(state, job, api_key=options.get("api_key"), base_url=options.get("base_url"))
    else:
        runner = make_runner(job, options)
    try:
        result = runner.cancel(wait=0.0 if no_wait else Runner.CANCEL_WAIT)
    finally:
        runner.close()
    rows = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in sorted(result.counts.items()) if n)
    click.echo(f"job {result.job_id[:12]}: canceled {result.batches_canceled} batch(es) in flight; rows: {rows}",
               err=True)
    if result.batches_running:
        click.echo(f"  {result.batches_running} batch(es) have not ended yet: the next `batchrun run` (or cancel) "
                   "records their results", err=True)
    sys.exit(ExitCode.OK)


@click.command()
@job_options
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def estimate(job_file, as_json, **options):
    """Count a job's requests and input tokens and price them, without creating a batch.

    Token counts come from the API's count_tokens endpoint with the job's own model: every request
    for small jobs, a random sample extrapolated by characters for large ones (said so). The cost is
    a bracket: minimum (input only, cache reads where the system prompt is cached) to maximum (every
    request using its full max_tokens, cache writes), batch discount applied, rounded outwards: a
    --max-cost of the maximum shown is never refused up front. For a job already partly done, only
    the rows still to send are priced.
    """
    setup_logging(options.get("verbose"), True if as_json else options.get("quiet"))
    with maybe_emulator(options.pop("use_emulator"), options) as emu_url:
        runner = make_runner(job_file, options, emu_url)
        try:
            est = runner.estimate()
        finally:
            runner.close()
    if as_json:
        click.echo(json.dumps(est.as_dict(), indent=2))
        return
    money = lambda v: f"${v:,.4f}" if v is not None else "unknown (model not priced)"
    # the bracket to 4 decimals, rounded outwards: a --max-cost of the maximum shown is never refused
    out = lambda v, way: None if v is None else float(Decimal(str(v)).quantize(Decimal("0.0001"), rounding=way))
    counted = {"exact": "counted exactly", "approximate": "approximated from characters"}.get(est.method, f"sampled {est.sample_size}, extrapolated by characters")
    lines = [
        ("model", f"{est.model} ({'batch, 50% off' if est.batch else 'messages, standard prices'})"),
        ("rows done / failed / in flight", f"{est.done} / {est.failed} / {est.in_flight}"),
        ("requests to send", f"{est.requests}"),
        ("input tokens", f"{est.input_tokens:,} ({counted})"),
        ("max output tokens", f"{est.max_tokens:,} per request"),
        ("cost (min … max)", f"{money(out(est.cost_usd_min, ROUND_FLOOR))} … "
                             f"{money(out(est.cost_usd_max, ROUND_CEILING))}"),
        ("spent so far", money(est.spent_usd)),
    ]
    if est.cache:
        lines.insert(-1, ("prompt cache", est.cache))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        click.echo(f"{k:<{width}}  {v}")
