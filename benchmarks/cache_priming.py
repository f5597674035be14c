"""Cache priming: the label job with and without it, on an emulator whose batches are cold.

    .venv/bin/python benchmarks/cache_priming.py [--rows 300] [--processing-seconds 5]

Runs jobs/label-tickets.toml (a ~34,000-character labelling guide sent as a cached system prompt,
batches of 100) on its first N rows twice against `batchrun emulator --cold-batches` in its own
process — once as it is (priming on: one request alone first, then the rest) and once with
`--no-cache-prime` — and prints for each: the rows that wrote and read the cache, the read rate, the
cost batchrun reports and the wall time. The emulator's batches end `--processing-seconds` after
creation: priming costs one such round trip before the rest is sent (real batches take minutes).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BATCHRUN, EmulatorProcess  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--processing-seconds", type=float, default=5.0)
    args = ap.parse_args()
    emu = EmulatorProcess("--cold-batches", "--processing-seconds", str(args.processing_seconds))
    base = emu.base_url
    try:
        print(f"label-tickets, first {args.rows} rows, batches of 100, cold-batch emulator "
              f"(batches end {args.processing_seconds:g} s after creation)")
        for label, extra in (("primed", []), ("not primed", ["--no-cache-prime"])):
            emu.reset()
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "o.parquet"
                env = dict(os.environ, ANTHROPIC_BASE_URL=base, ANTHROPIC_API_KEY="bench-key")
                t0 = time.perf_counter()
                proc = subprocess.run(BATCHRUN + [
                    "run", str(ROOT / "jobs" / "label-tickets.toml"), "--limit", str(args.rows), "--output", str(out),
                    "--state", str(Path(tmp) / "s.sqlite"), "--poll-interval", "0.5", "-q", *extra],
                    env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    sys.exit(f"{label}: batchrun exited {proc.returncode}:\n{proc.stderr}")
                rows = pq.read_table(out).to_pylist()
                wrote = sum(1 for r in rows if r["cache_creation_input_tokens"])
                read = sum(1 for r in rows if r["cache_read_input_tokens"])
                cost = sum(r["cost_usd"] for r in rows)
                cache = next((line.strip() for line in proc.stderr.splitlines() if line.strip().startswith("cache:")),
                             "")
                print(f"  {label:>10}: {len(rows)} rows, {wrote} wrote the cache, {read} read it "
                      f"({read / len(rows):.1%}); cost ${cost:.4f}; wall {wall:.1f} s")
                if cache:
                    print(f"  {'':>10}  summary: {cache}")
    finally:
        emu.stop()


if __name__ == "__main__":
    main()
