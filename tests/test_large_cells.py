"""Input rows larger than the reader's block (a whole document in one cell) are read, not refused."""
from __future__ import annotations

import json

import pyarrow.parquet as pq

from batchrun.inputs import InputSource


def write_csv_with_a_big_cell(path, size=3_000_000):
    with open(path, "w", encoding="utf-8") as f:
        f.write("doc_id,pages,text\n")
        for i in range(1500):
            f.write(f"d{i},{i},\"short, text {i}\"\n")
        f.write("big,7,\"" + ("long document, " * (size // 16)) + "\"\n")
        for i in range(1500, 3000):
            f.write(f"d{i},{i},short text {i}\n")


def test_a_cell_larger_than_a_block_is_read_once_in_order(tmp_path):
    path = tmp_path / "docs.csv"
    write_csv_with_a_big_cell(path, size=9_000_000)              # larger than a block, even grown once
    batches = list(InputSource(str(path)).batches())
    ids = [v for b in batches for v in b.column("doc_id").to_pylist()]
    assert len(ids) == 3001 and len(set(ids)) == 3001
    assert ids[1499:1502] == ["d1499", "big", "d1500"]
    assert len({b.schema for b in batches}) == 1                  # one schema: types kept across the re-read
    assert batches[0].schema.field("pages").type == "int64"


def test_a_jsonl_line_larger_than_a_block(tmp_path):
    path = tmp_path / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(2000):
            f.write(json.dumps({"doc_id": f"d{i}", "text": f"t{i}"}) + "\n")
        f.write(json.dumps({"doc_id": "big", "text": "y" * 9_000_000}) + "\n")
    ids = [v for b in InputSource(str(path)).batches() for v in b.column("doc_id").to_pylist()]
    assert len(ids) == 2001 and ids[-1] == "big"


def test_a_job_with_a_big_document_runs_end_to_end(emu, cli, tmp_path):
    path, out = tmp_path / "docs.csv", tmp_path / "out.parquet"
    write_csv_with_a_big_cell(path, size=1_500_000)
    r = cli("run", "--input", path, "--output", out, "--id-column", "doc_id", "--prompt",
            "Summarise: {{ text }}", "--model", "claude-haiku-4-5", "--max-tokens", 50, "--poll-interval", "0.1")
    assert r.exit_code == 0, r.output
    rows = pq.read_table(out).to_pylist()
    assert [r["doc_id"] for r in rows[1499:1502]] == ["d1499", "big", "d1500"]
    assert all(r["status"] == "succeeded" for r in rows) and len(rows) == 3001


def test_a_number_column_with_a_leading_zero_after_a_big_cell_is_text(emu, cli, tmp_path):
    # rows given as int64 before the big cell; the re-read with larger blocks meets 007: the plan
    # starts again with the column as text, so the output has one type for it (not int64 and string)
    path, out = tmp_path / "docs.csv", tmp_path / "out.parquet"
    with open(path, "w", encoding="utf-8") as f:
        f.write("doc_id,n,text\n")
        for i in range(12000):
            f.write(f"d{i},{i},t{i}\n")
        f.write("big,1,\"" + "x" * 3_000_000 + "\"\n")
        f.write("late,007,t\n")
    r = cli("run", "--input", path, "--output", out, "--id-column", "doc_id", "--prompt", "{{ n }}: {{ text }}",
            "--model", "claude-haiku-4-5", "--max-tokens", 50, "--poll-interval", "0.1")
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    assert table.schema.field("n").type == "string"
    assert table.column("n").to_pylist()[-3:] == ["11999", "1", "007"]
    assert table.num_rows == 12002 and emu.stats.requests_created == 12002
    assert emu.stats.params_submitted and max(emu.stats.params_submitted.values()) == 1
