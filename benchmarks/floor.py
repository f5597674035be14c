"""The floor: the least code that does batchrun's job with no checkpoint at all.

Read the CSV with pyarrow, render the prompt of every row with str.format, build the Messages
requests, POST them in batches of 10,000 with httpx, poll until every batch has ended, download the
results, join them to the input rows and write one Parquet file. Nothing is durable: a crash loses
everything, a retry would pay twice. It is what batchrun's overhead is measured against.

    ANTHROPIC_BASE_URL=http://127.0.0.1:8765 ANTHROPIC_API_KEY=x \
        python benchmarks/floor.py tickets.csv floor.parquet
"""
from __future__ import annotations

import json
import os
import sys
import time

import httpx
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

MODEL = "claude-haiku-4-5"
MAX_TOKENS = 64
BATCH = 10_000
ID_COLUMN = "ticket_id"
# the same prompt as bench.py passes to batchrun (there as a Jinja2 template)
# (the issue's job, `Review {{ title }}: {{ body }}`, with the tickets' subject as the title)
PROMPT = "Review {subject}: {body}"
JINJA_PROMPT = "Review {{ subject }}: {{ body }}"
PROMPT_COLUMNS = ("subject", "body")
# USD per million tokens (claude-haiku-4-5), batches at half price
PRICE_IN, PRICE_OUT = 1.00 * 0.5, 5.00 * 0.5


def run(input_path: str, output_path: str, *, poll_interval: float = 0.2) -> int:
    base = os.environ.get("ANTHROPIC_BASE_URL", "https://api.anthropic.com").rstrip("/")
    headers = {"x-api-key": os.environ["ANTHROPIC_API_KEY"], "anthropic-version": "2023-06-01"}
    client = httpx.Client(base_url=base, headers=headers, timeout=600.0)

    table = pacsv.read_csv(input_path, parse_options=pacsv.ParseOptions(newlines_in_values=True))
    ids = table.column(ID_COLUMN).to_pylist()
    cols = {name: table.column(name).to_pylist() for name in PROMPT_COLUMNS}
    n = table.num_rows

    # submit
    batch_ids = []
    for start in range(0, n, BATCH):
        requests = []
        for i in range(start, min(start + BATCH, n)):
            text = PROMPT.format(**{k: ("" if v[i] is None else v[i]) for k, v in cols.items()})
            requests.append({"custom_id": ids[i], "params": {
                "model": MODEL, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": text}]}})
        r = client.post("/v1/messages/batches", json={"requests": requests})
        r.raise_for_status()
        batch_ids.append(r.json()["id"])

    # poll, then download
    results: dict = {}
    pending = list(batch_ids)
    while pending:
        still = []
        for bid in pending:
            info = client.get(f"/v1/messages/batches/{bid}").json()
            if info["processing_status"] != "ended":
                still.append(bid)
                continue
            with client.stream("GET", info["results_url"]) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line:
                        item = json.loads(line)
                        results[item["custom_id"]] = (bid, item["result"])
        pending = still
        if pending:
            time.sleep(poll_interval)

    # join in input order and write
    out: dict = {k: [] for k in ("custom_id", "status", "text", "stop_reason", "model", "input_tokens",
                                 "output_tokens", "cost_usd", "error_type", "error_message", "batch_id")}
    for cid in ids:
        bid, res = results.get(cid, (None, {"type": "errored", "error": {"type": "missing"}}))
        msg = res.get("message") or {}
        usage = msg.get("usage") or {}
        err = (res.get("error") or {})
        err = err.get("error", err) if isinstance(err.get("error"), dict) else err
        tin, tout = usage.get("input_tokens"), usage.get("output_tokens")
        out["custom_id"].append(cid)
        out["status"].append(res.get("type"))
        out["text"].append("".join(b.get("text", "") for b in msg.get("content") or [] if b.get("type") == "text")
                           if msg else None)
        out["stop_reason"].append(msg.get("stop_reason"))
        out["model"].append(msg.get("model"))
        out["input_tokens"].append(tin)
        out["output_tokens"].append(tout)
        out["cost_usd"].append((tin * PRICE_IN + tout * PRICE_OUT) / 1e6 if tin is not None else None)
        out["error_type"].append(err.get("type") if err else None)
        out["error_message"].append(err.get("message") if err else None)
        out["batch_id"].append(bid)
    for name, values in out.items():
        table = table.append_column(name if name not in table.column_names else f"result_{name}", pa.array(values))
    pq.write_table(table, output_path, compression="zstd")
    client.close()
    return n


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python benchmarks/floor.py INPUT.csv OUTPUT.parquet")
    t = time.perf_counter()
    n = run(argv[0], argv[1])
    print(f"floor: {n} rows in {time.perf_counter() - t:.2f} s -> {argv[1]}")


if __name__ == "__main__":
    main(sys.argv[1:])
