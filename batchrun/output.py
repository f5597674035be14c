"""Writing the output: the input streamed again, each record batch joined to its rows' results.

One output row per input row, in input order: every input column, then the result columns, then
one typed column per top-level property of the output schema. Written to a temporary file and
renamed into place, so a reader (or a killed run) never sees half a file.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from . import failpoints
from .errors import BatchrunError, InputError
from .inputs import InputSource, filesystem_for

RESULT_COLUMNS = [
    ("custom_id", pa.string()), ("status", pa.string()), ("text", pa.string()),
    ("stop_reason", pa.string()), ("model", pa.string()), ("input_tokens", pa.int64()),
    ("output_tokens", pa.int64()), ("cache_creation_input_tokens", pa.int64()),
    ("cache_read_input_tokens", pa.int64()), ("cost_usd", pa.float64()), ("error_type", pa.string()),
    ("error_message", pa.string()), ("batch_id", pa.string()), ("attempts", pa.int64()),
]
_SELECT = ("custom_id, state, text, stop_reason, model, input_tokens, output_tokens, "
           "cache_creation_input_tokens, cache_read_input_tokens, cost_usd, error_type, error_message, "
           "api_batch_id, attempts, parsed, row_index")


def arrow_type(schema: dict) -> pa.DataType:
    """The Arrow type for a JSON Schema: scalars, enums, lists and nested objects."""
    if not isinstance(schema, dict):
        return pa.string()
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind is None and "enum" in schema and all(isinstance(v, str) for v in schema["enum"]):
        kind = "string"
    if kind == "string":
        return pa.string()
    if kind == "integer":
        return pa.int64()
    if kind == "number":
        return pa.float64()
    if kind == "boolean":
        return pa.bool_()
    if kind == "array" and isinstance(schema.get("items"), dict):
        return pa.list_(arrow_type(schema["items"]))
    if kind == "object" and isinstance(schema.get("properties"), dict) and schema["properties"]:
        return pa.struct([pa.field(k, arrow_type(v)) for k, v in schema["properties"].items()])
    return pa.string()  # anything else: the JSON text


def schema_columns(output_schema: Optional[dict]) -> list[tuple[str, pa.DataType]]:
    if not output_schema:
        return []
    return [(name, arrow_type(sub)) for name, sub in output_schema.get("properties", {}).items()]


def output_names(input_columns: Iterable[str], output_schema: Optional[dict]) -> list[str]:
    """Names of the result and schema columns; one that an input column already has gets `result_`."""
    taken = set(input_columns)
    names = []
    for name in [n for n, _ in RESULT_COLUMNS] + [n for n, _ in schema_columns(output_schema)]:
        final = name if name not in taken else f"result_{name}"
        if final in taken:
            raise InputError(f"output column {name!r} clashes with input columns {name!r} and {final!r}; "
                             "rename one of them")
        taken.add(final)
        names.append(final)
    return names


def check_column_names(input_columns: Iterable[str], output_schema: Optional[dict]) -> list[str]:
    """Renamed output columns, as (name, new name) messages; raises when no name can be found."""
    names = output_names(input_columns, output_schema)
    wanted = [n for n, _ in RESULT_COLUMNS] + [n for n, _ in schema_columns(output_schema)]
    return [f"output column {w!r} is named {n!r} because the input has a column {w!r}"
            for w, n in zip(wanted, names) if w != n]


def check_writable(output: str) -> None:
    """Fail before the first request is sent when the output cannot be written."""
    fs, path = filesystem_for(output)
    if "://" in output:
        return  # remote stores are checked when written; credentials may be lazy
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise InputError(f"output {output}: is a directory, expected a .parquet file path")
    try:
        os.makedirs(parent, exist_ok=True)
        probe = os.path.join(parent, f".batchrun-probe-{uuid.uuid4().hex}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise InputError(f"output {output}: cannot write there ({exc.strerror or exc})") from None


class OutputWriter:
    def __init__(self, store, job_id: str, output_schema: Optional[dict]):
        self.store = store
        self.job_id = job_id
        self.output_schema = output_schema
        self.extra = schema_columns(output_schema)

    def rows(self, start: int, count: int) -> list[tuple]:
        cur = self.store.conn.execute(
            f"SELECT {_SELECT} FROM requests WHERE job_id = ? AND row_index >= ? AND row_index < ? "
            "ORDER BY row_index", (self.job_id, start, start + count))
        return cur.fetchall()

    def joined(self, batch: pa.RecordBatch, start: int) -> pa.RecordBatch:
        rows = self.rows(start, batch.num_rows)
        if len(rows) != batch.num_rows or (rows and (rows[0][-1] != start or rows[-1][-1] != start + batch.num_rows - 1)):
            raise BatchrunError("the input no longer matches the job's plan (rows are missing from the state); "
                                "was the input file changed while the job ran?")
        cols = list(zip(*rows)) if rows else [[] for _ in range(16)]
        arrays = list(batch.columns)
        names = list(batch.schema.names)
        out_names = iter(output_names(names, self.output_schema))
        for i, (_, typ) in enumerate(RESULT_COLUMNS):
            arrays.append(pa.array(cols[i], type=typ))
            names.append(next(out_names))
        if self.extra:
            parsed = [json.loads(p) if p else None for p in cols[14]]
            for (name, typ), out_name in zip(self.extra, out_names):
                values = [p.get(name) if isinstance(p, dict) else None for p in parsed]
                if typ == pa.string():
                    values = [v if (v is None or isinstance(v, str)) else json.dumps(v, ensure_ascii=False)
                              for v in values]
                arrays.append(pa.array(values, type=typ))
                names.append(out_name)
        return pa.RecordBatch.from_arrays(arrays, names=names)

    def write(self, source: InputSource, output: str, partition_by: Optional[str] = None) -> int:
        """Write the whole output atomically; returns the number of rows written."""
        fs, path = filesystem_for(output)
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if "://" not in output:
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
            _remove_stale_temps(path)
        writer = None
        start = 0
        try:
            for batch in source.batches():
                joined = self.joined(batch, start)
                start += batch.num_rows
                if writer is None:
                    sink = fs.open_output_stream(tmp)
                    writer = pq.ParquetWriter(sink, joined.schema, compression="zstd")
                writer.write_batch(joined)
            if writer is None:
                raise InputError(f"{source.uri}: input is empty (no rows)")
            writer.close()
            sink.close()
            writer = None
            failpoints.hit("before_rename")
            if "://" not in output:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            else:
                fs.move(tmp, path)
        finally:
            if writer is not None:
                writer.close()
                sink.close()
                try:
                    fs.delete_file(tmp)
                except OSError:
                    pass
        return start


def _remove_stale_temps(path: str) -> None:
    """Temp files a killed run left beside the output (the job lock is held, so none is live)."""
    import glob
    for stale in glob.glob(glob.escape(path) + ".tmp-*"):
        try:
            os.remove(stale)
        except OSError:
            pass
