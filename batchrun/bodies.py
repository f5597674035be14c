"""Request bodies: the one place that gives the body of a planned request.

A job's plan renders and checks every row and stores each request's identity — custom_id, row_index,
params_hash — and the small figures the estimate and the budget read, but not its body: the input, whose
fingerprint the job recorded, holds it, and a body stored for every row made the state file larger than
the input (benchmarks/README.md). Whatever needs bodies (a batch's chunk, messages mode's claimed rows,
the estimate, --retry-errored's maximum, the budget of a batch sent before the job had one,
Store.params) asks the store for the rows, in row order, and a BodySource for their bodies:

* a row whose body is stored (a state file planned before this, see migrations.m003_bodies_apart, or a
  row the plan could not count on rendering alike again: RequestBuilder.keeps_body — an image read from
  a file, a template that draws at random, reads the clock or the time zone, or makes a set) gives that
  body, and the input is not read;
* any other row is rendered again from the input, read as the plan read it (the same source options
  and pinned column types), in one streaming pass for rows asked in row order (a row before the last one
  read starts the pass again), and its render is checked against the params_hash the plan stored before
  it is given out: a mismatch means the input changed since the plan, and nothing is sent (InputError,
  one line, exit code 2).

Memory stays bounded: rows are rendered a block of the input at a time, as they are asked for.

The run that plans a job renders its first rows (a batch's worth, at most FIRST_CHARS) already: it keeps
those bodies (`FirstBodies`) and its BodySource gives them as they are, without reading the input again,
while the input file is untouched since the plan checked its fingerprint (its size, modification time
and inode: an input edited since is read and checked as above, and stops the run) and the row's stored
hash is still the one the plan made of that body. They are dropped once rows past them are asked for.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

from . import failpoints
from .errors import InputError
from .fingerprint import file_identity
from .inputs import ColumnTypeConflict, InputSource
from .prefetch import prefetched
from .requests import RequestBuilder, canonical_json, params_hasher, shared_params_hash
from .spec import JobSpec

# a planned row as the store gives it to a BodySource: (row_index, custom_id, params_hash, stored body or None)
PlannedRow = tuple
_GROUP = 2048   # rows rendered at a time when a long run of rows is asked for (bounded memory)
FIRST_CHARS = 16 << 20   # characters of bodies a plan keeps for its run's first chunk (FirstBodies)


def row_figures(spec: JobSpec, body: str, part: dict) -> tuple[int, Optional[int]]:
    """What the plan stores of a row's body besides its hash: its length in characters (the estimate
    extrapolates tokens from it) and its own max_tokens (max_tokens_column; None: the job's)."""
    return len(body), (part.get("max_tokens") if spec.max_tokens_column else None)


def input_for(spec: JobSpec, pins: dict) -> InputSource:
    """The job's input, read as its plan read it: the same rows (limit, shard) and pinned column types
    (`pins`: InputSource.pins as the plan stored them; {} before it is planned)."""
    source = InputSource(spec.input, limit=spec.limit, shard=spec.shard_pair, shard_key=spec.id_column)
    source.pin(pins)
    return source


def input_stamp(source: InputSource) -> Optional[tuple]:
    """What changes when a local input file is written (fingerprint.file_identity; None for a directory or a
    remote URI: the plan keeps no body for those, see FirstBodies)."""
    if source.is_dir or "://" in source.uri:
        return None
    try:
        return file_identity(source.path)
    except OSError:
        return None


@dataclass
class FirstBodies:
    """The bodies of a job's first rows as the plan of this run rendered them: row_index -> (body, its
    params_hash), for the first `rows` rows within FIRST_CHARS characters (rows whose body is stored
    left out); `stamp`: input_stamp of the input taken before the plan checked its fingerprint."""
    rows: int
    bodies: dict = field(default_factory=dict)
    stamp: Optional[tuple] = None
    chars: int = 0
    last: int = -1

    def add(self, index: int, bodies: list, records: list) -> None:
        """A planned block's bodies (from row `index`) and their records (Planner._plan_rows'), while room."""
        for i, (body, record) in enumerate(zip(bodies, records)):
            if index + i >= self.rows or self.chars + len(body) > FIRST_CHARS:
                self.rows = 0   # full: later blocks add nothing
                return
            if len(record) < 7 or record[6] is None:   # (a body the plan stores is given as stored)
                self.bodies[index + i] = (body, record[3])
                self.chars += len(body)
                self.last = index + i


@dataclass
class Rendering:
    """What rendering a job's rows again takes: its spec, its input as planned (see `input_for`), the
    job's shared_params_hash (each render is checked against its row's stored hash with it), and the
    builder that renders a row as the plan did (None: made from the input's columns when first needed)."""
    spec: JobSpec
    source: InputSource
    shared_hash: str
    builder: Optional[RequestBuilder] = None
    hasher: Optional[Callable[[str], str]] = None   # params_hash with shared_hash (made when first needed)


class BodySource:
    """The bodies (row parts: requests.full_body splices the shared part in) of one job's planned rows.

    `rendering()` is asked once, when a row without a stored body is first asked for: a job whose
    bodies are all stored never reads its input (nor needs its spec to load).
    """

    def __init__(self, job_id: str, rendering: Callable[[], Rendering], first: Optional[FirstBodies] = None):
        self.job_id = job_id
        self._rendering = rendering
        self._first = first if first is not None and first.bodies and first.stamp is not None else None
        self._how: Optional[Rendering] = None
        self._blocks: Optional[Iterator] = None   # the pass under way: (batch, text) blocks of the input
        self._start = self._end = 0               # the rows [start, end) of the block in hand
        self._block: Optional[tuple] = None
        self.passes = 0                           # passes over the input started (tests and benchmarks)
        self.rendered = 0                         # rows rendered again (or by this run's plan: FirstBodies)
        self.from_plan = 0                        # of them, the bodies the plan of this run kept

    @classmethod
    def of_stored_job(cls, job: dict, spec: Optional[JobSpec] = None, first: Optional[FirstBodies] = None
                      ) -> "BodySource":
        """The body source of a job from its row in the state file (its stored spec, column types, shared
        params and endpoint). `spec`: the job's spec as a run of it has it, whose input path is read (a
        job's input may move: its fingerprint is its identity), with the stored spec's cache_ttl (a job
        taken over from the other mode was rendered with that mode's; see Store.rekey_job)."""
        def rendering() -> Rendering:
            raw = json.loads(job["spec"])
            raw.pop("headers", None)   # (stored by name only; no part of a body)
            stored = JobSpec.from_mapping(raw)
            how = stored if spec is None else dataclasses.replace(spec, cache_ttl=stored.cache_ttl)
            shared = shared_params_hash(job["shared_params"] or "{}", job["endpoint"] or None, how.api_version)
            return Rendering(how, input_for(how, json.loads(job["column_types"] or "{}")), shared)
        return cls(job["id"], rendering, first)

    @property
    def how(self) -> Rendering:
        if self._how is None:
            self._how = self._rendering()
        return self._how

    def close(self) -> None:
        """End the pass under way (its reading thread and file)."""
        if self._blocks is not None:
            self._blocks.close()
        self._blocks, self._block, self._start, self._end = None, None, 0, 0

    # ---- the bodies of planned rows -----------------------------------------------------------------
    def bodies(self, rows: Iterable[PlannedRow]) -> Iterator[tuple[int, str, str]]:
        """(row_index, custom_id, body) of each planned row, in the order given (row order: one pass), as
        the rows are iterated: its stored body, or its render checked against its stored hash."""
        it = iter(rows)
        while True:
            group = list(itertools.islice(it, _GROUP))
            if not group:
                return
            missing = [row for row in group if row[3] is None]
            known = self._planned(missing) if self._first is not None and missing else {}
            if known:
                missing = [row for row in missing if row[0] not in known]
            rendered = dict(zip((row[0] for row in missing), self._render(missing))) if missing else {}
            rendered.update(known)
            for row in group:
                yield row[0], row[1], row[3] if row[3] is not None else rendered[row[0]]

    def body_list(self, rows: Iterable[PlannedRow]) -> list[str]:
        """The bodies of `rows` (see `bodies`), in a list."""
        return [body for _, _, body in self.bodies(rows)]

    def _planned(self, rows: list) -> dict:
        """row_index -> body of the `rows` (in row order, none stored) that the plan of this run kept."""
        first = self._first
        if first.stamp != input_stamp(self.how.source):   # the input written since the plan read it
            self._first = None
            return {}
        known = {}
        for row in rows:
            kept = first.bodies.get(row[0])
            if kept is not None and kept[1] == row[2]:   # (the stored hash still the one made of it)
                known[row[0]] = kept[0]
        if rows[-1][0] >= first.last:   # asked past them: the run has moved on
            self._first = None
        self.rendered += len(known)
        self.from_plan += len(known)
        return known

    def _render(self, rows: list) -> Iterator[str]:
        """The bodies of rows without a stored one (in row order), rendered from the input and checked."""
        k = 0
        while k < len(rows):
            start, batch, text = self._block_of(rows[k][0])
            end = start + batch.num_rows
            j = k
            while j < len(rows) and start <= rows[j][0] < end:   # (at least row k: the block holds it)
                j += 1
            picked = [row[0] - start for row in rows[k:j]]
            if picked == list(range(picked[0], picked[0] + len(picked))):   # a run of rows: a slice, no copy
                batch, text = batch.slice(picked[0], len(picked)), text.slice(picked[0], len(picked))
            else:
                batch, text = batch.take(picked), text.take(picked)
            builder = self._builder(batch.schema)
            hash_ = self._hasher()
            failpoints.hit("render")   # (tests: a kill while rows are rendered again, inside a send's transaction)
            bodies = builder.plain_bodies(text)   # a plain template's rows at once (plain.py)
            if bodies is None:
                bodies = self._one_by_one(builder, batch, text, rows[k:j])
            for row, body in zip(rows[k:j], bodies):
                if hash_(body) != row[2]:
                    raise self._changed(row[0])
                self.rendered += 1
                yield body
            k = j

    def _one_by_one(self, builder: RequestBuilder, batch, text, rows: list) -> Iterator[str]:
        """The bodies of a block's `rows` (what _render picked of it), rendered a row at a time."""
        try:
            cells = builder.rows(batch, text)
        except InputError as exc:
            raise self._changed(rows[0][0], str(exc)) from None
        for row, cell in zip(rows, cells):
            try:
                yield canonical_json(builder.row_part(cell, f"row {row[0] + 1}"))
            except InputError as exc:
                raise self._changed(row[0], str(exc)) from None

    def _hasher(self) -> Callable[[str], str]:
        how = self.how
        if how.hasher is None:
            how.hasher = params_hasher(how.shared_hash)
        return how.hasher

    def _block_of(self, index: int) -> tuple:
        """(first row, batch, text) of the input block that holds row `index`; a pass starts again from
        the first block when `index` is before the block in hand."""
        if self._blocks is None or index < self._start:
            self.close()
            self._blocks = prefetched(self._read(self.how.source))
            self.passes += 1
        while index >= self._end:
            try:
                batch, text = next(self._blocks)
            except StopIteration:
                self.close()
                raise self._changed(index, "the input has fewer rows than were planned") from None
            self._start, self._end = self._end, self._end + batch.num_rows
            self._block = (batch, text)
        return (self._start, *self._block)

    def _read(self, source: InputSource) -> Iterator[tuple]:
        try:
            yield from source.batches_with_text()
        except ColumnTypeConflict:   # a column no longer holds the type the plan pinned
            raise self._changed(self._end, "its cells no longer read as the plan read them") from None

    def _builder(self, schema) -> RequestBuilder:
        how = self.how
        if how.builder is None:   # (the model shapes only the shared part, never a row's)
            how.builder = RequestBuilder(how.spec, None, schema.names, input_name=how.spec.input)
        return how.builder

    def _changed(self, index: int, why: Optional[str] = None) -> InputError:
        return InputError(
            f"{self.how.spec.input} changed since job {self.job_id[:12]} was planned: row {index + 1} no longer makes "
            f"the request that was planned{f' ({why})' if why else ''}; nothing sent from here on (what this job sent "
            "before stays sent, and is collected). Run the same command "
            "again: the changed input is a new job, whose unchanged requests reuse the replies already paid for")
