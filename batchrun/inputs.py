"""Reading the input table as a stream of Arrow record batches, and its fingerprint.

CSV (read by csv_input.CsvReading, a part of InputSource), Parquet (a file or a directory of files)
and JSONL, from a local path or a filesystem URI that pyarrow understands (s3://, gs://, file://, or
any fsspec protocol when fsspec is installed). Rows are never all in memory: every reader yields
record batches of bounded size.
"""
from __future__ import annotations

import base64
import re
import zlib
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from . import fingerprint
from .csv_input import CsvReading
from .fingerprint import input_format
from .errors import ColumnTypeConflict, InputError

BATCH_ROWS = 8192
# CSV/JSONL blocks: pyarrow's streaming readers hold a few dozen blocks at once, so the block size
# sets their memory (1 MiB: ~40 MB; 4 MiB: ~130 MB). A row larger than a block is read by trying
# again with larger blocks (see _grow_blocks).
_CSV_BLOCK = 1 << 20
_MAX_BLOCK = 1 << 30
# The key of a JSONL file's schema in InputSource.pins() (not a column name).
_JSONL_SCHEMA = "(jsonl schema)"
# A float holds every integer up to 2**53 exactly; a JSON number past it is read as a decimal when its
# column holds only integers (see InputSource._jsonl_schema).
_EXACT_FLOAT = 2 ** 53


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path for a local path or a URI.

    pyarrow's own filesystems first (file://, s3://, gs://, abfs://, hdfs://; credentials and
    endpoints as their SDKs read them, e.g. AWS_* variables, or in the URI's query string), then
    any fsspec protocol (memory://, gcs through gcsfs, az, ...) when fsspec is installed.
    """
    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    scheme = uri.split("://", 1)[0].lower()
    parts = urlsplit(uri)
    secrets = _SECRET_PARAMS.intersection(k.lower() for k in parse_qs(parts.query))
    if parts.password:
        secrets.add("a password before '@'")
        uri = f"{parts.scheme}://{parts.hostname}{parts.path}"
    if secrets:
        raise InputError(f"{_redact(uri)}: put the store's credentials ({', '.join(sorted(secrets))}) in the "
                         "environment (e.g. AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS), not in the "
                         "URI: batchrun records URIs in its state file and logs")
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        return _bounded(fs), path
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as first:
        pyarrow_error = first
    except OSError as exc:  # the store answered (or could not be reached) while resolving the bucket
        raise InputError(f"{uri}: cannot reach the store: {_short(exc)}") from None
    try:  # any fsspec protocol (memory://, gcs via gcsfs, ...)
        import fsspec
    except ImportError:
        raise InputError(f"{uri}: unsupported filesystem ({_short(pyarrow_error)}); pip install 'batchrun[fsspec]', or the "
                         f"matching extra (batchrun[s3], batchrun[gcs])") from None
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as exc:  # a known protocol whose package is missing (gcsfs, adlfs, ...)
        extra = {"gs": "batchrun[gcs]", "gcs": "batchrun[gcs]", "s3": "batchrun[s3]", "s3a": "batchrun[s3]"}
        hint = f"pip install '{extra[scheme]}'" if scheme in extra else "install the fsspec package for it"
        raise InputError(f"{uri}: the {scheme}:// filesystem needs a package that is not installed "
                         f"({_short(exc)}); {hint}") from None
    except (ValueError, OSError) as exc:
        raise InputError(f"{uri}: unsupported filesystem: {_short(exc)}") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# Query-string keys of pyarrow/fsspec URIs that hold credentials.
_SECRET_PARAMS = {"secret_key", "access_key", "session_token", "access_token", "token", "password",
                  "account_key", "sas_token", "client_secret"}
# How long pyarrow's GCS client retries an operation (its default is 15 minutes per call, which
# looks like a hang when the store cannot be reached or no credentials are found).
GCS_RETRY_SECONDS = 60


def _bounded(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The same filesystem with bounded retries where pyarrow's default would wait for minutes."""
    if type(fs).__name__ == "GcsFileSystem":
        rebuild, (options,) = fs.__reduce__()
        if options.get("retry_time_limit") is None:
            options["retry_time_limit"] = timedelta(seconds=GCS_RETRY_SECONDS)
            return rebuild(options)
    return fs


def _redact(uri: str) -> str:
    """A URI without its query string (which may hold credentials)."""
    return uri.split("?", 1)[0] + ("?…" if "?" in uri else "")


@dataclass
class InputSource(CsvReading):
    """One input table. `column_types` pins CSV columns whose inferred type did not hold.

    `shard_key` is the job's id column: its value picks a row's shard. It keeps its type like any
    column (a CSV column of 1, 2, 3 is int64; one with 007 or 01 is text, so 1 and 01 are two ids).
    """

    uri: str
    column_types: dict = field(default_factory=dict)
    limit: Optional[int] = None
    shard: Optional[tuple[int, int]] = None   # (K, N): only the rows of shard K of N
    shard_key: Optional[str] = None           # the id column (see above); without one, position picks the shard
    block_size: int = _CSV_BLOCK              # CSV/JSONL read block; grows when a row does not fit
    json_schema: Optional[pa.Schema] = None   # a JSONL file's whole schema, when its first block's was not enough

    def __post_init__(self) -> None:
        self.fs, self.path = filesystem_for(self.uri)
        try:
            info = self.fs.get_file_info(self.path)
        except OSError as exc:
            raise InputError(f"{self.uri}: cannot open input: {_short(exc)[:300]}") from None
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"{self.uri}: input file not found")
        if info.type not in (pafs.FileType.File, pafs.FileType.Directory):   # a FIFO or a device would hang
            raise InputError(f"{self.uri}: cannot open input: not a regular file")
        self.is_dir = info.type == pafs.FileType.Directory
        self.format = "parquet" if self.is_dir else input_format(self.path)
        if self.format == "unknown":
            raise InputError(f"{self.uri}: unsupported input type (expected .csv, .parquet or .jsonl)")

    # ---- reading ---------------------------------------------------------------------------
    def batches(self) -> Iterator[pa.RecordBatch]:
        """Record batches of at most BATCH_ROWS rows, in input order, honouring `limit`."""
        for batch, _ in self.batches_with_text():
            yield batch

    def batches_with_text(self) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]:
        """(batch, text): the rows of `batches()`, and the same rows with every cell as the file wrote it.

        A CSV file's cells are text, whatever type their column is read as (`true`, `1.50`,
        `2026-03-01T09:30:00+02:00` stay as written; the batch holds bool, float, timestamp); prompts
        are rendered from the text. Parquet and JSONL cells are typed values in the file: text is batch.
        """
        remaining = self.limit
        position = 0
        for batch, text in self._raw_batches():
            if self.shard is not None:
                mask = self._shard_mask(batch, position)
                position += batch.num_rows
                batch = batch.filter(mask)
                text = batch if text is None else text.filter(mask)
            if remaining is not None:
                if remaining <= 0:
                    return
                if batch.num_rows > remaining:
                    batch = batch.slice(0, remaining)
                    text = None if text is None else text.slice(0, remaining)
                remaining -= batch.num_rows
            for start in range(0, batch.num_rows, BATCH_ROWS):
                part = batch.slice(start, BATCH_ROWS)
                yield part, part if text is None else text.slice(start, BATCH_ROWS)

    def _shard_mask(self, batch: pa.RecordBatch, position: int) -> pa.Array:
        """Which rows of `batch` are in this source's shard: by a stable hash (CRC-32) of the key
        column's value, so a row stays in its shard when rows are added or removed elsewhere; by
        input position when there is no key column."""
        k, n = self.shard
        if self.shard_key is not None:
            if self.shard_key not in batch.schema.names:
                raise InputError(f"id_column: column {self.shard_key!r} is not in {self.uri} "
                                 f"(columns: {', '.join(batch.schema.names[:12])})")
            keys = batch.column(self.shard_key).to_pylist()
            # an empty id is kept in every shard, where planning reports it
            mask = [v is None or v == "" or zlib.crc32(str(v).encode("utf-8")) % n == k - 1 for v in keys]
        else:
            mask = [(position + i) % n == k - 1 for i in range(batch.num_rows)]
        return pa.array(mask, type=pa.bool_())

    @property
    def schema(self) -> pa.Schema:
        while True:
            try:
                for batch in self.batches():
                    return batch.schema
            except ColumnTypeConflict:   # pinned: read again
                continue
            raise InputError(f"{self.uri}: input is empty (no rows)")

    # ---- what was learnt while reading, kept with the job's plan -------------------------------
    def pins(self) -> dict:
        """What reading learnt that the first rows did not tell (JSON-able; stored with the job's plan):
        CSV columns read as text ({column: "string"}) and a JSONL file's whole schema."""
        pins = {name: str(t) for name, t in self.column_types.items()}
        if self.json_schema is not None:
            pins[_JSONL_SCHEMA] = base64.b64encode(self.json_schema.serialize().to_pybytes()).decode("ascii")
        return pins

    def pin(self, pins: dict) -> None:
        """Read as `pins` (from `pins()`) says."""
        pins = dict(pins)
        blob = pins.pop(_JSONL_SCHEMA, None)
        if blob is not None:
            self.json_schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(blob)))
        self.column_types = {name: pa.string() for name in pins}

    def _raw_batches(self) -> Iterator[tuple[pa.RecordBatch, Optional[pa.RecordBatch]]]:
        """(batch, text or None when the batch is its own text)."""
        try:
            first = True
            if self.format == "csv":
                pairs = self._csv_batches()
            elif self.format == "parquet":
                pairs = ((b, None) for b in self._parquet_batches())
            else:
                pairs = self._jsonl_batches()
            for batch, text in pairs:
                if first:
                    self._check_names(batch.schema.names)
                    first = False
                yield batch, text
        except ColumnTypeConflict:
            raise
        except InputError:
            raise
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{self.uri}: cannot read {self.format.upper()} input: {_short(exc)}") from None

    def _check_names(self, names: list) -> None:
        """Refuse two columns of one name (review_id,title,title): a template, an id or an output column
        could only pick one of them."""
        seen: dict = {}
        for i, name in enumerate(names):
            if name in seen:
                raise InputError(f"{self.uri}: column {name!r} appears twice (columns {seen[name] + 1} and {i + 1}); "
                                 "give each column its own name")
            seen[name] = i

    def _open(self):
        compression = "gzip" if self.path.lower().endswith(".gz") else None
        return self.fs.open_input_stream(self.path, compression=compression)

    def _grow_blocks(self, read: Callable[[int, Optional[pa.Schema]], Iterator[tuple]]) -> Iterator[tuple]:
        """(batch, text) pairs of `read(block_size, schema)`; when a row does not fit in a block
        ("straddling object"), read again with blocks 8x larger, skipping the rows already given and
        keeping the column types they had (a larger first block could infer others)."""
        given, schema = 0, None
        while True:
            try:
                skip = given
                for batch, text in read(self.block_size, schema):
                    schema = schema or batch.schema
                    if skip >= batch.num_rows:
                        skip -= batch.num_rows
                        continue
                    if skip:
                        batch, text, skip = batch.slice(skip), None if text is None else text.slice(skip), 0
                    given += batch.num_rows
                    yield batch, text
                return
            except pa.ArrowInvalid as exc:
                if "straddl" not in str(exc) or self.block_size >= _MAX_BLOCK:
                    raise
                self.block_size = min(self.block_size * 8, _MAX_BLOCK)

    def _parquet_batches(self) -> Iterator[pa.RecordBatch]:
        if self.is_dir:
            import pyarrow.dataset as pads  # imported here: it is slow to import and only directories need it
            # a Hive-partitioned dataset (col=value/ directories, e.g. a --partition-by output)
            # gets its partition columns back; plain directories of files are read as they are
            dataset = pads.dataset(self.path, filesystem=self.fs, format="parquet", partitioning="hive")
            files = sorted(dataset.files)  # a stable order, whatever the listing order
            dataset = pads.dataset(files, filesystem=self.fs, format="parquet", schema=dataset.schema,
                                   partitioning="hive", partition_base_dir=self.path)
            yield from dataset.to_batches(batch_size=BATCH_ROWS, fragment_readahead=1, batch_readahead=2)
            return
        with self.fs.open_input_file(self.path) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS)

    def _jsonl_batches(self) -> Iterator[tuple]:
        return self._grow_blocks(self._jsonl_read)

    def _jsonl_read(self, block_size: int, schema: Optional[pa.Schema]) -> Iterator[tuple]:
        """(batch, None) pairs. The types are pyarrow's, inferred from the first block; when a later line
        does not fit them (a key first seen there, a number where the first lines had integers) or a
        number is past what a float holds exactly, the whole file's schema is worked out
        (_jsonl_schema) and the file read again from the start with it (ColumnTypeConflict)."""
        explicit = self.json_schema or schema
        parse = pajson.ParseOptions(explicit_schema=explicit) if explicit is not None else None
        with self._open() as stream:
            try:
                for batch in pajson.open_json(stream, read_options=pajson.ReadOptions(block_size=block_size),
                                              parse_options=parse):
                    if self.json_schema is None and _past_exact_floats(batch):
                        raise self._whole_schema()
                    yield batch, None
            except pa.ArrowInvalid as exc:
                if self.json_schema is None and re.search(r"unexpected field|Failed to convert JSON|changed from",
                                                          str(exc)):
                    raise self._whole_schema() from None
                raise

    def widen(self) -> None:
        """When the columns of the first block may not be all of a JSONL file's (a key first seen later),
        work out the whole file's schema and raise ColumnTypeConflict to read it again; else nothing."""
        if self.format == "jsonl" and self.json_schema is None and (
                self.path.lower().endswith(".gz") or self.fs.get_file_info(self.path).size > self.block_size):
            raise self._whole_schema()

    def _whole_schema(self) -> ColumnTypeConflict:
        self.json_schema = self._jsonl_schema()
        return ColumnTypeConflict(None)

    def _jsonl_schema(self) -> pa.Schema:
        """The schema of the whole JSONL file: each part's own, unified (a key first seen late is a
        column, null before; integers and numbers give numbers); a number column whose values past
        2**53 are all integers is a decimal of scale 0, so they keep every digit. A pass over the file,
        taken only when the first block's schema does not hold."""
        schemas, big, line = [], [], 1
        for chunk in self._jsonl_chunks():
            try:
                table = pajson.read_json(pa.py_buffer(chunk),
                                         read_options=pajson.ReadOptions(block_size=len(chunk) + 1))
            except pa.ArrowInvalid as exc:
                m = re.search(r"Column\(/?([^)]*)\) changed from (\w+) to (\w+) in row (\d+)", str(exc))
                if m is None:
                    raise
                raise InputError(f"{self.uri}: line {line + int(m[4])}: key {m[1]!r} holds a {m[3]} where the lines "
                                 f"before hold a {m[2]}; give each key one kind of value") from None
            line += chunk.count(b"\n")
            schemas.append(table.schema)
            for name in table.column_names:
                big += [(name, path) for path in _big_floats(table.column(name)) if (name, path) not in big]
        if not schemas:
            raise InputError(f"{self.uri}: input is empty (no rows)")
        try:
            schema = pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"{self.uri}: cannot read JSONL input: a key holds values of different kinds "
                             f"in different lines ({_short(exc)})") from None
        for name, path in big:   # a number past 2**53 inside an object or a list too
            for exact in (pa.decimal128(38, 0), pa.decimal256(76, 0)):
                type_ = _retyped(schema.field(name).type, path, exact)
                if self._jsonl_fits(name, type_):
                    schema = schema.set(schema.get_field_index(name), schema.field(name).with_type(type_))
                    break
        return schema

    def _jsonl_fits(self, name: str, type_: pa.DataType) -> bool:
        """Whether every value of key `name` converts to `type_`."""
        parse = pajson.ParseOptions(explicit_schema=pa.schema([(name, type_)]), unexpected_field_behavior="ignore")
        try:
            for chunk in self._jsonl_chunks():
                pajson.read_json(pa.py_buffer(chunk), read_options=pajson.ReadOptions(block_size=len(chunk) + 1),
                                 parse_options=parse)
        except pa.ArrowInvalid:
            return False
        return True

    def _jsonl_chunks(self) -> Iterator[bytes]:
        """The file in parts of whole lines (about block_size bytes each; blank parts left out)."""
        rest = b""
        with self._open() as stream:
            while True:
                data = stream.read(self.block_size)
                if not data:
                    break
                data = rest + data
                cut = data.rfind(b"\n") + 1
                if cut:
                    if data[:cut].strip():
                        yield data[:cut]
                    data = data[cut:]
                rest = data
        if rest.strip():
            yield rest

    # ---- identity --------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A hash of the input's bytes (local files) or of its listing (remote URIs)."""
        try:
            return self._fingerprint()
        except OSError as exc:   # unreadable: permissions, a directory or a FIFO inside a dataset, I/O errors
            where = getattr(exc, "filename", None) or self.uri
            raise InputError(f"{where}: cannot read input: {exc.strerror or _short(exc)}") from None

    def _fingerprint(self) -> str:
        if self.is_dir:
            selector = pafs.FileSelector(self.path, recursive=True)
            infos = sorted((i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File),
                           key=lambda i: i.path)
        else:
            infos = [self.fs.get_file_info(self.path)]
        local = isinstance(self.fs, pafs.LocalFileSystem)
        files = [(i.path.encode() if self.is_dir else b"", i.size, i.path if local else None,
                  None if local else i.mtime_ns) for i in infos]
        if local:   # hashed once while stat says it is as it was (see fingerprint.py)
            return fingerprint.local(self.format, files, self.limit, self.shard)
        return fingerprint.digest(self.format, files, self.limit, self.shard)


