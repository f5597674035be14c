"""Input and output through filesystem URIs, against local stand-ins for the stores.

- s3:// through pyarrow's own S3 filesystem, against a moto S3 server on loopback (the same code
  path as Amazon S3, with the endpoint in the URI's query string);
- memory:// through fsspec (the path every fsspec protocol takes: gcsfs, adlfs, ...);
- file:// through pyarrow's URI handling;
- a directory of Parquet files, and a partitioned dataset, as input.
"""
from __future__ import annotations

import os
import sqlite3
import uuid

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.test_pipeline import check_output, run_args, source_rows


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on loopback and a bucket in it; yields the URI suffix that points at it."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """(a function making s3:// URIs in a fresh bucket, the pyarrow filesystem, the bucket)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    import boto3
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=f"http://{s3_server}", region_name="us-east-1").create_bucket(Bucket=bucket)
    fs = pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", region="us-east-1")

    def uri(key: str) -> str:
        return f"s3://{bucket}/{key}?endpoint_override={s3_server}&scheme=http&region=us-east-1"

    return uri, fs, bucket


def upload(fs, path: str, local) -> None:
    with fs.open_output_stream(path) as out, open(local, "rb") as f:
        out.write(f.read())


def read_parquet(fs, path: str) -> pa.Table:
    with fs.open_input_file(path) as f:
        return pq.read_table(f)


def test_s3_input_and_output_end_to_end(emu, cli, tmp_path, tickets_csv, s3):
    uri, fs, bucket = s3
    upload(fs, f"{bucket}/in/tickets.csv", tickets_csv)
    state = tmp_path / "s.sqlite"
    r = cli(*run_args(uri("in/tickets.csv"), uri("out/results.parquet"), "--state", state))
    assert r.exit_code == 0, r.output
    local = tmp_path / "back.parquet"
    pq.write_table(read_parquet(fs, f"{bucket}/out/results.parquet"), local)
    check_output(local, source_rows(tickets_csv))
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{bucket}/out"))]
    assert names == ["results.parquet"]                        # no temp object left behind
    # run again: nothing sent, the output rewritten
    sent = emu.stats.requests_created
    r = cli(*run_args(uri("in/tickets.csv"), uri("out/results.parquet"), "--state", state))
    assert r.exit_code == 0, r.output
    assert emu.stats.requests_created == sent == 450
    assert read_parquet(fs, f"{bucket}/out/results.parquet").num_rows == 450


