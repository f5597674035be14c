"""Reading the input table as a stream of Arrow record batches, and its fingerprint.

CSV, Parquet (a file or a directory of files) and JSONL, from a local path or a filesystem URI that
pyarrow understands (s3://, gs://, file://, or any fsspec protocol when fsspec is installed). Rows are
never all in memory: every reader yields record batches of bounded size.
"""
from __future__ import annotations

import codecs
import hashlib
import re
import zlib
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from .errors import InputError

CSV_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".json")
BATCH_ROWS = 8192
# CSV/JSONL blocks: pyarrow's streaming readers hold a few dozen blocks at once, so the block size
# sets their memory (1 MiB: ~40 MB; 4 MiB: ~130 MB). A row larger than a block is read by trying
# again with larger blocks (see _grow_blocks).
_CSV_BLOCK = 1 << 20
_MAX_BLOCK = 1 << 30


class ColumnTypeConflict(Exception):
    """A CSV column's type, inferred from the first rows, does not fit a later row (or would change
    its text there, like 007 read as 7): the column must be read as text from the start."""

    def __init__(self, column: str):
        super().__init__(column)
        self.column = column


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


def input_format(path: str) -> str:
    lower = path.lower().rstrip("/")
    if lower.endswith(CSV_SUFFIXES):
        return "csv"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "unknown"


