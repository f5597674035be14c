"""The schema of the state file, as the migrations that made it: each applied once, in order, and
recorded by name (see core.StoreCore._migrate)."""
from __future__ import annotations

import json
import sqlite3
from typing import Callable, Optional

from ..spec import DEFAULT_API_VERSION
from .bodies import NOT_STORED

# (each migration gets the connection, inside the transaction that records it; not sqlite-utils,
# which imports pandas: ~0.3 s of start-up for `batchrun status`)
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = []


def migration(fn: Callable[[sqlite3.Connection], None]) -> Callable[[sqlite3.Connection], None]:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite3.Connection) -> None:
    _script(db, """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        name TEXT,
        spec TEXT NOT NULL,
        input TEXT NOT NULL,
        output TEXT NOT NULL,
        input_fingerprint TEXT NOT NULL,
        column_types TEXT,
        mode TEXT NOT NULL,
        model TEXT NOT NULL,
        rows INTEGER,
        created_at TEXT NOT NULL,
        planned_at TEXT,
        finished_at TEXT,
        output_written_at TEXT,
        canceled_at TEXT
    );
    CREATE TABLE requests (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        custom_id TEXT NOT NULL,
        row_index INTEGER NOT NULL,
        params_hash TEXT NOT NULL,
        body TEXT NOT NULL,
        max_cost REAL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        batch_id INTEGER,
        result_type TEXT,
        text TEXT,
        parsed TEXT,
        stop_reason TEXT,
        model TEXT,
        input_tokens INTEGER,
        output_tokens INTEGER,
        cache_creation_input_tokens INTEGER,
        cache_read_input_tokens INTEGER,
        cost_usd REAL,
        error_type TEXT,
        error_message TEXT,
        api_batch_id TEXT,
        reused_from TEXT,
        finished_at TEXT,
        PRIMARY KEY (job_id, custom_id)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX requests_row ON requests(job_id, row_index);
    CREATE INDEX requests_batch ON requests(batch_id);
    CREATE INDEX requests_params ON requests(params_hash);
    CREATE TABLE batches (
        id INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(id),
        api_id TEXT UNIQUE,
        state TEXT NOT NULL,
        api_status TEXT,
        request_count INTEGER NOT NULL,
        body_bytes INTEGER,
        max_cost REAL,
        intent_at TEXT NOT NULL,
        created_at TEXT,
        ended_at TEXT,
        collected_at TEXT,
        adopted INTEGER NOT NULL DEFAULT 0,
        request_counts TEXT,
        results_url TEXT,
        downloads INTEGER NOT NULL DEFAULT 0,
        note TEXT
    );
    CREATE INDEX batches_job ON batches(job_id, state);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        job_id TEXT,
        at TEXT NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL
    );
    """)


@migration
def m002_shared_params(db: sqlite3.Connection) -> None:
    """Requests store only their own part; the part every request shares is kept once per job."""
    db.execute("ALTER TABLE jobs ADD COLUMN shared_params TEXT")


_REQUEST_COLUMNS = (
    "job_id, custom_id, row_index, params_hash, max_cost, state, attempts, batch_id, result_type, text, parsed, "
    "stop_reason, model, input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens, "
    "cost_usd, error_type, error_message, api_batch_id, reused_from, finished_at")


@migration
def m003_bodies_apart(db: sqlite3.Connection) -> None:
    """Request bodies move to their own table, written once and never rewritten.

    In one table with the request's state, every state change and every recorded result rewrote the
    whole record, body included (a 100k-row job wrote its bodies to disk six times over). Now the
    requests table holds small rows that change; `bodies` holds the large ones that do not.
    """
    order = "row_number() OVER (ORDER BY job_id, row_index)"
    script = f"""
    CREATE TABLE bodies (id INTEGER PRIMARY KEY, body TEXT NOT NULL);
    INSERT INTO bodies (id, body) SELECT {order}, body FROM requests;
    CREATE TABLE requests_v3 (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        custom_id TEXT NOT NULL,
        row_index INTEGER NOT NULL,
        params_hash TEXT NOT NULL,
        body_id INTEGER NOT NULL,
        max_cost REAL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        batch_id INTEGER,
        result_type TEXT,
        text TEXT,
        parsed TEXT,
        stop_reason TEXT,
        model TEXT,
        input_tokens INTEGER,
        output_tokens INTEGER,
        cache_creation_input_tokens INTEGER,
        cache_read_input_tokens INTEGER,
        cost_usd REAL,
        error_type TEXT,
        error_message TEXT,
        api_batch_id TEXT,
        reused_from TEXT,
        finished_at TEXT,
        PRIMARY KEY (job_id, custom_id)
    ) WITHOUT ROWID;
    INSERT INTO requests_v3 (body_id, {_REQUEST_COLUMNS}) SELECT {order}, {_REQUEST_COLUMNS} FROM requests;
    DROP TABLE requests;
    ALTER TABLE requests_v3 RENAME TO requests;
    CREATE UNIQUE INDEX requests_row ON requests(job_id, row_index);
    CREATE INDEX requests_batch ON requests(batch_id);
    CREATE INDEX requests_params ON requests(params_hash);
    """
    _script(db, script)


