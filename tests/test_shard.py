"""Sharding one table across several runs: --shard K/N, each shard an independent job."""
from __future__ import annotations

import csv

import pyarrow.parquet as pq

from batchrun.errors import ExitCode
from tests.test_pipeline import run_args, source_rows


def test_shards_cover_every_row_exactly_once(emu, cli, tmp_path, tickets_csv):
    source = source_rows(tickets_csv)
    seen: dict = {}
    for k in (1, 2, 3):
        out = tmp_path / f"part-{k}.parquet"
        r = cli(*run_args(tickets_csv, out, "--shard", f"{k}/3", "--state", tmp_path / f"state-{k}.sqlite"))
        assert r.exit_code == 0, r.output
        rows = pq.read_table(out).to_pylist()
        assert 100 < len(rows) < 200                   # roughly a third each
        for row in rows:
            assert row["ticket_id"] not in seen        # no row in two shards
            seen[row["ticket_id"]] = row
            assert row["status"] == "succeeded" and row["text"].startswith("Reply to: ")
    assert set(seen) == {r["ticket_id"] for r in source}          # every row in some shard
    assert emu.stats.requests_created == len(source)               # each sent once in all
    assert max(emu.stats.params_submitted.values()) == 1
    # input order kept inside a shard
    order = {r["ticket_id"]: i for i, r in enumerate(source)}
    ids = [r["ticket_id"] for r in pq.read_table(tmp_path / "part-2.parquet").to_pylist()]
    assert ids == sorted(ids, key=order.get)


def test_a_row_keeps_its_shard_when_rows_are_added(emu, cli, tmp_path, tickets_csv):
    r = cli(*run_args(tickets_csv, tmp_path / "before.parquet", "--shard", "2/4"))
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(tickets_csv, encoding="utf-8", newline="")))
    grown = tmp_path / "grown.csv"
    extra = [{"ticket_id": f"N-{i}", "customer": "Ana", "priority": "1", "body": f"new {i}"} for i in range(40)]
    with open(grown, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(extra[:20] + rows + extra[20:])   # new rows before and after the old ones
    r = cli(*run_args(grown, tmp_path / "after.parquet", "--shard", "2/4"))
    assert r.exit_code == 0, r.output
    before = {r["ticket_id"] for r in pq.read_table(tmp_path / "before.parquet").to_pylist()}
    after = {r["ticket_id"] for r in pq.read_table(tmp_path / "after.parquet").to_pylist()}
    assert before <= after and all(t.startswith("N-") for t in after - before)


def test_shards_can_share_one_state_file_as_separate_jobs(emu, cli, tmp_path, tickets_csv):
    state = tmp_path / "state.sqlite"
    for k in (1, 2):
        r = cli(*run_args(tickets_csv, tmp_path / f"s{k}.parquet", "--state", state, "--shard", f"{k}/2"))
        assert r.exit_code == 0, r.output
    r = cli("jobs", "--state", state, "--json")
    import json
    jobs = json.loads(r.output)
    assert len(jobs) == 2
    assert emu.stats.requests_created == len(source_rows(tickets_csv))


def test_bad_shard_is_one_clear_line(emu, cli, tmp_path, tickets_csv):
    for bad in ("4/3", "0/3", "two", "1/0"):
        r = cli(*run_args(tickets_csv, tmp_path / "x.parquet", "--shard", bad))
        assert r.exit_code == ExitCode.BAD_INPUT, (bad, r.output)
        assert "shard" in r.output and "K/N" in r.output and "Traceback" not in r.output
        assert len(r.output.strip().splitlines()) == 1
    assert emu.stats.requests_created == 0
