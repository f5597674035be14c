"""Writing the output: the input streamed again, each record batch joined to its rows' results.

One output row per input row, in input order: every input column, then the result columns, then
one typed column per top-level property of the output schema. One Parquet file, or a Hive-partitioned
dataset with `partition_by`; written under a temporary name and swapped into place, so a reader (or
a killed run) never sees half of it. Local paths and filesystem URIs (see inputs.filesystem_for).
"""
from __future__ import annotations

import difflib
import errno
import json
import os
import uuid
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import failpoints
from .errors import BatchrunError, InputError, NoSpaceError
from .inputs import InputSource, filesystem_for
from .prefetch import prefetched
from .schema_types import ColumnError, schema_columns, schema_converters

RESULT_COLUMNS = [
    ("custom_id", pa.string()), ("status", pa.string()), ("text", pa.string()),
    ("stop_reason", pa.string()), ("model", pa.string()), ("input_tokens", pa.int64()),
    ("output_tokens", pa.int64()), ("cache_creation_input_tokens", pa.int64()),
    ("cache_read_input_tokens", pa.int64()), ("cost_usd", pa.float64()), ("error_type", pa.string()),
    ("error_message", pa.string()), ("batch_id", pa.string()), ("attempts", pa.int64()),
]
# the stored field each result column holds, where its name is not the column's (store.views.OUTPUT_FIELDS)
_STORED_AS = {"status": "state", "batch_id": "api_batch_id"}


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


def check_partition(input_schema: pa.Schema, output_schema: Optional[dict], column: Optional[str],
                    input_name: str = "the input") -> None:
    """Refuse, before anything is sent, a partition column the output will not have or cannot split by."""
    if not column:
        return
    extra = schema_columns(output_schema)
    types = dict(zip(input_schema.names, input_schema.types))
    types.update(zip(output_names(input_schema.names, output_schema),
                     [t for _, t in RESULT_COLUMNS] + [t for _, t in extra]))
    if column not in types:
        close = difflib.get_close_matches(column, list(types), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"partition_by: column {column!r} is neither in {input_name} nor a result or schema "
                         f"column{hint}")
    typ = types[column]
    if pa.types.is_nested(typ) or pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_null(typ):
        raise InputError(f"partition_by: column {column!r} holds {typ} values; partition by a column of single "
                         "values (text, number, date or flag)")


