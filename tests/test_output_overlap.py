"""The output is joined and written in two threads (output.OutputWriter.write: the input read and each block
joined to its results in one, while the blocks before it are written): the same file as one thread wrote, and a
failure in the joining thread stops the write as it did, with the same error, nothing put in place."""
from __future__ import annotations

import sqlite3

import pyarrow.parquet as pq
import pytest

import batchrun.inputs as inputs
from batchrun.errors import BatchrunError
from batchrun.inputs import InputSource
from batchrun.output import OutputWriter
from batchrun.store.views import OUTPUT_FIELDS

ROWS = 95


class Results:
    """rows_for_output of a job of ROWS rows, all succeeded (`missing`: a row the state lacks; `fail_at`: the
    first row whose block the state cannot read)."""

    def __init__(self, missing=None, fail_at=None):
        self.missing, self.fail_at = missing, fail_at

    def rows_for_output(self, job_id, start, count):
        if self.fail_at is not None and start + count > self.fail_at:
            raise sqlite3.OperationalError("disk I/O error")
        index = [i for i in range(start, min(start + count, ROWS)) if i != self.missing]
        values = {"custom_id": [f"r{i}" for i in index], "state": ["succeeded"] * len(index),
                  "text": [f"reply {i}" for i in index], "row_index": index}
        return {name: values.get(name, [None] * len(index)) for name in OUTPUT_FIELDS}


@pytest.fixture
def source(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "BATCH_ROWS", 10)   # ten blocks
    path = tmp_path / "in.csv"
    path.write_text("id,body\n" + "".join(f"r{i},body {i}\n" for i in range(ROWS)))
    return lambda: InputSource(str(path))


def test_every_row_once_in_input_order(tmp_path, source):
    out = tmp_path / "out.parquet"
    assert OutputWriter(Results(), "job", None).write(source(), str(out)) == ROWS
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(ROWS)]
    assert [r["text"] for r in rows] == [f"reply {i}" for i in range(ROWS)]
    assert {r["custom_id"] for r in rows} == {f"r{i}" for i in range(ROWS)}


@pytest.mark.parametrize("results, error", [(Results(missing=57), BatchrunError),
                                            (Results(fail_at=63), sqlite3.OperationalError)])
def test_a_failure_while_joining_stops_the_write_with_its_error(tmp_path, source, results, error):
    out = tmp_path / "out.parquet"
    out.write_bytes(b"the output before")
    swapped = []
    with pytest.raises(error):
        OutputWriter(results, "job", None).write(source(), str(out), before_swap=lambda: swapped.append(1))
    assert not swapped and out.read_bytes() == b"the output before"    # nothing put in place
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []   # nor left beside it


def test_result_columns_are_the_arrays_pa_array_makes_without_importing_pandas():
    """(output._result_column: pa.array imports pandas the first time it converts Python values.)"""
    import subprocess
    import sys
    code = """
import sys
import pyarrow as pa
from batchrun.output import _result_column
cases = [(["a", None, "é" * 3, ""], pa.string()), ([1, None, 2 ** 40, 0], pa.int64()), ([None, None], pa.int64()),
         ([0.1, None, 1e-12, 3], pa.float64()), ([], pa.int64()), ([2 ** 62, None], pa.int64())]
made = [_result_column(values, typ) for values, typ in cases[:-1]]
print("pandas" in sys.modules)
made.append(_result_column(*cases[-1]))   # past a float's exact integers: through pa.array
print(all(m.equals(pa.array(v, type=t)) and m.type == t for m, (v, t) in zip(made, cases)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.split()
    assert out == ["False", "True"]
