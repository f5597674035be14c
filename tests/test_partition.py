"""--partition-by COL: a Hive-partitioned Parquet dataset (out/COL=value/part-N.parquet)."""
from __future__ import annotations

import os
import signal
import sqlite3

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.test_pipeline import run_args, source_rows
from tests.test_reliability import args, assert_complete, spawn


def partitions(root) -> dict:
    """{directory name: rows read from that directory's files}, each in file order."""
    found = {}
    for entry in sorted(os.listdir(root)):
        sub = os.path.join(root, entry)
        if os.path.isdir(sub):
            rows = []
            for name in sorted(os.listdir(sub), key=lambda n: int(n.split("-")[1].split(".")[0])):
                rows += pq.read_table(os.path.join(sub, name)).to_pylist()
            found[entry] = rows
    return found


def test_partitioned_by_an_input_column_every_row_once_in_order(emu, cli, tmp_path, tickets_csv):
    out = tmp_path / "results"
    r = cli(*run_args(tickets_csv, out, "--partition-by", "priority"))
    assert r.exit_code == 0, r.output
    source = source_rows(tickets_csv)
    parts = partitions(out)
    assert sorted(parts) == [f"priority={p}" for p in sorted({s["priority"] for s in source})]
    order = {s["ticket_id"]: i for i, s in enumerate(source)}
    seen = []
    for name, rows in parts.items():
        value = int(name.split("=")[1])
        want = [s["ticket_id"] for s in source if s["priority"] == value]
        assert [row["ticket_id"] for row in rows] == want          # this partition's rows, in input order
        assert all("priority" not in row for row in rows)           # the value lives in the path
        assert all(row["status"] == "succeeded" and row["text"].startswith("Reply to: ") for row in rows)
        seen += [row["ticket_id"] for row in rows]
    assert sorted(seen, key=order.get) == [s["ticket_id"] for s in source]   # every row exactly once
    # a dataset reader sees one table with the partition column back
    table = pq.read_table(out)
    assert table.num_rows == len(source)
    assert sorted(table.column("priority").to_pylist()) == sorted(s["priority"] for s in source)
    assert emu.stats.requests_created == len(source)


def test_partition_by_a_result_column_and_rerun_replaces_the_dataset(emu, cli, tmp_path):
    inp = tmp_path / "reviews.csv"
    inp.write_text("id,review\n" + "".join(f"r{i},review number {i} of the blender\n" for i in range(60)))
    out = tmp_path / "labelled"
    base = ["run", "--input", inp, "--output", out, "--id-column", "id", "--prompt", "Classify: {{ review }}",
            "--labels", "positive,negative,neutral", "--model", "claude-haiku-4-5", "--max-tokens", 50,
            "--poll-interval", "0.1"]
    r = cli(*base, "--partition-by", "label")
    assert r.exit_code == 0, r.output
    parts = partitions(out)
    assert set(parts) <= {"label=positive", "label=negative", "label=neutral"} and len(parts) > 1
    assert sum(len(v) for v in parts.values()) == 60
    sent = emu.stats.requests_created
    # the same job partitioned another way: nothing sent again, the old partitions are gone
    r = cli(*base, "--partition-by", "status")
    assert r.exit_code == 0, r.output
    assert emu.stats.requests_created == sent
    assert sorted(os.listdir(out)) == ["status=succeeded"]
    assert len(partitions(out)["status=succeeded"]) == 60
    # and back to one file
    r = cli(*base)
    assert r.exit_code == 0, r.output
    assert out.is_file() and pq.read_table(out).num_rows == 60
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p]


def test_null_and_awkward_partition_values(emu, cli, tmp_path):
    teams = ["billing", None, "a/b c", "Zoë & co", "billing", None, "=?", "50%"]
    table = pa.table({"id": [f"t{i}" for i in range(len(teams))], "team": teams,
                      "body": [f"ticket {i}" for i in range(len(teams))]})
    inp = tmp_path / "t.parquet"
    pq.write_table(table, inp)
    out = tmp_path / "ds"
    r = cli("run", "--input", inp, "--output", out, "--id-column", "id", "--prompt", "Say {{ body }}",
            "--model", "claude-haiku-4-5", "--max-tokens", 50, "--poll-interval", "0.1", "--partition-by", "team")
    assert r.exit_code == 0, r.output
    dirs = [d for d in os.listdir(out) if (out / d).is_dir()]
    assert all("/" not in d for d in dirs) and len(dirs) == 6   # 5 distinct values and one for null
    back = ds.dataset(out, format="parquet", partitioning="hive").to_table().to_pylist()
    got = sorted(((row["id"], row["team"]) for row in back))
    assert got == sorted(zip(table.column("id").to_pylist(), teams))


