"""`batchrun emulator`: serve the built-in API emulator on loopback."""
from __future__ import annotations

from typing import Optional

import click


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, type=int, help="Port to listen on (0: any free port).")
@click.option("--processing-seconds", type=float, default=1.0, show_default=True,
              help="How long each batch stays in_progress.")
@click.option("--fault-rate", type=float, default=0.0, show_default=True,
              help="Fraction of API calls answered with 429 / 500 / 529 or a dropped connection.")
@click.option("--errored-rate", type=float, default=0.0, show_default=True,
              help="Fraction of batch requests that end errored (overloaded_error / api_error).")
@click.option("--expired-rate", type=float, default=0.0, show_default=True,
              help="Fraction of batch requests that end expired.")
@click.option("--truncate-rate", type=float, default=0.0, show_default=True,
              help="Fraction of results downloads cut short.")
@click.option("--drop-after-create", type=int, default=0, show_default=True, metavar="N",
              help="The next N batch creates create the batch, then drop the connection before the reply "
              "(a lost reply: the client must find the batch, not create it again).")
@click.option("--create-delay", type=float, default=0.0, show_default=True, metavar="SECONDS",
              help="How long a batch create takes once its body is in; the batch shows in the list only then "
              "(a client killed meanwhile must find it, not create it again).")
@click.option("--missing-result-lines", type=int, default=0, show_default=True, metavar="N",
              help="Every results file lacks N lines, always the same ones (a result that never arrives).")
@click.option("--retry-after", type=float, default=0.01, show_default=True, metavar="SECONDS",
              help="The wait advertised (retry-after, retry-after-ms) on injected 429 replies.")
@click.option("--archive-after", "archive_after", type=float, default=None, metavar="SECONDS",
              help="Archive batches this long after creation: their results then answer 404 (results gone).")
@click.option("--max-batch-requests", type=int, default=100_000, show_default=True, metavar="N",
              help="Requests per batch; a larger create answers 413 request_too_large.")
@click.option("--api-key", metavar="KEY", default=None,
              help="Accept only this key (x-api-key or Authorization: Bearer); default: any key.")
@click.option("--rpm", type=int, default=None, help="Requests per minute allowed on POST /v1/messages.")
@click.option("--input-tpm", type=int, default=None, help="Input tokens per minute allowed on POST /v1/messages.")
@click.option("--output-tpm", type=int, default=None, help="Output tokens per minute allowed on POST /v1/messages.")
@click.option("--rate-window", type=float, default=60.0, show_default=True, metavar="SECONDS",
              help="The 'minute' of --rpm / --input-tpm / --output-tpm, to try limits faster. Limits are "
                   "token buckets, as the API's: each refills fully in this time.")
@click.option("--wrap-messages", is_flag=True,
              help='Answer POST /v1/messages as some gateways do: {"code": 200, "data": <Message>}.')
@click.option("--no-batches", is_flag=True,
              help='Be a gateway without the Message Batches API: its endpoints answer 404 {"detail": "Not Found"}.')
@click.option("--no-count-tokens", is_flag=True,
              help='Be a gateway without count_tokens: it answers 404 {"detail": "Not Found"}.')
@click.option("--openai-ratelimit-headers", is_flag=True,
              help="Send the OpenAI-style x-ratelimit-limit|remaining|reset-requests and -tokens headers (as LiteLLM "
                   "and other gateways do) instead of anthropic-ratelimit-*.")
@click.option("--error-status", type=int, default=None, metavar="STATUS",
              help="Answer every API call with this HTTP status, as a failing gateway does (e.g. 400, 401, 502, 529).")
@click.option("--error-type", default="no_db_connection", show_default=True, metavar="TYPE",
              help="The error.type of the --error-status replies (a gateway's own type, or an API one).")
@click.option("--cold-batches", is_flag=True,
              help="Prompt caching as in a cold batch: no item reads a cache written by another item of its "
                   "batch; a write is read only by batches created after its batch ended.")
@click.option("--no-validate", is_flag=True, help="Skip per-parameter request validation (for benchmarks).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random choice.")
@click.option("--timing", is_flag=True,
              help="A lean mode for benchmarks, so that a timing measures the client, not the emulator: "
                   "validation off, batches that end at once (unless --processing-seconds is given), tokens "
                   "counted by characters, and a threading HTTP server instead of uvicorn.")
