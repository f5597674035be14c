"""The `batchrun` command: a thin layer over the library, one module per command group."""
from __future__ import annotations

import click

from .common import EXIT_CODES_HELP, Program
from .run_cmd import cancel, estimate, run, validate
from .state_cmd import jobs, status
from .report_cmd import report


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
