"""Messages mode at full scale: 150 rows under a real 100-requests-per-minute limit (about 45 s).

    .venv/bin/python benchmarks/messages_rpm.py [--rows 150] [--rpm 100] [--wrap]

The test suite checks the same behaviour with the emulator's rate-limit window scaled down to
seconds (tests/test_messages_mode.py); this runs it in real time against `batchrun emulator --rpm N`
in its own process and prints how often batchrun ran into the limit (429 replies), how long it took,
whether any batch was created, and whether every row came back joined to its own reply. The
emulator's limit is a token bucket, as the API's: 100 at once, then 100 a minute as it refills.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_data  # noqa: E402

BATCHRUN = [sys.executable, "-c", "from batchrun.cli import main; main()"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=150)
    ap.add_argument("--rpm", type=int, default=100)
    ap.add_argument("--wrap", action="store_true", help="the emulator wraps replies as a gateway does ({code, data})")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    emu = subprocess.Popen(BATCHRUN + ["emulator", "--port", str(port), "--rpm", str(args.rpm)]
                           + (["--wrap-messages"] if args.wrap else []),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{base}/_emulator/stats", timeout=2).read()
                break
            except OSError:
                time.sleep(0.1)
        with tempfile.TemporaryDirectory() as tmp:
            data, out = Path(tmp) / "t.csv", Path(tmp) / "o.parquet"
            make_data.make(args.rows, str(data))
            env = dict(os.environ, ANTHROPIC_BASE_URL=base, ANTHROPIC_API_KEY="bench-key")
            t0 = time.perf_counter()
            proc = subprocess.run(BATCHRUN + [
                "run", "--input", data, "--output", out, "--id-column", "ticket_id", "--mode", "messages",
                "--prompt", "Summarise: {{ subject }}", "--model", "claude-haiku-4-5", "--max-tokens", "100",
                "-q"], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"batchrun failed ({proc.returncode}): {proc.stderr[-2000:]}")
            stats = json.loads(urllib.request.urlopen(f"{base}/_emulator/stats", timeout=5).read())
            rows = pq.read_table(out).to_pylist()
            own = sum(1 for r in rows if r["status"] == "succeeded" and r["text"].startswith("Reply to: Summarise: "))
    finally:
        emu.terminate()
        emu.wait()
    print(f"{args.rows} rows, messages mode, limit {args.rpm} requests/minute{' (wrapped replies)' if args.wrap else ''}:")
    print(f"  wall {wall:.1f} s; POST /v1/messages {stats['messages_calls']} times, 429 replies "
          f"{stats['messages_429']} (issue #7: <= 15); batches created {stats['batches_created']}")
    print(f"  rows joined to their own reply: {own} of {len(rows)}")


if __name__ == "__main__":
    main()
