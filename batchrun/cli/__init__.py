"""The `batchrun` command: a thin layer over the library, one module per command group."""
from __future__ import annotations

import logging
import os
import sys
import threading

import click

from .common import EXIT_CODES_HELP
from .run_cmd import cancel, estimate, run, validate
from .state_cmd import jobs, status
from .report_cmd import report


class Program(click.Group):
    """The `batchrun` group, which ends the process when it is the program (see __call__)."""

    def __call__(self, *args, **kwargs):
        """`batchrun` as the program (the console script, `main()`): once the command has ended (what it says
        said, its state file closed), the process ends at once with the command's exit code, without the
        interpreter's teardown of every module loaded (pyarrow, pandas: ~0.1 s), which a finished command does
        not need. Callers in a process of their own (CliRunner, `main.main`) get the usual SystemExit."""
        try:
            self.main(*args, **kwargs)
            code = 0
        except SystemExit as exc:
            code = exc.code
        end(code)


def end(code) -> None:
    """Exit with `code` (as sys.exit takes it) at once: streams and log handlers flushed, no teardown. The
    usual exit instead while a thread that is not a daemon still runs, or when a stream cannot be flushed."""
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


@click.group(cls=Program, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"],
                                                                    "max_content_width": 100})
@click.version_option(package_name="batchrun")
def main() -> None:
    """Run LLM jobs over CSV/Parquet tables through Anthropic's Message Batches API.

    Every row becomes one request; requests are packed into batches, polled, and the replies are
    joined back to their rows, with token counts and dollar cost, in a Parquet file. All state lives
    in a SQLite file, so the same command can be run again after any interruption (or every ten
    minutes from cron) and the job simply moves on — nothing is paid for twice.

    Key and endpoint: ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL, as the official SDK reads them.
    """


main.add_command(run)
main.add_command(validate)
main.add_command(estimate)
main.add_command(cancel)
main.add_command(status)
main.add_command(jobs)
main.add_command(report)

try:
    from .emulator_cmd import emulator
    main.add_command(emulator)
except ImportError:  # pragma: no cover - the emulator is being written
    pass