def _script(db: sqlite3.Connection, script: str) -> None:
    """Run statements one by one inside the migration's transaction (executescript would commit it
    half-way, and a second process creating the same state file could then see half a schema)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


@migration
def m004_endpoints(db: sqlite3.Connection) -> None:
    """The endpoint a job is sent to ("" for the Anthropic API; NULL: planned before this was kept), and
    when a batch's create failed ambiguously in a run (its batch may still appear in the list)."""
    db.execute("ALTER TABLE jobs ADD COLUMN endpoint TEXT")
    db.execute("ALTER TABLE batches ADD COLUMN ambiguous_at TEXT")


@migration
def m005_answer_scope(db: sqlite3.Connection) -> None:
    """The API version became part of a request's identity (`requests.answer_scope`): the requests of
    jobs planned under another version than the default are hashed again, so that one is never
    answered from another version's replies while the jobs of one version still share theirs."""
    for job_id, spec, endpoint, shared in db.execute(
            "SELECT id, spec, endpoint, shared_params FROM jobs WHERE shared_params IS NOT NULL").fetchall():
        version = json.loads(spec).get("api_version") or DEFAULT_API_VERSION
        if version != DEFAULT_API_VERSION:
            _rehash(db, job_id, shared, endpoint or None, version)


def _rehash(conn: sqlite3.Connection, job_id: str, shared_params: str, endpoint: Optional[str],
            api_version: str) -> None:
    """Hash a job's requests again within (endpoint, API version), as planning would hash them now. Only
    rows whose body is stored (a job planned before m011_bodies_rendered: the only jobs this is done for,
    being jobs of an older version's keys and scopes)."""
    from ..requests import params_hash, shared_params_hash
    conn.create_function("batchrun_params_hash", 2, params_hash, deterministic=True)
    conn.execute("UPDATE requests SET params_hash = batchrun_params_hash((SELECT body FROM bodies WHERE "
                 f"bodies.id = requests.body_id), ?) WHERE job_id = ? AND body_id != {NOT_STORED}",
                 (shared_params_hash(shared_params, endpoint, api_version), job_id))


@migration
def m006_job_tags(db: sqlite3.Connection) -> None:
    """Never pay twice, never take another job's batch:
    - `jobs.tag`: a short random tag of the job, sent in every custom_id of its batches (`<tag>-<id>`), so
      a batch whose create reply was lost is proved to be this job's by its results (NULL: planned
      before tags; one is given at its next submit);
    - `batches.tag`: the tag the batch's custom_ids were sent with (NULL: sent as planned, untagged);
    - `batches.short_downloads`: whole downloads of its results in a row that lacked rows and brought
      none of them (a result line that never arrives ends `result_missing` after a few);
    - `foreign_batches`: batches a lost create's search found and proved not to be that intent's
      (another job's, or another batch of this job), never looked at again for it."""
    db.execute("ALTER TABLE jobs ADD COLUMN tag TEXT")
    db.execute("ALTER TABLE batches ADD COLUMN tag TEXT")
    db.execute("ALTER TABLE batches ADD COLUMN short_downloads INTEGER NOT NULL DEFAULT 0")
    db.execute("CREATE TABLE foreign_batches (api_id TEXT NOT NULL, batch_id INTEGER NOT NULL, "
               "noted_at TEXT NOT NULL, PRIMARY KEY (api_id, batch_id))")


@migration
def m007_free_sends(db: sqlite3.Connection) -> None:
    """Per request, how many of its sends came back with an error that was the service's, not the
    request's (errors.error_class): those never count against max_attempts."""
    db.execute("ALTER TABLE requests ADD COLUMN free_sends INTEGER NOT NULL DEFAULT 0")


@migration
def m008_cache_primers(db: sqlite3.Connection) -> None:
    """Which batches were sent alone to prime the prompt cache before the rest of their job."""
    db.execute("ALTER TABLE batches ADD COLUMN primer INTEGER NOT NULL DEFAULT 0")