@click.pass_context
def emulator(ctx: click.Context, host: str, port: int, processing_seconds: float, fault_rate: float,
             errored_rate: float, expired_rate: float, truncate_rate: float, drop_after_create: int,
             create_delay: float, missing_result_lines: int, retry_after: float,
             archive_after: Optional[float], max_batch_requests: int, api_key: Optional[str], rpm: Optional[int],
             input_tpm: Optional[int], output_tpm: Optional[int], rate_window: float,
             wrap_messages: bool, no_batches: bool, no_count_tokens: bool, openai_ratelimit_headers: bool,
             error_status: Optional[int], error_type: str, cold_batches: bool, no_validate: bool, seed: int,
             timing: bool) -> None:
    """Serve the built-in emulator of the Message Batches API (no network, nothing billed).

    A faithful stand-in for the API for trying jobs offline: batches stay in progress for a while,
    results come back as JSONL in shuffled order, replies are deterministic functions of the
    request ("Reply to: ..." text, JSON that fits the output schema, tool calls that fit the tool's
    schema, cache writes then reads for a long enough cached system prompt), and faults can be
    injected. Point batchrun (or the official SDK) at it:

    \b
      batchrun emulator --port 8765 &
      export ANTHROPIC_BASE_URL=http://127.0.0.1:8765
      export ANTHROPIC_API_KEY=anything
      batchrun run jobs/classify-reviews.toml

    Control endpoints (no key needed): GET /_emulator/stats, POST /_emulator/config (a JSON object
    of settings to change), POST /_emulator/reset. Stop with Ctrl-C.
    """
    from ..emulator import EmulatorConfig, run_server
    from ..emulator.server import run_lean_server

    for name, value in (("--fault-rate", fault_rate), ("--errored-rate", errored_rate),
                        ("--expired-rate", expired_rate), ("--truncate-rate", truncate_rate)):
        if not 0.0 <= value <= 1.0:
            raise click.BadParameter(f"must be between 0 and 1, not {value}", param_hint=name)
    if errored_rate + expired_rate > 1.0:
        raise click.BadParameter("--errored-rate plus --expired-rate must not exceed 1", param_hint="--expired-rate")
    if processing_seconds < 0:
        raise click.BadParameter("must not be negative", param_hint="--processing-seconds")
    if rpm is not None and rpm < 1:
        raise click.BadParameter("must be at least 1", param_hint="--rpm")
    for name, value in (("--input-tpm", input_tpm), ("--output-tpm", output_tpm)):
        if value is not None and value < 1:
            raise click.BadParameter("must be at least 1", param_hint=name)
    if not rate_window > 0:
        raise click.BadParameter("must be more than 0", param_hint="--rate-window")
    for name, value in (("--drop-after-create", drop_after_create), ("--retry-after", retry_after),
                        ("--create-delay", create_delay), ("--missing-result-lines", missing_result_lines),
                        ("--archive-after", archive_after or 0)):
        if value < 0:
            raise click.BadParameter("must not be negative", param_hint=name)
    if error_status is not None and not 400 <= error_status <= 599:
        raise click.BadParameter("must be an HTTP error status (400-599)", param_hint="--error-status")
    if max_batch_requests < 1:
        raise click.BadParameter("must be at least 1", param_hint="--max-batch-requests")

    config = EmulatorConfig(processing_seconds=processing_seconds, fault_rate=fault_rate,
                            errored_rate=errored_rate, expired_rate=expired_rate, truncate_rate=truncate_rate,
                            drop_after_create=drop_after_create, retry_after=retry_after,
                            create_delay=create_delay, missing_result_lines=missing_result_lines,
                            archive_after_seconds=archive_after, max_requests=max_batch_requests, api_key=api_key,
                            rpm=rpm, wrap_messages=wrap_messages, validate=not no_validate, seed=seed,
                            input_tpm=input_tpm, output_tpm=output_tpm, rate_window=rate_window,
                            no_batches=no_batches, no_count_tokens=no_count_tokens,
                            openai_ratelimit_headers=openai_ratelimit_headers, error_status=error_status,
                            error_type=error_type, cold_batches=cold_batches)
    if timing:
        config.validate = False
        config.lean = True
        if ctx.get_parameter_source("processing_seconds") != click.core.ParameterSource.COMMANDLINE:
            config.processing_seconds = 0.0

    def ready(base_url: str) -> None:
        click.echo(f"batchrun emulator listening on {base_url}  (Ctrl-C to stop)")
        click.echo(f"  export ANTHROPIC_BASE_URL={base_url}")
        if api_key is None:
            click.echo("  export ANTHROPIC_API_KEY=emulator   # any key is accepted")
        else:
            click.echo("  export ANTHROPIC_API_KEY=<the key given with --api-key>")

    try:
        if timing:
            run_lean_server(host, port, config, on_ready=ready)
        else:
            run_server(host, port, config, on_ready=ready)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    except KeyboardInterrupt:  # pragma: no cover
        pass
    click.echo("batchrun emulator stopped")
