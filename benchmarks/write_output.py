"""The cost of writing the output: one Parquet file against a Hive-partitioned dataset.

    python benchmarks/write_output.py                # 100k rows
    python benchmarks/write_output.py --rows 1000000

Runs one job end to end against the emulator (its own process, validation off), then the same
command again with each output layout. A finished job sends nothing, so each rerun is the write
stage alone (plus startup): the input streamed again, joined to its results from SQLite, and written.
Prints wall time and peak RSS per layout, and the number of partitions and files written.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import BATCHRUN, EmulatorProcess, batchrun_argv, dataset, fresh_state, timed  # noqa: E402

LAYOUTS = [
    ("one file", []),
    ("by priority (5 values)", ["--partition-by", "priority"]),
    ("by customer (many values)", ["--partition-by", "customer"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--work", default=str(HERE / "work"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = dataset(args.rows, work)
    state = work / "state-write.sqlite"
    fresh_state(state)
    emu = EmulatorProcess.timing(0.2)
    env = {**os.environ, "ANTHROPIC_API_KEY": "sk-ant-bench", "ANTHROPIC_BASE_URL": emu.base_url}
    try:
        first = work / "write-first.parquet"
        _, wall, rss = timed(BATCHRUN + batchrun_argv(data, first, state), env, work / "write-first.log")
        print(f"{args.rows} rows, whole job once: {wall:.2f} s, peak RSS {rss:.0f} MiB")
        print(f"{'layout':28} {'wall s':>7} {'peak MiB':>9} {'dirs':>6} {'files':>6}")
        for name, extra in LAYOUTS:
            out = work / ("write-file.parquet" if not extra else f"write-{extra[1]}")
            _, wall, rss = timed(BATCHRUN + batchrun_argv(data, out, state) + extra, env, work / "write.log")
            if out.is_dir():
                dirs = sum(1 for p in out.iterdir() if p.is_dir())
                files = sum(len(f) for _, _, f in os.walk(out))
            else:
                dirs, files = 0, 1
            print(f"{name:28} {wall:7.2f} {rss:9.0f} {dirs:6d} {files:6d}")
            shutil.rmtree(out) if out.is_dir() else out.unlink()
    finally:
        emu.stop()
        fresh_state(state)


if __name__ == "__main__":
    main()
