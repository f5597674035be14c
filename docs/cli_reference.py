"""Writes docs/cli.md, the CLI reference, from the commands' own --help (as sqlite-utils does), so it
cannot drift from the code: `python docs/cli_reference.py`. tests/test_docs.py checks it is current."""
from __future__ import annotations

import sys
from pathlib import Path

from click.testing import CliRunner

HERE = Path(__file__).resolve().parent
HEAD = ("# CLI reference\n\nEvery command's `--help`, as the code prints it (regenerate with "
        "`python docs/cli_reference.py`).\n")


def render() -> str:
    from batchrun.cli import main
    runner = CliRunner()
    parts = [HEAD, "\n## batchrun\n\n```\n" + runner.invoke(main, ["--help"], prog_name="batchrun", terminal_width=100).output + "```\n"]
    for name in sorted(main.commands):
        text = runner.invoke(main, [name, "--help"], prog_name="batchrun", terminal_width=100).output
        parts.append(f"\n## batchrun {name}\n\n```\n{text}```\n")
    return "".join(parts)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    (HERE / "cli.md").write_text(render(), encoding="utf-8")
    print(f"wrote {HERE / 'cli.md'}")