@migration
def m009_message_claims(db: sqlite3.Connection) -> None:
    """`requests.claimed_at`: when a messages-mode run claimed the pending row to send it (NULL once that
    run is over). Chosen and claimed in one write-locked transaction, so that another job of the state
    file sharing the request, started at the same moment, sees it taken and waits for its answer
    instead of buying it too (see Store.claim_for_messages)."""
    db.execute("ALTER TABLE requests ADD COLUMN claimed_at TEXT")
    db.execute("CREATE INDEX requests_claimed ON requests(job_id) WHERE claimed_at IS NOT NULL")


@migration
def m010_cache_write_split(db: sqlite3.Connection) -> None:
    """`requests.cache_creation_5m_input_tokens` / `cache_creation_1h_input_tokens`: a reply's cache writes
    by lifetime, as its usage split them (`usage.cache_creation`; NULL: not split, or recorded before this
    was kept: priced at the job's cache_ttl). The two are priced apart, so a job's cost by token kind is
    summed from the same figures as its rows' cost_usd (see models.Catalog.cost_by_kind)."""
    db.execute("ALTER TABLE requests ADD COLUMN cache_creation_5m_input_tokens INTEGER")
    db.execute("ALTER TABLE requests ADD COLUMN cache_creation_1h_input_tokens INTEGER")


@migration
def m011_bodies_rendered(db: sqlite3.Connection) -> None:
    """Request bodies are no longer stored: a row planned now has `body_id` NOT_STORED (0: no row of
    `bodies`) and its body is rendered again from the job's input when it is sent (batchrun/bodies.py:
    checked against its params_hash first). What the estimate and the budget read of a body is kept
    instead: `requests.chars`, the length of its row part in characters, and `requests.max_tokens`, its
    own max_tokens when the job takes it from a column (NULL: the job's). Rows planned before keep their
    stored bodies (these two NULL: read from the body)."""
    db.execute("ALTER TABLE requests ADD COLUMN chars INTEGER")
    db.execute("ALTER TABLE requests ADD COLUMN max_tokens INTEGER")


@migration
def m012_requests_rowid(db: sqlite3.Connection) -> None:
    """`requests` becomes an ordinary (rowid) table, its rows numbered in the order they are planned, with
    (job_id, custom_id) still its primary key (a unique index now).

    As a WITHOUT ROWID table its rows lived in the primary key's B-tree, and every index entry repeated
    that key (the job id and custom_id); a row grows from ~100 to ~450 bytes when its result is recorded,
    which such a table pays for more dearly. Measured at 100k rows (issue #17): planning, choosing a
    chunk, recording intents and results and reading the output each 10-40% cheaper. The rows are copied
    in (job_id, row_index) order; nothing else changes (the same columns, constraints, indexes and values)."""
    columns = ", ".join(r[1] for r in db.execute("PRAGMA table_info(requests)"))
    _script(db, f"""
    CREATE TABLE requests_v12 (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        custom_id TEXT NOT NULL,
        row_index INTEGER NOT NULL,
        params_hash TEXT NOT NULL,
        body_id INTEGER NOT NULL,
        max_cost REAL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        batch_id INTEGER,
        result_type TEXT,
        text TEXT,
        parsed TEXT,
        stop_reason TEXT,
        model TEXT,
        input_tokens INTEGER,
        output_tokens INTEGER,
        cache_creation_input_tokens INTEGER,
        cache_read_input_tokens INTEGER,
        cost_usd REAL,
        error_type TEXT,
        error_message TEXT,
        api_batch_id TEXT,
        reused_from TEXT,
        finished_at TEXT,
        free_sends INTEGER NOT NULL DEFAULT 0,
        claimed_at TEXT,
        cache_creation_5m_input_tokens INTEGER,
        cache_creation_1h_input_tokens INTEGER,
        chars INTEGER,
        max_tokens INTEGER,
        PRIMARY KEY (job_id, custom_id)
    );
    INSERT INTO requests_v12 ({columns}) SELECT {columns} FROM requests ORDER BY job_id, row_index;
    DROP TABLE requests;
    ALTER TABLE requests_v12 RENAME TO requests;
    CREATE UNIQUE INDEX requests_row ON requests(job_id, row_index);
    CREATE INDEX requests_batch ON requests(batch_id);
    CREATE INDEX requests_params ON requests(params_hash);
    CREATE INDEX requests_claimed ON requests(job_id) WHERE claimed_at IS NOT NULL
    """)
