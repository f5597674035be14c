"""Input columns keep their values: a CSV number column is read as numbers only when that keeps
every value's text (007 and 02134 stay text), and so is the id column; JSONL keeps its types."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.errors import ExitCode
from batchrun.inputs import InputSource
from tests.conftest import refused, row_id

MODEL = "claude-haiku-4-5"


def run(cli, inp, out, *extra, prompt="Where is {{ zip }}?"):
    return cli("run", "--input", inp, "--output", out, "--prompt", prompt, "--model", MODEL,
               "--max-tokens", 50, "--poll-interval", "0.05", *extra)


def test_leading_zeros_keep_their_text_and_numbers_stay_numbers(emu, cli, tmp_path):
    inp, out = tmp_path / "people.csv", tmp_path / "out.parquet"
    inp.write_text("id,zip,phone_code,age,score,big\n"
                   "007,02134,+44,31,1.50,123456789012345678901\n"
                   "1,10001,+1,42,2,123456789012345678902\n"
                   "01,94105,+33,,3.25,123456789012345678903\n", encoding="utf-8")
    r = run(cli, inp, out, "--id-column", "id")
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    rows = table.to_pylist()
    assert [row["id"] for row in rows] == ["007", "1", "01"]           # 1 and 01 are two ids
    assert [row["custom_id"] for row in rows] == ["007", "1", "01"]
    assert [row["zip"] for row in rows] == ["02134", "10001", "94105"]
    assert [row["phone_code"] for row in rows] == ["+44", "+1", "+33"]
    assert [row["big"] for row in rows] == ["123456789012345678901", "123456789012345678902",
                                            "123456789012345678903"]   # no float rounding of long ids
    assert table.schema.field("age").type == pa.int64() and [row["age"] for row in rows] == [31, 42, None]
    assert table.schema.field("score").type == pa.float64() and [row["score"] for row in rows] == [1.5, 2.0, 3.25]
    assert rows[0]["text"].startswith("Reply to: Where is 02134?")     # the prompt saw the text too
    assert {row_id(c) for c in emu.stats.submitted_custom_ids} == {"007", "1", "01"}


def test_an_id_column_of_numbers_keeps_its_type(emu, cli, tmp_path):
    inp, out = tmp_path / "n.csv", tmp_path / "out.parquet"
    inp.write_text("n,zip\n3,1\n1,2\n2,3\n", encoding="utf-8")
    assert run(cli, inp, out, "--id-column", "n").exit_code == 0
    table = pq.read_table(out)
    assert table.schema.field("n").type == pa.int64() and table.column("n").to_pylist() == [3, 1, 2]
    assert table.column("custom_id").to_pylist() == ["3", "1", "2"]
    assert {row_id(c) for c in emu.stats.submitted_custom_ids} == {"3", "1", "2"}


def test_a_number_id_given_twice_is_a_duplicate(emu, cli, tmp_path):
    inp = tmp_path / "dup.csv"
    inp.write_text("id,zip\n1,1\n2,2\n1,3\n", encoding="utf-8")
    refused(run(cli, inp, tmp_path / "o.parquet", "--id-column", "id"), ExitCode.BAD_INPUT,
            "duplicate id 1 in column 'id'", "rows 1 and 3")
    assert emu.stats.create_calls == 0


def test_a_number_id_is_in_the_shard_of_its_text(tmp_path):
    # a column restarted as text (a later 007) must not move rows between shards
    inp = tmp_path / "ids.csv"
    inp.write_text("id,x\n" + "".join(f"{i},{i}\n" for i in range(1, 301)), encoding="utf-8")
    for k in (1, 2, 3):
        numbers = [v for b in InputSource(str(inp), shard=(k, 3), shard_key="id").batches()
                   for v in b.column("id").to_pylist()]
        texts = [v for b in InputSource(str(inp), shard=(k, 3), shard_key="id", column_types={"id": pa.string()}
                                        ).batches() for v in b.column("id").to_pylist()]
        assert 50 < len(numbers) < 150 and all(isinstance(v, int) for v in numbers)
        assert [str(v) for v in numbers] == texts


def test_leading_zero_after_the_first_block_keeps_the_column_text(emu, cli, tmp_path):
    # the first 1 MiB block has only five-digit zips; a leading zero comes later
    inp, out = tmp_path / "late.csv", tmp_path / "out.parquet"
    filler = "x" * 8000
    with open(inp, "w", encoding="utf-8") as f:
        f.write("id,zip,note\n")
        for i in range(200):
            f.write(f"r{i},{10000 + i},{filler}\n")
        f.write(f"late,00501,{filler}\n")
    blocks = list(InputSource(str(inp), column_types={"zip": pa.string()}).batches())
    assert len(blocks) > 1 and blocks[0].num_rows <= 200                                            # the test needs a later block
    r = run(cli, inp, out, "--id-column", "id")
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    assert table.schema.field("zip").type == pa.string()
    assert table.column("zip").to_pylist()[-1] == "00501"
    assert table.column("zip").to_pylist()[0] == "10000"
    assert emu.stats.batches_created == 1 and emu.stats.requests_created == 201


def test_duplicate_ids_are_compared_as_text(emu, cli, tmp_path):
    inp = tmp_path / "dup.csv"
    inp.write_text("id,zip\n01,1\n1,2\n01,3\n", encoding="utf-8")
    r = run(cli, inp, tmp_path / "o.parquet", "--id-column", "id")
    assert r.exit_code == ExitCode.BAD_INPUT
    assert "duplicate id '01'" in r.output and "rows 1 and 3" in r.output
    assert emu.stats.create_calls == 0


def test_jsonl_end_to_end_keeps_lists_structs_and_numbers(emu, cli, tmp_path):
    inp, out = tmp_path / "docs.jsonl", tmp_path / "out.parquet"
    rows = [{"doc_id": 10 + i, "title": f"doc {i}", "tags": ["a", "b"][: i % 3],
             "meta": {"pages": i, "lang": "en"}, "score": i / 4} for i in range(7)]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    r = run(cli, inp, out, "--id-column", "doc_id", prompt="Title: {{ title }} ({{ meta.pages }} pages)")
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    schema = table.schema
    assert schema.field("doc_id").type == pa.int64()                   # the id as JSON typed it
    assert pa.types.is_list(schema.field("tags").type)
    assert pa.types.is_struct(schema.field("meta").type)
    assert schema.field("score").type == pa.float64()
    got = table.to_pylist()
    assert [g["doc_id"] for g in got] == [r["doc_id"] for r in rows]
    assert [g["tags"] for g in got] == [r["tags"] for r in rows]
    assert [g["meta"] for g in got] == [r["meta"] for r in rows]
    assert [g["custom_id"] for g in got] == [str(r["doc_id"]) for r in rows]
    assert got[3]["text"].startswith("Reply to: Title: doc 3 (3 pages)")
    assert all(g["status"] == "succeeded" for g in got)


def test_jsonl_numeric_ids_across_a_line_larger_than_a_block(tmp_path):
    path = tmp_path / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(2000):
            f.write(json.dumps({"n": i, "text": f"t{i}", "pages": i}) + "\n")
        f.write(json.dumps({"n": 2000, "text": "y" * 3_000_000, "pages": 1}) + "\n")
        f.write(json.dumps({"n": 2001, "text": "last", "pages": 2}) + "\n")
    batches = list(InputSource(str(path), shard_key="n").batches())
    assert len({b.schema for b in batches}) == 1
    assert batches[0].schema.names == ["n", "text", "pages"]
    assert batches[0].schema.field("n").type == pa.int64()
    assert batches[0].schema.field("pages").type == pa.int64()
    ids = [v for b in batches for v in b.column("n").to_pylist()]
    assert ids == list(range(2002))


def test_numbers_past_a_floats_digits_keep_their_text(tmp_path):
    inp = tmp_path / "f.csv"
    columns = {  # column: (values, read as float64)
        "long_fraction": (["0.12345678901234567891", "1.5"], False),
        "sixteen_digits": (["1234.567890123456", "2"], False),
        "long_exponent": (["1.2345678901234567e-5", "2"], False),
        "long_whole": (["12345678901234567", "2.5"], False),
        "fifteen_digits": (["3.14159265358979", "-2.71828182845904"], True),
        "trailing_zeros": (["1.50000000000000000000", "2.25"], True),        # the same number: 1.5
        "small": (["0.000000000000012345", "-0.5"], True),                   # leading zeros are not digits kept
        "big_exponent": (["6.02214076e23", "1e-300"], True),
    }
    rows = zip(*(values for values, _ in columns.values()))
    inp.write_text(",".join(columns) + "\n" + "".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    batch = next(InputSource(str(inp)).batches())
    for name, (values, numbers) in columns.items():
        if numbers:
            assert batch.schema.field(name).type == pa.float64(), name
            assert batch.column(name).to_pylist() == [float(v) for v in values], name
        else:
            assert batch.column(name).to_pylist() == values, name


def test_reading_a_csv_holds_one_file_open(tmp_path):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc")
    inp = tmp_path / "two_blocks.csv"
    inp.write_text("id,n,note\n" + "".join(f"r{i},{i},{'x' * 8000}\n" for i in range(200)), encoding="utf-8")

    def open_copies() -> int:
        fds = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        return fds.count(str(inp))

    batches = InputSource(str(inp)).batches()
    next(batches)                                   # the probe that inferred the types is closed
    assert open_copies() == 1
    batches.close()
    assert open_copies() == 0