def check_writable(output: str, partition_by: Optional[str] = None) -> None:
    """Fail before the first request is sent when the output cannot be written."""
    fs, path = filesystem_for(output)
    if not isinstance(fs, pafs.LocalFileSystem):
        return  # remote stores are checked when written; credentials may be lazy
    path = path.rstrip("/") or path
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        # a single file may replace a partitioned output written before, never any other directory
        if partition_by is None and (not os.listdir(path) or not _dataset_dir(fs, path)):
            raise InputError(f"output {output}: is a directory, expected a .parquet file path")
        _check_replaceable(fs, path, output)
    try:
        os.makedirs(parent, exist_ok=True)
        probe = os.path.join(parent, f".batchrun-probe-{uuid.uuid4().hex}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise NoSpaceError(output) from None
        raise InputError(f"output {output}: cannot write there ({exc.strerror or exc})") from None


def _dataset_dir(fs: pafs.FileSystem, path: str) -> bool:
    """Whether a directory holds only what a partitioned output holds: `col=value` directories
    (and files a dataset reader skips: names starting with `_` or `.`). Only such a directory is
    ever replaced, so an output pointed at a directory of other files cannot delete them."""
    for entry in fs.get_file_info(pafs.FileSelector(path)):
        if entry.type == pafs.FileType.Directory and "=" in entry.base_name:
            continue
        if entry.type == pafs.FileType.File and entry.base_name.startswith(("_", ".")):
            continue
        return False
    return True


def _check_replaceable(fs: pafs.FileSystem, path: str, output: str) -> None:
    if fs.get_file_info(path).type == pafs.FileType.Directory and not _dataset_dir(fs, path):
        raise InputError(f"output {output}: is a directory that holds other files than a partitioned output; "
                         "batchrun replaces the whole directory, so name a new one")


class OutputWriter:
    def __init__(self, store, job_id: str, output_schema: Optional[dict], text_prefix: Optional[str] = None):
        self.store = store
        self.job_id = job_id
        self.output_schema = output_schema
        self.extra = schema_converters(output_schema)
        self.text_prefix = text_prefix   # prefill_in_text: the prefill, put before each reply's continuation

    def joined(self, batch: pa.RecordBatch, start: int) -> pa.RecordBatch:
        cols = self.store.rows_for_output(self.job_id, start, batch.num_rows)
        index = cols["row_index"]
        if len(index) != batch.num_rows or (index and (index[0] != start or index[-1] != start + batch.num_rows - 1)):
            raise BatchrunError("the input no longer matches the job's plan (rows are missing from the state); "
                                "was the input file changed while the job ran?")
        if self.text_prefix is not None:
            cols["text"] = [None if t is None else self.text_prefix + t for t in cols["text"]]
        arrays = list(batch.columns)
        names = list(batch.schema.names)
        out_names = iter(output_names(names, self.output_schema))
        for name, typ in RESULT_COLUMNS:
            arrays.append(_result_column(cols[_STORED_AS.get(name, name)], typ))
            names.append(next(out_names))
        if self.extra:
            parsed = [_loads(p) for p in cols["parsed"]]
            for (name, typ, convert), out_name in zip(self.extra, out_names):
                values = [_converted(convert, p.get(name)) if isinstance(p, dict) else None for p in parsed]
                arrays.append(pa.array(values, type=typ))
                names.append(out_name)
        return pa.RecordBatch.from_arrays(arrays, names=names)

    def write(self, source: InputSource, output: str, partition_by: Optional[str] = None,
              before_swap: Optional[Callable[[], None]] = None) -> int:
        """Write the whole output, then put it in place at once; returns the number of rows written.

        One Parquet file, or with `partition_by` a Hive-partitioned dataset (a directory of
        `col=value/part-N.parquet`). Either is written beside the output under a temporary name
        and swapped in when complete, so a reader or a killed run never sees half of it (on an
        object store, which cannot rename, the last step moves the finished files one by one).
        `before_swap` is called just before the swap, and may still stop it (by raising: nothing is replaced).
        """
        fs, path = filesystem_for(output)
        local = isinstance(fs, pafs.LocalFileSystem)
        path = path.rstrip("/") or path
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if local:
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
            _remove_stale_temps(path)
        else:
            _create_parent(fs, path)
        _check_replaceable(fs, path, output)
        counted = [0]

        def joined_batches():
            for batch in source.batches():
                joined = self.joined(batch, counted[0])
                counted[0] += batch.num_rows
                yield joined

        # the input read and each block joined to its results in a thread, while the blocks before it are
        # written: SQLite fetches and Parquet encodes and compresses without the GIL (its errors are raised here)
        batches = prefetched(joined_batches(), depth=2)
        first = next(batches, None)
        if first is None:
            raise InputError(f"{source.uri}: input is empty (no rows)")
        try:
            if partition_by:
                _write_dataset(fs, tmp, first, batches, partition_by)
            else:
                _write_file(fs, tmp, first, batches)
            failpoints.hit("before_rename")
            if before_swap is not None:
                before_swap()
            _swap(fs, local, tmp, path)
        except BaseException as exc:
            _delete(fs, tmp)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:   # the old output, if any, is as it was
                raise NoSpaceError(output) from None
            raise
        return counted[0]


def _result_column(values: list, typ: pa.DataType) -> pa.Array:
    """A result column as Arrow: the same array pa.array makes, made without it where the values allow. pa.array
    imports pandas (~0.15 s, pyarrow's pandas shim) the first time it converts Python values, and the output
    of a job without an output schema needs none of it: text through pyarrow's StringBuilder, numbers through
    numpy (None as NaN) and a null bitmap. Values these do not take exactly go through pa.array, as before."""
    try:
        if typ == pa.string():
            from pyarrow.lib import StringBuilder
            builder = StringBuilder()
            builder.append_values(values)
            return builder.finish()
        if typ in (pa.int64(), pa.float64()):
            numbers = np.array(values, dtype=np.float64)
            missing = np.isnan(numbers)
            nulls = int(missing.sum())
            if typ == pa.int64():
                numbers[missing] = 0
                if numbers.size and np.abs(numbers).max() >= _EXACT_IN_FLOAT:   # (a float would not keep it)
                    raise ValueError
                numbers = numbers.astype(np.int64)
            valid = pa.py_buffer(np.packbits(~missing, bitorder="little")) if nulls else None
            return pa.Array.from_buffers(typ, len(values), [valid, pa.py_buffer(numbers)], null_count=nulls)
    except (TypeError, ValueError, OverflowError, pa.ArrowException):
        pass
    return pa.array(values, type=typ)


_EXACT_IN_FLOAT = 2 ** 53


def _loads(text: Optional[str]) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _converted(convert, value: Any) -> Any:
    """A stored value as its column holds it. Replies whose values do not fit their columns end as
    invalid_output when parsed (and store no value); this only guards the writer against a state
    written otherwise (an older batchrun, another schema), which must never stop the output."""
    try:
        return convert(value)
    except (ColumnError, TypeError, RecursionError):
        return None


def _write_file(fs: pafs.FileSystem, tmp: str, first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> None:
    with fs.open_output_stream(tmp) as sink, pq.ParquetWriter(sink, first.schema, compression="zstd") as writer:
        writer.write_batch(first)
        for batch in rest:
            writer.write_batch(batch)


def _write_dataset(fs: pafs.FileSystem, tmp: str, first: pa.RecordBatch, rest: Iterator[pa.RecordBatch],
                   column: str) -> None:
    """A Hive-partitioned dataset from a stream of record batches (never all in memory)."""
    writer = PartitionedWriter(fs, tmp, first.schema, column)
    try:
        writer.write(first)
        for batch in rest:
            writer.write(batch)
    except BaseException:
        writer.abort()
        raise
    writer.close()


class PartitionedWriter:
    """Writes `root/COL=value/part-N.parquet`, one directory per value of `column`, rows in input
    order within each. Hive layout as pyarrow, pandas, DuckDB and Spark read it: the value
    URL-escaped in the path and not in the files, nulls under __HIVE_DEFAULT_PARTITION__.

    pyarrow.dataset.write_dataset does the same, but queues rows without bound when writing is
    slower than reading (at 100k rows it held ~250 MB more than one ParquetWriter); here memory is
    bounded: rows wait per partition until a row group's worth (ROW_GROUP rows) or until all
    waiting rows pass BUFFER_BYTES, and at most MAX_OPEN files are open (the least recently used
    is closed; that partition's later rows go to its next part file).
    """

    ROW_GROUP = 32 * 1024
    BUFFER_BYTES = 32 << 20
    MAX_OPEN = 64
    NULL = "__HIVE_DEFAULT_PARTITION__"

    def __init__(self, fs: pafs.FileSystem, root: str, schema: pa.Schema, column: str):
        from collections import OrderedDict
        self.fs, self.root, self.column = fs, root, column
        self.index = schema.get_field_index(column)
        self.file_schema = schema.remove(self.index)
        self.local = isinstance(fs, pafs.LocalFileSystem)
        self.open: "OrderedDict[str, pq.ParquetWriter]" = OrderedDict()
        self.sinks: dict = {}
        self.parts: dict = {}       # directory -> part files started
        self.waiting: dict = {}     # directory -> [record batches]
        self.waiting_rows: dict = {}
        self.waiting_bytes = 0
        if self.local:
            os.makedirs(root, exist_ok=True)

    def write(self, batch: pa.RecordBatch) -> None:
        import pyarrow.compute as pc
        values = batch.column(self.index)
        if pa.types.is_dictionary(values.type):   # e.g. a partition column read back from a dataset
            values = values.dictionary_decode()
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            # an empty cell goes with the nulls (as Hive writes an empty string), not to a directory "col="
            values = pc.if_else(pc.equal(values, ""), pa.scalar(None, values.type), values)
        keys = pc.dictionary_encode(values, null_encoding="encode")
        names = [self._directory(v) for v in pc.cast(keys.dictionary, pa.string()).to_pylist()]
        body = batch.drop_columns([self.column])
        if len(names) == 1:
            self._add(names[0], body)
            return
        order = pc.sort_indices(keys.indices)          # stable: input order kept within a value
        grouped = body.take(order)
        sorted_keys = keys.indices.take(order).to_numpy(zero_copy_only=False)
        bounds = np.flatnonzero(np.diff(sorted_keys)) + 1
        starts = [0, *bounds.tolist()]
        ends = [*bounds.tolist(), len(sorted_keys)]
        for start, end in zip(starts, ends):
            self._add(names[int(sorted_keys[start])], grouped.slice(start, end - start))

    def _directory(self, value: Optional[str]) -> str:
        from urllib.parse import quote
        name = f"{self.column}={self.NULL if value is None else quote(value, safe='')}"
        if len(name.encode()) > 255:
            raise InputError(f"partition_by: a value of column {self.column!r} is too long for a directory name "
                             f"({value[:40]!r}…); partition by a column of short values")
        return name

    def _add(self, name: str, rows: pa.RecordBatch) -> None:
        self.waiting.setdefault(name, []).append(rows)
        self.waiting_rows[name] = self.waiting_rows.get(name, 0) + rows.num_rows
        self.waiting_bytes += rows.nbytes
        if self.waiting_rows[name] >= self.ROW_GROUP:
            self._flush(name)
        while self.waiting_bytes > self.BUFFER_BYTES:
            self._flush(max(self.waiting_rows, key=self.waiting_rows.get))

    def _flush(self, name: str) -> None:
        batches = self.waiting.pop(name)
        self.waiting_rows.pop(name)
        self.waiting_bytes -= sum(b.nbytes for b in batches)
        writer = self.open.get(name)
        if writer is None:
            if len(self.open) >= self.MAX_OPEN:
                self._close(next(iter(self.open)))
            n = self.parts.get(name, 0)
            self.parts[name] = n + 1
            directory = f"{self.root}/{name}"
            if self.local:
                os.makedirs(directory, exist_ok=True)
            sink = self.fs.open_output_stream(f"{directory}/part-{n}.parquet")
            writer = pq.ParquetWriter(sink, self.file_schema, compression="zstd")
            self.open[name], self.sinks[name] = writer, sink
        self.open.move_to_end(name)
        writer.write_table(pa.Table.from_batches(batches, schema=self.file_schema), row_group_size=self.ROW_GROUP)

    def _close(self, name: str) -> None:
        self.open.pop(name).close()
        self.sinks.pop(name).close()

    def close(self) -> None:
        for name in list(self.waiting):
            self._flush(name)
        for name in list(self.open):
            self._close(name)

    def abort(self) -> None:
        """Close what is open without writing what waits (the caller deletes the directory)."""
        for name in list(self.open):
            try:
                self._close(name)
            except Exception:
                pass


def _create_parent(fs: pafs.FileSystem, path: str) -> None:
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        try:
            fs.create_dir(parent, recursive=True)
        except OSError:
            pass  # object stores have no directories (and a bucket is not ours to create)


def _swap(fs: pafs.FileSystem, local: bool, tmp: str, path: str) -> None:
    """Put the finished output (a file or a directory) where the old one was."""
    if local:
        _fsync_tree(tmp)
        if os.path.isdir(tmp) or os.path.isdir(path):
            old = f"{path}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            if os.path.lexists(path):
                os.rename(path, old)
                failpoints.hit("mid_swap")   # old output moved aside, new one not yet in place
            os.rename(tmp, path)
            _delete(fs, old)
        else:
            os.replace(tmp, path)
        return
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        _delete(fs, path)
    if fs.get_file_info(tmp).type == pafs.FileType.File:
        fs.move(tmp, path)
        return
    for entry in fs.get_file_info(pafs.FileSelector(tmp, recursive=True)):
        if entry.type == pafs.FileType.File:
            target = path + entry.path[len(tmp):]
            _create_parent(fs, target)
            fs.move(entry.path, target)
    _delete(fs, tmp)


def _fsync_tree(path: str) -> None:
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    for name in files:
        with open(name, "rb") as f:
            os.fsync(f.fileno())


def _delete(fs: pafs.FileSystem, path: str) -> None:
    try:
        if isinstance(fs, pafs.LocalFileSystem) and os.path.islink(path):
            os.unlink(path)   # an output that was a link: the link goes, never what it points to
            return
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            fs.delete_file(path)
    except OSError:
        pass


def _remove_stale_temps(path: str) -> None:
    """What a killed run left beside the output: temp files or datasets, and a dataset it was
    replacing (the job lock is held, so none is live)."""
    import glob
    import re
    import shutil
    ours = re.compile(re.escape(os.path.basename(path)) + r"\.(tmp|old)-\d+-[0-9a-f]{8}")
    for stale in glob.glob(glob.escape(path) + ".tmp-*") + glob.glob(glob.escape(path) + ".old-*"):
        if not ours.fullmatch(os.path.basename(stale)):
            continue
        try:
            if os.path.isdir(stale) and not os.path.islink(stale):
                shutil.rmtree(stale)
            else:
                os.remove(stale)
        except OSError:
            pass