def _past_exact_floats(batch: pa.RecordBatch) -> bool:
    """Whether a float of the batch (in a column, or inside its objects and lists) is past 2**53, whose
    digits a float may not keep."""
    return any(_big_floats(column) for column in batch.columns)


def _big_floats(column: Any, path: tuple = ()) -> list:
    """The paths (struct field indices, "item" for a list's values; () for the column itself) of the
    floats of `column` that hold a number past 2**53."""
    type_ = column.type
    if pa.types.is_struct(type_):
        return [found for i in range(type_.num_fields)
                for found in _big_floats(pc.struct_field(column, [i]), path + (i,))]
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return _big_floats(pc.list_flatten(column), path + ("item",))
    if pa.types.is_floating(type_) and (pc.max(pc.abs(column)).as_py() or 0) >= _EXACT_FLOAT:
        return [path]
    return []


def _retyped(type_: pa.DataType, path: tuple, new: pa.DataType) -> pa.DataType:
    """`type_` with the type at `path` (see _big_floats) replaced by `new`."""
    if not path:
        return new
    if path[0] == "item":
        item = type_.value_field
        make = pa.large_list if pa.types.is_large_list(type_) else pa.list_
        return make(item.with_type(_retyped(item.type, path[1:], new)))
    fields = [type_.field(i) for i in range(type_.num_fields)]
    fields[path[0]] = fields[path[0]].with_type(_retyped(fields[path[0]].type, path[1:], new))
    return pa.struct(fields)


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