def test_s3_partitioned_output_and_a_directory_of_parquet_as_input(emu, cli, tmp_path, tickets_csv, s3):
    uri, fs, bucket = s3
    table = pacsv.read_csv(tickets_csv, parse_options=pacsv.ParseOptions(newlines_in_values=True))
    for i, start in enumerate(range(0, 450, 150)):            # three files, one table
        with fs.open_output_stream(f"{bucket}/in/part-{i}.parquet") as out:
            pq.write_table(table.slice(start, 150), out)
    state = tmp_path / "s.sqlite"
    r = cli(*run_args(uri("in"), uri("out/by-priority"), "--state", state, "--partition-by", "priority"))
    assert r.exit_code == 0, r.output
    got = ds.dataset(f"{bucket}/out/by-priority", filesystem=fs, format="parquet", partitioning="hive").to_table()
    assert sorted(got.column("ticket_id").to_pylist()) == sorted(table.column("ticket_id").to_pylist())
    assert set(got.column("status").to_pylist()) == {"succeeded"}
    dirs = {i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{bucket}/out/by-priority"))}
    assert dirs == {f"priority={p}" for p in set(table.column("priority").to_pylist())}
    # partitioned again by another column: the old partitions are gone, nothing is sent again
    r = cli(*run_args(uri("in"), uri("out/by-priority"), "--state", state, "--partition-by", "status"))
    assert r.exit_code == 0, r.output
    assert {i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{bucket}/out/by-priority"))} == \
        {"status=succeeded"}
    assert emu.stats.requests_created == 450
    listed = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{bucket}/out", recursive=True))]
    assert not [p for p in listed if ".tmp-" in p]


def test_memory_uri_through_fsspec(emu, cli, tmp_path, tickets_csv):
    mem = fsspec.filesystem("memory")
    root = f"/bucket-{uuid.uuid4().hex[:8]}"
    mem.put(str(tickets_csv), f"{root}/tickets.csv")
    state = tmp_path / "s.sqlite"
    r = cli(*run_args(f"memory://{root}/tickets.csv", f"memory://{root}/out/results.parquet", "--state", state))
    assert r.exit_code == 0, r.output
    local = tmp_path / "back.parquet"
    local.write_bytes(mem.cat_file(f"{root}/out/results.parquet"))
    check_output(local, source_rows(tickets_csv))
    assert sorted(p.rsplit("/", 1)[1] for p in mem.ls(f"{root}/out", detail=False)) == ["results.parquet"]
    # a partitioned dataset through fsspec, read back by pyarrow through the same filesystem
    r = cli(*run_args(f"memory://{root}/tickets.csv", f"memory://{root}/ds", "--state", state,
                      "--partition-by", "customer"))
    assert r.exit_code == 0, r.output
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(mem))
    back = ds.dataset(f"{root}/ds", filesystem=fs, format="parquet", partitioning="hive").to_table()
    assert back.num_rows == 450
    assert emu.stats.requests_created == 450


def test_file_uri_goes_through_pyarrow_and_creates_the_output_directory(emu, cli, tmp_path, tickets_csv):
    out = tmp_path / "new" / "dir" / "results.parquet"
    r = cli(*run_args(f"file://{tickets_csv}", f"file://{out}", "--state", tmp_path / "s.sqlite"))
    assert r.exit_code == 0, r.output
    check_output(out, source_rows(tickets_csv))


def test_partitioned_output_read_back_as_the_input_of_a_next_job(emu, cli, tmp_path, tickets_csv):
    first = tmp_path / "by-priority"
    r = cli(*run_args(tickets_csv, first, "--partition-by", "priority"))
    assert r.exit_code == 0, r.output
    # the dataset is a directory input: its partition column comes back and can be used in a template
    second = tmp_path / "second.parquet"
    r = cli("run", "--input", first, "--output", second, "--id-column", "ticket_id",
            "--prompt", "Priority {{ priority }}: {{ text }}", "--model", "claude-haiku-4-5", "--max-tokens", 50,
            "--poll-interval", "0.1")
    assert r.exit_code == 0, r.output
    rows = pq.read_table(second).to_pylist()
    assert len(rows) == 450 and {r["status"] for r in rows} == {"succeeded"}
    assert all(r["result_text"].startswith(f"Reply to: Priority {r['priority']}: Reply to:") for r in rows)


@pytest.mark.parametrize("uri, words", [
    ("foo://bucket/in.csv", "foo://bucket/in.csv: unsupported filesystem"),
    ("s3://bucket/in.csv?region=us-east-1&secret_key=SUPERSECRET", "not in the URI"),
    ("s3://AKIA:SUPERSECRET@bucket/in.csv", "not in the URI"),
])
def test_bad_uris_one_line_and_nothing_sent(emu, cli, tmp_path, uri, words):
    state = tmp_path / "s.sqlite"
    r = cli("run", "--input", uri, "--output", tmp_path / "o.parquet", "--state", state, "--prompt", "{{ x }}",
            "--model", "claude-haiku-4-5", "--max-tokens", 50)
    assert r.exit_code != 0
    assert words in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert "SUPERSECRET" not in r.output
    assert emu.stats.requests_created == 0
    if state.exists():
        assert b"SUPERSECRET" not in state.read_bytes()


def test_unsupported_output_scheme_refused_before_sending(emu, cli, tmp_path, tickets_csv):
    r = cli(*run_args(tickets_csv, "foo://bucket/out.parquet", "--state", tmp_path / "s.sqlite"))
    assert r.exit_code != 0
    assert "foo://bucket/out.parquet: unsupported filesystem" in r.output
    assert emu.stats.requests_created == 0


def test_uri_output_state_defaults_to_the_working_directory(emu, cli, tmp_path, tickets_csv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mem = fsspec.filesystem("memory")
    root = f"/bucket-{uuid.uuid4().hex[:8]}"
    r = cli(*run_args(tickets_csv, f"memory://{root}/o.parquet", "--limit", 20))
    assert r.exit_code == 0, r.output
    assert mem.exists(f"{root}/o.parquet")
    state = tmp_path / "batchrun-state.sqlite"
    assert sqlite3.connect(state).execute("SELECT count(*) FROM jobs").fetchone()[0] == 1


def test_unreachable_gcs_gives_up_in_bounded_time(emu, cli, tmp_path, monkeypatch):
    """pyarrow's GCS client retries for 15 minutes by default; batchrun bounds it (60 s, 0.5 s here)."""
    import batchrun.inputs
    monkeypatch.setattr(batchrun.inputs, "GCS_RETRY_SECONDS", 0.5)
    r = cli("run", "--input", "gs://bucket/in.csv?endpoint_override=127.0.0.1:9&scheme=http",
            "--output", tmp_path / "o.parquet", "--state", tmp_path / "s.sqlite", "--prompt", "{{ x }}",
            "--model", "claude-haiku-4-5", "--max-tokens", 50)
    assert r.exit_code != 0
    assert "gs://bucket/in.csv" in r.output and "cannot open input" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert emu.stats.requests_created == 0
