"""Reading a CSV (or TSV) file: every cell as the file wrote it, and each column typed when its text
survives the type (see _typed).

`CsvReading` is a part of `inputs.InputSource` (a mixin, as the store's SQL parts are): the source
gives the file (`uri`, `path`, `fs`, `_open()`), what it has pinned (`column_types`), its `limit` and
its growing blocks (`_grow_blocks`); this part reads the text, types its columns and refuses what
pyarrow would misread (a binary file, bytes that are not UTF-8, a quote that never closes).
"""
from __future__ import annotations

import codecs
import re
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from .errors import ColumnTypeConflict, InputError


class CsvReading:
    """The CSV reader of an InputSource (see the module's docstring)."""

    def _csv_batches(self) -> Iterator[tuple]:
        """(batch, text) pairs of the whole file (see _csv_read), blocks grown as rows need."""
        return self._grow_blocks(self._csv_read)

    def _csv_read(self, block_size: int, schema: Optional[pa.Schema]) -> Iterator[tuple]:
        """(batch, text) pairs: every column is read as text, then converted here to the type pyarrow
        infers from the first block (see _typed; a number column only when that keeps every value);
        the text is what prompts are rendered from. A column whose first rows do not convert is text
        from the start; a later row that does not fit pins it as text (ColumnTypeConflict)."""
        delimiter = "\t" if ".tsv" in self.path.lower() else ","
        pinned = dict(self.column_types)
        inferred = schema is None   # no types given (and so no batches given before this read)
        if inferred:   # pyarrow's inference over the first block (then read again from the start)
            self._check_text()
            with self._open() as stream:
                schema = self._open_csv(stream, block_size, delimiter, pinned).schema
            binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
            if binary:   # pyarrow reads a cell that is not UTF-8 as bytes: a prompt would show b'caf\xe9'
                self._refuse_not_utf8(binary[0])
            if self.limit is not None or self.path.lower().endswith(".gz"):
                # the rows past the limit are not read (nor a compressed file's end looked at): check first
                self._check_quotes(delimiter)
        types = {**{f.name: f.type for f in schema}, **pinned}
        converted = {name: t for name, t in types.items() if _converts_from_text(t)}
        as_text = {**types, **{name: pa.string() for name in converted}}
        with self._open() as stream:
            reader = self._open_csv(stream, block_size, delimiter, as_text)
            names = reader.schema.names
            first = inferred
            for text in self._csv_text_batches(reader, as_text, delimiter):
                columns = text.columns
                for name, type_ in list(converted.items()):
                    i = names.index(name)
                    values = _typed(columns[i], type_)
                    if values is not None:
                        columns[i] = values
                    elif first:       # nothing given yet: the column is text from the start
                        del converted[name]
                    else:
                        self.column_types[name] = pa.string()
                        raise ColumnTypeConflict(name)
                first = False
                yield (pa.RecordBatch.from_arrays(columns, names=names) if converted else text), text

    def _csv_text_batches(self, reader: pacsv.CSVStreamingReader, as_text: dict, delimiter: str
                          ) -> Iterator[pa.RecordBatch]:
        """The reader's (non-empty) batches, one behind: the last is given only once the file's end is
        known not to be inside a quoted cell (see _check_last_cell)."""
        names = reader.schema.names
        held = None
        while True:
            try:
                text = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as exc:
                m = re.search(r"In CSV column #(\d+): CSV conversion error", str(exc))
                if m and int(m.group(1)) < len(names) and as_text[names[int(m.group(1))]] != pa.string():
                    self.column_types[names[int(m.group(1))]] = pa.string()
                    raise ColumnTypeConflict(names[int(m.group(1))]) from None
                self._explain_parse_error(exc, delimiter)
                raise
            if text.num_rows:
                if held is not None:
                    yield held
                held = text
        if held is not None:
            self._check_last_cell(held, delimiter)
            yield held

    def _explain_parse_error(self, exc: Exception, delimiter: str) -> None:
        """A row with too few cells may be a quote that never closes: name its line if it is."""
        if re.search(r"Expected \d+ columns, got", str(exc)):
            self._check_quotes(delimiter)

    def _check_last_cell(self, last: pa.RecordBatch, delimiter: str) -> None:
        """A quote that never closes makes pyarrow read the rest of the file into the last cell it reads:
        that cell is then the file's tail after a quote that opens a field. Looking at the tail only
        keeps a whole file's scan (_check_quotes) for when it is so."""
        column = last.column(last.num_columns - 1)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            return
        value = column[last.num_rows - 1].as_py()
        if value is None or self.path.lower().endswith(".gz"):
            return
        raw = b'"' + value.replace('"', '""').encode("utf-8")
        size = self.fs.get_file_info(self.path).size
        start = max(0, size - len(raw) - 1)
        with self.fs.open_input_file(self.path) as f:
            f.seek(start)
            tail = f.read()
        if not tail.endswith(raw):
            return
        at = len(tail) - len(raw)
        before = tail[at - 1:at] if at else b"\n"   # the file's start is a field's start
        if before in (delimiter.encode(), b"\n", b"\r"):
            self._check_quotes(delimiter)

    def _check_quotes(self, delimiter: str) -> None:
        """Refuse a quoted cell that never closes: pyarrow would read the rest of the file into it.

        A quote opens a cell at the start of a field (after the delimiter or a line end); inside, ""
        is a quote and a lone " closes it. One pass over the bytes, looking only at the quotes."""
        sep, quote = delimiter.encode(), b'"'
        in_quote, pending, line, opened, prev = False, False, 1, 0, b"\n"
        with self._open() as stream:
            for chunk in iter(lambda: stream.read(1 << 22), b""):
                pos = 0
                counted = 0        # line ends of this chunk counted into `line` so far: up to here
                if pending:        # the last chunk ended on a quote inside a quoted cell
                    pending = False
                    if chunk[:1] == quote:
                        pos = 1    # "" : a quote in the cell
                    else:
                        in_quote = False
                while True:
                    q = chunk.find(quote, pos)
                    if q < 0:
                        break
                    if in_quote:
                        if q + 1 == len(chunk):
                            pending = True
                            break
                        if chunk[q + 1:q + 2] == quote:
                            pos = q + 2
                            continue
                        in_quote, pos = False, q + 1
                    else:
                        before = chunk[q - 1:q] if q else prev
                        if before in (sep, b"\n", b"\r"):
                            line += chunk.count(b"\n", counted, q)
                            in_quote, opened, counted = True, line, q
                        pos = q + 1
                line += chunk.count(b"\n", counted)
                prev = chunk[-1:]
        if in_quote and not pending:
            raise InputError(f"{self.uri}: line {opened}: a quoted cell opens here and never closes (a missing "
                             "closing \"); the rest of the file would be read as one cell")

    def _refuse_not_utf8(self, column: str) -> None:
        """Refuse a CSV whose bytes are not UTF-8 (Latin-1, Windows-1252), naming the first such line."""
        decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
        with self._open() as stream:
            for chunk in iter(lambda: stream.read(1 << 22), b""):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    at = max(0, exc.start - len(exc.object) + len(chunk))
                    line += chunk.count(b"\n", 0, at)
                    raise InputError(f"{self.uri}: line {line}: column {column!r} is not UTF-8 text (byte "
                                     f"0x{exc.object[exc.start]:02x}); save the file as UTF-8") from None
                line += chunk.count(b"\n")
        raise InputError(f"{self.uri}: column {column!r} is not UTF-8 text; save the file as UTF-8")

    def _open_csv(self, stream, block_size: int, delimiter: str, types: dict) -> pacsv.CSVStreamingReader:
        try:
            return pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(block_size=block_size),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(column_types=types),
            )
        except pa.ArrowInvalid as exc:
            self._explain_parse_error(exc, delimiter)
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

    def _head(self) -> bytes:
        """The first 64 KiB of the (decompressed) file."""
        with self._open() as stream:
            return stream.read(1 << 16)

    def _check_text(self) -> None:
        """Refuse a binary file named .csv (NUL bytes near its start) before pyarrow reads it as text."""
        if b"\x00" in self._head():
            raise InputError(f"{self.uri}: cannot read CSV input: binary data, not CSV text (a UTF-16 file must "
                             "be saved as UTF-8)")