@dataclass
class InputSource:
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
        remaining = self.limit
        position = 0
        for batch in self._raw_batches():
            if self.shard is not None:
                position, batch = position + batch.num_rows, self._shard_rows(batch, position)
            if remaining is not None:
                if remaining <= 0:
                    return
                if batch.num_rows > remaining:
                    batch = batch.slice(0, remaining)
                remaining -= batch.num_rows
            for start in range(0, batch.num_rows, BATCH_ROWS):
                yield batch.slice(start, BATCH_ROWS)

    def _shard_rows(self, batch: pa.RecordBatch, position: int) -> pa.RecordBatch:
        """The rows of `batch` in this source's shard: by a stable hash (CRC-32) of the key column's
        value, so a row stays in its shard when rows are added or removed elsewhere; by input
        position when there is no key column."""
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
        return batch.filter(pa.array(mask, type=pa.bool_()))

    @property
    def schema(self) -> pa.Schema:
        for batch in self.batches():
            return batch.schema
        raise InputError(f"{self.uri}: input is empty (no rows)")

    def _raw_batches(self) -> Iterator[pa.RecordBatch]:
        try:
            if self.format == "csv":
                yield from self._csv_batches()
            elif self.format == "parquet":
                yield from self._parquet_batches()
            else:
                yield from self._jsonl_batches()
        except ColumnTypeConflict:
            raise
        except InputError:
            raise
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{self.uri}: cannot read {self.format.upper()} input: {_short(exc)}") from None

    def _open(self):
        compression = "gzip" if self.path.lower().endswith(".gz") else None
        return self.fs.open_input_stream(self.path, compression=compression)

    def _head(self) -> bytes:
        """The first 64 KiB of the (decompressed) file."""
        with self._open() as stream:
            return stream.read(1 << 16)

    def _check_text(self) -> None:
        """Refuse a binary file named .csv (NUL bytes near its start) before pyarrow reads it as text."""
        if b"\x00" in self._head():
            raise InputError(f"{self.uri}: cannot read CSV input: binary data, not CSV text (a UTF-16 file must "
                             "be saved as UTF-8)")

    def _grow_blocks(self, read: Callable[[int, Optional[pa.Schema]], Iterator[pa.RecordBatch]]
                     ) -> Iterator[pa.RecordBatch]:
        """Batches of `read(block_size, schema)`; when a row does not fit in a block ("straddling
        object"), read again with blocks 8x larger, skipping the rows already given and keeping the
        column types they had (a larger first block could infer others)."""
        given, schema = 0, None
        while True:
            try:
                skip = given
                for batch in read(self.block_size, schema):
                    schema = schema or batch.schema
                    if skip >= batch.num_rows:
                        skip -= batch.num_rows
                        continue
                    if skip:
                        batch, skip = batch.slice(skip), 0
                    given += batch.num_rows
                    yield batch
                return
            except pa.ArrowInvalid as exc:
                if "straddl" not in str(exc) or self.block_size >= _MAX_BLOCK:
                    raise
                self.block_size = min(self.block_size * 8, _MAX_BLOCK)

    def _csv_batches(self) -> Iterator[pa.RecordBatch]:
        return self._grow_blocks(self._csv_read)

    def _csv_read(self, block_size: int, schema: Optional[pa.Schema]) -> Iterator[pa.RecordBatch]:
        """CSV batches with pyarrow's types, except that a number column is read as numbers only when
        that keeps every value (see _as_numbers): those columns are read as text and converted here."""
        delimiter = "\t" if ".tsv" in self.path.lower() else ","
        pinned = dict(self.column_types)
        inferred = schema is None   # no types given (and so no batches given before this read)
        if inferred:   # pyarrow's inference over the first block (then read again from the start)
            self._check_text()
            with self._open() as stream:
                schema = self._open_csv(stream, block_size, delimiter, pinned).schema
        types = {**{f.name: f.type for f in schema}, **pinned}
        numeric = {name: t for name, t in types.items() if t in (pa.int64(), pa.float64())}
        as_text = {**types, **{name: pa.string() for name in numeric}}
        with self._open() as stream:
            reader = self._open_csv(stream, block_size, delimiter, as_text)
            names = reader.schema.names
            first = inferred
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                except pa.ArrowInvalid as exc:
                    m = re.search(r"In CSV column #(\d+): CSV conversion error", str(exc))
                    if m and int(m.group(1)) < len(names):
                        raise ColumnTypeConflict(names[int(m.group(1))]) from None
                    raise
                columns = batch.columns
                for name, type_ in list(numeric.items()):
                    i = names.index(name)
                    numbers = _as_numbers(columns[i], type_)
                    if numbers is not None:
                        columns[i] = numbers
                    elif first:       # nothing given yet: the column is text from the start
                        del numeric[name]
                    else:
                        raise ColumnTypeConflict(name)
                first = False
                yield pa.RecordBatch.from_arrays(columns, names=names)

    def _open_csv(self, stream, block_size: int, delimiter: str, types: dict) -> pacsv.CSVStreamingReader:
        try:
            return pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(block_size=block_size),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(column_types=types),
            )
        except pa.ArrowInvalid as exc:
            if "Empty CSV file" in str(exc):   # pyarrow says so of any bytes without a line end
                head = self._head()
                if not head.strip():
                    raise InputError(f"{self.uri}: input is empty (no header, no rows)") from None
                try:
                    codecs.getincrementaldecoder("utf-8")().decode(head)
                except UnicodeDecodeError:
                    raise InputError(f"{self.uri}: cannot read CSV input: not UTF-8 text") from None
                raise InputError(f"{self.uri}: input is empty (no rows)") from None
            raise

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

    def _jsonl_batches(self) -> Iterator[pa.RecordBatch]:
        return self._grow_blocks(self._jsonl_read)

    def _jsonl_read(self, block_size: int, schema: Optional[pa.Schema]) -> Iterator[pa.RecordBatch]:
        parse = pajson.ParseOptions(explicit_schema=schema) if schema is not None else None
        with self._open() as stream:
            yield from pajson.open_json(stream, read_options=pajson.ReadOptions(block_size=block_size),
                                        parse_options=parse)

    # ---- identity --------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A hash of the input's bytes (local files) or of its listing (remote URIs)."""
        try:
            return self._fingerprint()
        except OSError as exc:   # unreadable: permissions, a directory or a FIFO inside a dataset, I/O errors
            where = getattr(exc, "filename", None) or self.uri
            raise InputError(f"{where}: cannot read input: {exc.strerror or _short(exc)}") from None

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.format.encode())
        if self.is_dir:
            selector = pafs.FileSelector(self.path, recursive=True)
            infos = sorted((i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File),
                           key=lambda i: i.path)
        else:
            infos = [self.fs.get_file_info(self.path)]
        local = isinstance(self.fs, pafs.LocalFileSystem)
        for info in infos:
            h.update(info.path.encode() if self.is_dir else b"")
            h.update(str(info.size).encode())
            if local:
                with open(info.path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            else:  # remote: size and modification time stand in for the bytes
                h.update(str(info.mtime_ns).encode())
        if self.limit is not None:
            h.update(f"limit={self.limit}".encode())
        if self.shard is not None:
            h.update(f"shard={self.shard[0]}/{self.shard[1]}".encode())
        return h.hexdigest()


_CSV_NULLS = pa.array(pacsv.ConvertOptions().null_values, pa.string())
# Values whose text a float would not keep: a leading zero (007.5, 00), a '+' on a whole number (+44),
# a whole number past a float's 15 exact digits (a long id), more than 15 significant digits anywhere
# (0.12345678901234567891: from its first to its last non-zero digit). 1.50 -> 1.5 is the same number: kept.
_LOSSY_FLOAT = r"^(?:\+\d+|[+-]?0\d.*|[+-]?\d{16,})$|^[+-]?[0.]*[1-9](?:\.?\d){14}\.?\d*[1-9]"


def _as_numbers(text: pa.Array, type_: pa.DataType) -> Optional[pa.Array]:
    """CSV cells (as text) as int64 or float64 numbers, or None when a cell does not fit the type or
    its number would not keep its text: an int64 column only of canonical integers (not 007, +1, -0),
    a float64 column without the values of _LOSSY_FLOAT. Spaces around a number and pyarrow's null
    markers ("", NA, null, ...) are allowed, as pyarrow's own conversion allows them."""
    trimmed = pc.utf8_trim_whitespace(text)
    trimmed = pc.if_else(pc.is_in(trimmed, value_set=_CSV_NULLS), pa.scalar(None, pa.string()), trimmed)
    try:
        numbers = pc.cast(trimmed, type_)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if type_ == pa.int64():
        kept = pc.all(pc.equal(pc.cast(numbers, pa.string()), trimmed)).as_py() is not False
    else:
        kept = not pc.any(pc.match_substring_regex(trimmed, _LOSSY_FLOAT)).as_py()
    return numbers if kept else None


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