@pytest.mark.parametrize("column, words", [
    ("nope", "'nope' is neither in"),
    ("prioritty", "did you mean 'priority'"),
])
def test_unknown_partition_column_refused_before_sending(emu, cli, tmp_path, tickets_csv, column, words):
    r = cli(*run_args(tickets_csv, tmp_path / "o", "--partition-by", column))
    assert r.exit_code != 0
    assert words in r.output and "partition_by" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert emu.stats.requests_created == 0 and emu.stats.batches_created == 0
    assert not (tmp_path / "o").exists()


def test_list_column_refused_as_partition(emu, cli, tmp_path):
    inp = tmp_path / "r.csv"
    inp.write_text("id,review\n" + "".join(f"r{i},cheap and fast {i}\n" for i in range(5)))
    r = cli("run", "--input", inp, "--output", tmp_path / "o", "--id-column", "id", "--prompt", "{{ review }}",
            "--labels", "price,speed", "--multi-label", "--model", "claude-haiku-4-5", "--max-tokens", 50,
            "--partition-by", "label")
    assert r.exit_code != 0
    assert "partition_by: column 'label' holds list<item: string> values" in r.output
    assert emu.stats.requests_created == 0


def test_a_directory_of_other_files_is_never_replaced(emu, cli, tmp_path, tickets_csv):
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "keep.csv").write_text("important\n")
    r = cli(*run_args(tickets_csv, precious, "--partition-by", "priority"))
    assert r.exit_code != 0
    assert "holds other files than a partitioned output" in r.output
    assert (precious / "keep.csv").read_text() == "important\n"
    assert emu.stats.requests_created == 0


def test_killed_between_moving_the_old_dataset_aside_and_the_new_in(emu, tmp_path, tickets_csv):
    out, state = tmp_path / "ds", tmp_path / "s.sqlite"
    p = spawn(emu, args(tickets_csv, out, state, "--partition-by", "priority"))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    p = spawn(emu, args(tickets_csv, out, state, "--partition-by", "customer"), failpoint="mid_swap")
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert not out.exists() and [n for n in os.listdir(tmp_path) if ".old-" in n]
    p = spawn(emu, args(tickets_csv, out, state, "--partition-by", "customer"))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert not [n for n in os.listdir(tmp_path) if ".old-" in n or ".tmp-" in n]
    assert all(d.startswith("customer=") for d in os.listdir(out))
    # read back as one table in input order: the same check as every crash test
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    order = {row["ticket_id"]: i for i, row in enumerate(source_rows(tickets_csv))}
    rows = sorted(table.to_pylist(), key=lambda row: order[row["ticket_id"]])
    flat = tmp_path / "flat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), flat)
    assert_complete(flat, tickets_csv, emu)


def test_state_records_no_partition_in_the_job_identity(emu, cli, tmp_path, tickets_csv):
    state = tmp_path / "s.sqlite"
    for extra in ([], ["--partition-by", "priority"]):
        r = cli(*run_args(tickets_csv, tmp_path / ("p" if extra else "f.parquet"), "--state", state, *extra))
        assert r.exit_code == 0, r.output
    assert sqlite3.connect(state).execute("SELECT count(*) FROM jobs").fetchone()[0] == 1


def test_many_partitions_with_few_open_files_keep_every_row_in_order(emu, cli, tmp_path, tickets_csv,
                                                                    tickets_parquet, monkeypatch):
    """More values than open files, small input batches and tiny buffers: partitions are closed and
    reopened as part-1, part-2, …; read in part order, each still holds its rows once, in input order."""
    import batchrun.inputs
    from batchrun.output import PartitionedWriter
    monkeypatch.setattr(batchrun.inputs, "BATCH_ROWS", 20)
    monkeypatch.setattr(PartitionedWriter, "MAX_OPEN", 2)
    monkeypatch.setattr(PartitionedWriter, "ROW_GROUP", 7)
    monkeypatch.setattr(PartitionedWriter, "BUFFER_BYTES", 4096)
    out = tmp_path / "by-customer"
    r = cli(*run_args(tickets_parquet, out, "--partition-by", "customer", "--batch-size", 450))
    assert r.exit_code == 0, r.output
    source = source_rows(tickets_csv)
    parts = partitions(out)
    assert max(len(os.listdir(out / name)) for name in parts) > 3          # reopened many times
    from urllib.parse import unquote
    for name, rows in parts.items():
        value = unquote(name.split("=", 1)[1])
        value = "" if value == PartitionedWriter.NULL else value   # empty cells go with the nulls
        assert [row["ticket_id"] for row in rows] == [s["ticket_id"] for s in source if (s["customer"] or "") == value]
    assert sum(len(rows) for rows in parts.values()) == len(source)