def _text_array(values: list) -> pa.StringArray:
    """A string array made without pa.array, which imports pandas (~0.15 s) the first time it converts Python
    values (pyarrow's pandas shim): reading a CSV input needs none of it."""
    from pyarrow.lib import StringBuilder
    builder = StringBuilder()
    builder.append_values(values)
    return builder.finish()


_CSV_NULLS = _text_array(pacsv.ConvertOptions().null_values)
_NULL_TEXT = pa.nulls(1, pa.string())[0]   # (pa.scalar(None, ...) would import pandas too)
# Values whose text a float would not keep: a leading zero (007.5, 00), a '+' on a whole number (+44),
# a whole number past a float's 15 exact digits (a long id), more than 15 significant digits anywhere
# (0.12345678901234567891: from its first to its last non-zero digit). 1.50 -> 1.5 is the same number: kept.
_LOSSY_FLOAT = r"^(?:\+\d+|[+-]?0\d.*|[+-]?\d{16,})$|^[+-]?[0.]*[1-9](?:\.?\d){14}\.?\d*[1-9]"


def _converts_from_text(type_: pa.DataType) -> bool:
    """Whether a CSV column of this type is read as text and converted by _typed (the others, like
    time of day or an all-empty column, pyarrow reads as their type directly)."""
    return type_ in (pa.int64(), pa.float64(), pa.bool_(), pa.date32()) or pa.types.is_timestamp(type_)


def _typed(text: pa.Array, type_: pa.DataType) -> Optional[pa.Array]:
    """CSV cells (as text) as values of `type_`, or None when a cell does not fit it (or, for numbers,
    its number would not keep its text: see _as_numbers). pyarrow's null markers are nulls."""
    if type_ in (pa.int64(), pa.float64()):
        return _as_numbers(text, type_)
    cleaned = pc.if_else(pc.is_in(text, value_set=_CSV_NULLS), _NULL_TEXT, text)
    try:
        return pc.cast(cleaned, type_)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def _as_numbers(text: pa.Array, type_: pa.DataType) -> Optional[pa.Array]:
    """CSV cells (as text) as int64 or float64 numbers, or None when a cell does not fit the type or
    its number would not keep its text: an int64 column only of canonical integers (not 007, +1, -0),
    a float64 column without the values of _LOSSY_FLOAT. Spaces around a number and pyarrow's null
    markers ("", NA, null, ...) are allowed, as pyarrow's own conversion allows them."""
    trimmed = pc.utf8_trim_whitespace(text)
    trimmed = pc.if_else(pc.is_in(trimmed, value_set=_CSV_NULLS), _NULL_TEXT, trimmed)
    try:
        numbers = pc.cast(trimmed, type_)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if type_ == pa.int64():
        kept = pc.all(pc.equal(pc.cast(numbers, pa.string()), trimmed)).as_py() is not False
    else:
        kept = not pc.any(pc.match_substring_regex(trimmed, _LOSSY_FLOAT)).as_py()
    return numbers if kept else None
