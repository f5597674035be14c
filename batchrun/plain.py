"""A plain template's row bodies, a block of rows at a time.

RequestBuilder.row_part renders one row: its prompt (templates.render_parts for a template of text and
`{{ column }}` only), the row part around it, then canonical JSON (requests.canonical_json). When the row
part holds nothing of the row but its prompt (no image_column, no max_tokens_column: see
RequestBuilder.plain), every row's canonical JSON is the same text around the prompt's JSON string, and
JSON escapes a string one character at a time: so a row's body is one format string (`PlainBodies.format`)
filled with the row's cells, each JSON-escaped. pyarrow finds the cells that need escaping (a quote, a
backslash, a control character) without the GIL; the others go in as they are. The same text as the
one-row path, byte for byte (tests/test_render.py), at a fraction of its cost: the plan renders every
row, and a batch's rows are rendered again before they are sent (bodies.py).

A block holding a row the one-row path would refuse (an empty prompt, one past MAX_PROMPT) is left to it
(`bodies` gives None), so that its error is raised as it always was.
"""
from __future__ import annotations

import json
import re
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from .templates import MAX_PROMPT, _cell

MARK = "\x00batchrun: the prompt\x00"   # the prompt in the row part whose JSON is split around it
_STRING = json.encoder.encode_basestring   # (as requests.canonical_json writes strings)
_ESCAPED = r'[\x00-\x1f"\\]'                # what encode_basestring changes: every other character is kept
_ESCAPED_RE = re.compile(_ESCAPED)


def _escaped(text: str) -> str:
    """The characters of `text` as a JSON string holds them (without the quotes)."""
    return _STRING(text)[1:-1] if _ESCAPED_RE.search(text) else text


class PlainBodies:
    """The canonical JSON row parts of a plain template's rows (see the module's docstring).

    `parts`: the template's templates.simple_parts; `skeleton`: the canonical JSON of the row part whose
    prompt is MARK. `of` gives None when the skeleton does not hold MARK's JSON exactly once (a few-shot
    turn holding it: never in practice), and the one-row path is used."""

    def __init__(self, parts: list, head: str, tail: str):
        pct = lambda s: s.replace("%", "%%")   # noqa: E731 (the text around the cells, in a %-format)
        self.format = pct(head) + '"' + "".join(pct(_escaped(p)) if is_text else "%s" for is_text, p in parts) \
            + '"' + pct(tail)
        self.columns = [p for is_text, p in parts if not is_text]   # in the template's order (a column may repeat)
        text = "".join(p for is_text, p in parts if is_text)
        self.text_chars = len(text)
        self.may_be_empty = not text.strip()   # text in the template: no row renders an empty prompt

    @classmethod
    def of(cls, parts: list, skeleton: str) -> Optional["PlainBodies"]:
        pieces = skeleton.split(_STRING(MARK))
        return cls(parts, *pieces) if len(pieces) == 2 else None

    def bodies(self, text: pa.RecordBatch) -> Optional[list[str]]:
        """Every row's body (canonical JSON of its row part) from the block's text; None when a row of it
        must go the one-row way (its prompt empty or too long: that path names the row in its error)."""
        if not self.columns:
            return [self.format % ()] * text.num_rows
        cells: dict = {}     # column -> its cells as they render (for the empty-prompt check)
        escaped: dict = {}   # column -> its cells JSON-escaped
        most: dict = {}      # column -> a bound on its cells' characters
        for name in self.columns:
            if name not in escaped:
                cells[name], escaped[name], most[name] = _column(text.column(name))
        if self.text_chars + sum(most[name] for name in self.columns) > MAX_PROMPT:
            return None
        if self.may_be_empty and any(all(not c or c.isspace() for c in row)
                                     for row in zip(*(cells[name] for name in self.columns))):
            return None
        fmt = self.format
        return [fmt % row for row in zip(*(escaped[name] for name in self.columns))]


def _column(column: pa.Array) -> tuple[list, list, int]:
    """(cells as they render, the same JSON-escaped, a bound on the characters of each: for text, the bytes
    of all of them). Few pyarrow calls: each lets another thread take the GIL, and waits to get it back."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        if column.null_count:
            column = pc.fill_null(column, "")   # (a null cell renders as "")
        cells = column.to_pylist()
        escaped = cells
        marks = pc.match_substring_regex(column, _ESCAPED)
        if marks.true_count:
            escaped = list(cells)
            for i in pc.indices_nonzero(marks).to_pylist():
                escaped[i] = _STRING(cells[i])[1:-1]
        return cells, escaped, _text_bytes(column)
    cells = [_cell(v) for v in column.to_pylist()]
    return cells, [_escaped(c) for c in cells], max(map(len, cells), default=0)


def _text_bytes(column: pa.Array) -> int:
    """The bytes of a text column's cells, from its offsets (no pyarrow call)."""
    if not len(column):
        return 0
    width = 8 if pa.types.is_large_string(column.type) else 4
    offsets = memoryview(column.buffers()[1])[column.offset * width:(column.offset + len(column) + 1) * width]
    return int.from_bytes(offsets[-width:], "little") - int.from_bytes(offsets[:width], "little")
