"""`validate`: everything `run` checks before sending, and a look at the first requests."""
from __future__ import annotations

import json
from typing import Optional

from .errors import InputError
from .inputs import ColumnTypeConflict, InputSource
from .models import check_params, load_catalog
from .output import check_column_names
from .requests import RequestBuilder, custom_id_for
from .spec import JobSpec


def validate_job(spec: JobSpec, *, show: int = 2, allow_unknown_model: bool = False) -> dict:
    """Read the whole input and render every row; return rows, warnings and the first requests."""
    from .runner import Job, warnings_for
    job = Job(spec, allow_unknown_model=allow_unknown_model)
    job.close()
    column_types: dict = {}
    while True:
        try:
            return _scan(spec, job, column_types, show, warnings_for)
        except ColumnTypeConflict as c:
            import pyarrow as pa
            column_types[c.column] = pa.string()


def _scan(spec, job, column_types, show, warnings_for) -> dict:
    source = InputSource(spec.input, column_types=dict(column_types), limit=spec.limit)
    builder = None
    renamed: list = []
    seen: dict = {}
    shown = []
    index = 0
    for batch in source.batches():
        if builder is None:
            if spec.id_column and spec.id_column not in batch.schema.names:
                raise InputError(f"id_column: column {spec.id_column!r} is not in {spec.input}")
            builder = RequestBuilder(spec, job.model, batch.schema.names, input_name=spec.input)
            renamed = check_column_names(batch.schema.names, builder.schema)
        ids = batch.column(spec.id_column).to_pylist() if spec.id_column else None
        rows = batch.select(builder.needed_columns).to_pylist() if builder.needed_columns else [{}] * batch.num_rows
        for i, row in enumerate(rows):
            n = index + i
            if ids is not None:
                if ids[i] is None or (isinstance(ids[i], str) and not ids[i].strip()):
                    raise InputError(f"{spec.input}: row {n + 1}: id column {spec.id_column!r} is empty")
                cid = custom_id_for(ids[i])
            else:
                cid = f"row-{n}"
            if cid in seen:
                raise InputError(f"{spec.input}: duplicate id {ids[i] if ids else cid!r} in column "
                                 f"{spec.id_column!r} (rows {seen[cid] + 1} and {n + 1})")
            seen[cid] = n
            params = builder.build(row, f"row {n + 1}")
            if n == 0 and job.model is not None:
                problems = check_params(job.model, params, spec.api_version)
                if problems:
                    raise InputError(problems[0])
            if len(shown) < show:
                shown.append({"custom_id": cid, "params": params})
        index += batch.num_rows
    if index == 0:
        raise InputError(f"{spec.input}: input is empty (no rows)")
    return {"rows": index, "job_id": job.id, "requests": shown,
            "warnings": renamed + warnings_for(spec, job.model, builder)}
