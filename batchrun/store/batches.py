"""The SQL of batch mode (see batchrun/batches.py and batchrun/adoption.py): chunks chosen, intents,
batches created, adopted, abandoned or canceled, and the prompt cache's primers.

A batch row starts as an intent, committed (durably, in the transaction that chose its members) before
its create is sent; `mark_submitted` names it once the API did. Everything that may end an intent — the
create certainly made nothing (`abandon`, `drop_intent`), a row too large (`mark_too_large`), a lost
create whose batch is adopted, proved foreign, or cannot be told (`end_rows_gone`) — is a method here.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

from ..states import (ABANDONED, ANSWERED, CANCELED, COLLECTED, ENDED, ERRORED, FOREIGN, IN_FLIGHT, INTENT,
                      LIVE_BATCHES, PENDING, SUBMITTED, sql_list)
from .bodies import PLANNED_FROM, PLANNED_ROW
from .files import now_iso


@dataclass
class Batch:
    """A batch row: an intent (committed before its create was sent), or the local record of one Message
    Batch (see states.py for its states)."""
    id: int                       # local id
    job_id: str
    state: str
    request_count: int            # the rows it carries (sent, or about to be)
    intent_at: str                # when its intent was committed
    tag: Optional[str]            # the tag its custom_ids were sent with (None: sent untagged, by an older batchrun)
    api_id: Optional[str]         # the API's id (None: an intent)
    api_status: Optional[str]     # processing_status, as the API last told it
    request_counts: Optional[str]  # the API's counts of its results (JSON)
    results_url: Optional[str]
    ambiguous_at: Optional[str]   # when its create failed, or its run was found dead, without proof it made nothing
    adopted: int                  # 0, or context.ADOPTED / PROVEN: found after a lost create reply
    short_downloads: int          # whole downloads in a row that lacked rows (or came empty)

    @classmethod
    def of(cls, row: dict) -> "Batch":
        return cls(**{f.name: row[f.name] for f in dataclasses.fields(cls)})

    @property
    def results_expected(self) -> int:
        """The API's count of its results (0: not told)."""
        return sum((json.loads(self.request_counts or "null") or {}).values())


def taken_elsewhere(live: list, silent: Optional[list] = None) -> tuple[str, tuple]:
    """The paid-once rule, as an SQL condition on a row `r` (and its parameters): another job's row with
    the same exact request (params_hash) is answered — its answer is reused instead — or is being sent.

    Being sent: claimed in messages mode by a run that moves that job now (`live`: the jobs whose lock
    a run holds), or in flight in one of its batches. A row in flight counts in messages mode only when
    a run moves its job (`silent` None); batch mode waits for every other job's batches (a job nobody
    runs has its batches moved forward here) except the `silent` ones, whose batches cannot be moved
    from here (see BatchDriver.silent_twins): their rows are sent here.
    """
    live_marks = ",".join("?" * len(live))
    if silent is None:
        in_flight, args = f"o.job_id IN ({live_marks})", tuple(live)
    else:
        in_flight, args = f"o.job_id NOT IN ({','.join('?' * len(silent))})", tuple(silent)
    return ("EXISTS (SELECT 1 FROM requests o WHERE o.params_hash = r.params_hash AND o.job_id != r.job_id "
            f"AND o.reused_from IS NULL AND (o.state IN {sql_list(ANSWERED)} "
            f"OR (o.state = '{IN_FLIGHT}' AND {in_flight}) "
            f"OR (o.claimed_at IS NOT NULL AND o.job_id IN ({live_marks}))))", args + tuple(live))


class BatchQueries:
    # ---- choosing what to send -------------------------------------------------------------------
    def alone(self, job_id: str) -> bool:
        """True when this job is the only one in its state file (no answers to share, no twins)."""
        return self.one("SELECT count(*) AS n FROM jobs WHERE id != ?", (job_id,))["n"] == 0

    def canceled_at(self, job_id: str) -> Optional[str]:
        """When the job was canceled (None: it was not)."""
        return self.one("SELECT canceled_at FROM jobs WHERE id = ?", (job_id,))["canceled_at"]

    def twins_in_flight(self, job_id: str) -> list:
        """Other jobs of the state file that have one of this job's pending requests in flight."""
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT o.job_id FROM requests r JOIN requests o ON o.params_hash = r.params_hash "
            f"AND o.state = '{IN_FLIGHT}' AND o.job_id != r.job_id WHERE r.job_id = ? AND r.state = '{PENDING}'",
            (job_id,))]

    def pending_chunk(self, job_id: str, after: int, limit: int, silent: Optional[list]) -> list:
        """The next pending rows of the job (row_index > after, in input order, at most `limit`), as planned
        rows (store/bodies.py: PLANNED_ROW; their bodies from a BodySource). Asked inside the write
        transaction that records their intent (see BatchDriver.submit), so that no other job can send the
        same requests between the two.

        `silent` None: the job is alone in its state file. Otherwise rows another job has answered or is
        sending are left out (`taken_elsewhere`, batch mode: `silent` are the jobs whose in-flight rows
        do not count)."""
        sql = (f"SELECT {PLANNED_ROW} FROM {PLANNED_FROM} "
               f"WHERE r.job_id = ? AND r.state = '{PENDING}' AND r.row_index > ? {{taken}}"
               "ORDER BY r.row_index LIMIT ?")
        if silent is None:
            return self.conn.execute(sql.format(taken=""), (job_id, after, limit)).fetchall()
        taken, args = taken_elsewhere(self.live_others(job_id), silent)
        return self.conn.execute(sql.format(taken=f"AND NOT {taken} "), (job_id, after, *args, limit)).fetchall()

    # ---- intents and creates ---------------------------------------------------------------------
    def job_tag(self, job_id: str, new_tag: str) -> str:
        """The job's tag: `new_tag` if it had none yet (made once, at its first submit, and kept)."""
        with self.transaction():
            self.conn.execute("UPDATE jobs SET tag = ? WHERE id = ? AND tag IS NULL", (new_tag, job_id))
            return self.one("SELECT tag FROM jobs WHERE id = ?", (job_id,))["tag"]

    def record_intent(self, job_id: str, ids: list, nbytes: int, reserve: Optional[float], span: Optional[tuple],
                      tag: str) -> int:
        """Record what is about to be sent, before it is sent: a batch row (`intent`: its request count, size,
        reservation, the time and the tag its custom_ids carry), its rows in flight with one attempt more.
        Inside the (durable) transaction that chose the members (`pending_chunk`). `span`: (first, last)
        row_index when the members are every pending row in that range. Returns the batch's local id."""
        mark = (f"UPDATE requests SET state = '{IN_FLIGHT}', batch_id = ?, attempts = attempts + 1, "
                "result_type = NULL, api_batch_id = NULL ")
        local = self.conn.execute("INSERT INTO batches (job_id, state, request_count, body_bytes, intent_at, "
                                  f"max_cost, tag) VALUES (?, '{INTENT}', ?, ?, ?, ?, ?)",
                                  (job_id, len(ids), nbytes, now_iso(), reserve, tag)).lastrowid
        if span is not None:
            n = self.conn.execute(mark + f"WHERE job_id = ? AND row_index BETWEEN ? AND ? AND state = '{PENDING}'",
                                  (local, job_id, *span)).rowcount
            if n != len(ids):
                raise RuntimeError(f"batch intent marked {n} rows, expected {len(ids)}")  # rolls back
        else:
            self.conn.executemany(mark + f"WHERE job_id = ? AND custom_id = ? AND state = '{PENDING}'",
                                  [(local, job_id, cid) for cid in ids])
        return local

    def mark_primer(self, batch: int) -> None:
        """Record that this batch (an intent) primes its job's cache (in the intent's own transaction)."""
        self.conn.execute("UPDATE batches SET primer = 1 WHERE id = ?", (batch,))

    def mark_ambiguous(self, local: int, at: str) -> None:
        """The create of this intent failed, or its run died, without proof that no batch was made (at `at`)."""
        with self.transaction():
            self.conn.execute("UPDATE batches SET ambiguous_at = ? WHERE id = ?", (at, local))

    def mark_submitted(self, local: int, info: dict, adopted: int) -> None:
        """The API named the intent's batch (`info`: its create reply, or the batch adopted after a lost
        reply): the batch row carries its id, durably (its rows read it from there: files.api_batch_of)."""
        with self.transaction(durable=True):
            self.conn.execute(
                f"UPDATE batches SET api_id = ?, state = '{SUBMITTED}', api_status = ?, created_at = ?, "
                "request_counts = ?, adopted = ? WHERE id = ?",
                (info["id"], info.get("processing_status"), info.get("created_at"),
                 json.dumps(info.get("request_counts")), int(adopted), local))

    def batches_running(self, job_id: str) -> int:
        """The job's batches the API has and that are not collected yet (submitted or ended)."""
        return self.one("SELECT count(*) AS n FROM batches WHERE job_id = ? "
                        f"AND state IN {sql_list((SUBMITTED, ENDED))}", (job_id,))["n"]

    def batches_unended(self, job_id: str) -> int:
        """The job's batches not ended yet: intents and batches submitted."""
        return self.one("SELECT count(*) AS n FROM batches WHERE job_id = ? "
                        f"AND state IN {sql_list((INTENT, SUBMITTED))}", (job_id,))["n"]

    def mark_too_large(self, local: int, job_id: str, custom_id: str, message: str) -> None:
        """One request the API refuses as too large even alone: its intent abandoned, the row final,
        errored `request_too_large`, never sent again."""
        with self.transaction():
            self.conn.execute(f"UPDATE batches SET state = '{ABANDONED}', note = ? WHERE id = ?",
                              ("413 request_too_large for a single request", local))
            self.conn.execute(
                f"UPDATE requests SET state = '{ERRORED}', result_type = '{ERRORED}', "
                "error_type = 'request_too_large', error_message = ?, batch_id = NULL, cost_usd = 0.0, "
                "finished_at = ? WHERE job_id = ? AND custom_id = ?",
                (message, now_iso(), job_id, custom_id))

    def abandon(self, local: int, note: str, state: str = ABANDONED) -> None:
        """The batch of this intent does not exist (or is not ours): the batch row ends `state`, its rows
        are pending again, unpaid (their attempt given back)."""
        with self.transaction():
            self.conn.execute("UPDATE batches SET state = ?, note = ? WHERE id = ?", (state, note, local))
            self._unsent(local)

    def drop_intent(self, local: int) -> None:
        """A batch intent whose create certainly made no batch, dropped as if never made: its rows pending."""
        with self.transaction():
            self._unsent(local)
            self.conn.execute("DELETE FROM batches WHERE id = ?", (local,))

    def _unsent(self, local: int) -> None:
        """The rows intent `local` put in flight are pending again, as if never sent (their attempt given
        back). Inside the caller's transaction."""
        self.conn.execute(f"UPDATE requests SET state = '{PENDING}', batch_id = NULL, api_batch_id = NULL, "
                          f"attempts = max(attempts - 1, 0) WHERE batch_id = ? AND state = '{IN_FLIGHT}'", (local,))

    # ---- lost creates ----------------------------------------------------------------------------
    def intents(self, job_id: str) -> list:
        """Local ids of the job's intents: creates not answered yet (see Adoption.resolve_intent)."""
        return [r["id"] for r in self.q(f"SELECT id FROM batches WHERE job_id = ? AND state = '{INTENT}'", (job_id,))]

    def latest_api_id(self, job_id: str) -> Optional[str]:
        """The API's id of the job's latest batch (None: it never made one)."""
        row = self.one("SELECT api_id FROM batches WHERE job_id = ? AND api_id IS NOT NULL ORDER BY id DESC LIMIT 1",
                       (job_id,))
        return row["api_id"] if row else None

    def batch(self, local: int) -> Batch:
        """A batch row, by local id."""
        return Batch.of(self.one("SELECT * FROM batches WHERE id = ?", (local,)))

    def known_batches(self, local: int) -> set:
        """API ids that cannot be intent `local`'s batch: every batch of the state file, and the candidates
        already proved not its own."""
        return {r[0] for r in self.conn.execute("SELECT api_id FROM batches WHERE api_id IS NOT NULL UNION "
                                                "SELECT api_id FROM foreign_batches WHERE batch_id = ?", (local,))}

    def _insert_foreign(self, api_id: str, local: int) -> None:
        self.conn.execute("INSERT OR IGNORE INTO foreign_batches (api_id, batch_id, noted_at) VALUES (?, ?, ?)",
                          (api_id, local, now_iso()))

    def note_foreign(self, api_id: str, local: int) -> None:
        """Batch `api_id`, a candidate for intent `local`, is proved not its batch: never looked at again."""
        with self.transaction():
            self._insert_foreign(api_id, local)

    def unadopt(self, b: Batch, note: str) -> None:
        """Batch `b`, adopted (by an older batchrun, without proof) after a lost create, is proved not the
        intent's: noted foreign, and the batch row is an intent again, its batch looked for again."""
        with self.transaction():
            self._insert_foreign(b.api_id, b.id)
            self.conn.execute(
                f"UPDATE batches SET state = '{INTENT}', api_id = NULL, adopted = 0, api_status = NULL, "
                "created_at = NULL, request_counts = NULL, results_url = NULL, ended_at = NULL, note = ? "
                "WHERE id = ?", (note, b.id))
            self.conn.execute("UPDATE requests SET api_batch_id = NULL WHERE batch_id = ?", (b.id,))

    def wait_note(self, local: int, note: str) -> None:
        """What an unresolved intent waits for, kept on its batch row for `status` to show."""
        with self.transaction():
            self.conn.execute("UPDATE batches SET note = ? WHERE id = ? AND coalesce(note, '') != ?",
                              (note, local, note))

    def empty_again(self, local: int) -> int:
        """One more whole download of an empty results file for intent or batch `local`: how many so far
        after the first (batches.short_downloads, across runs, as collect counts a file that lacks lines)."""
        with self.transaction():
            self.conn.execute("UPDATE batches SET short_downloads = short_downloads + 1 WHERE id = ?", (local,))
        return self.one("SELECT short_downloads AS n FROM batches WHERE id = ?", (local,))["n"] - 1

    def member_ids(self, local: int, longer_than: int = 0) -> list:
        """The custom_ids of the rows batch (or intent) `local` carries (only those longer than `longer_than`)."""
        if not longer_than:
            return [r[0] for r in self.conn.execute("SELECT custom_id FROM requests WHERE batch_id = ?", (local,))]
        return [r[0] for r in self.conn.execute("SELECT custom_id FROM requests WHERE batch_id = ? "
                                                "AND length(custom_id) > ?", (local, longer_than))]

    def end_rows_gone(self, local: int, error_type: str, message: str, state: str, note: str) -> int:
        """The rows of a batch whose results cannot be had end errored (`error_type`, `message`), final until
        --resend-lost; the batch row ends `state` (collected: now) with `note`. Returns the rows so ended."""
        collected = ", collected_at = :now" if state == COLLECTED else ""
        with self.transaction():
            n = self.conn.execute(
                f"UPDATE requests SET state = '{ERRORED}', result_type = '{ERRORED}', error_type = :type, "
                f"error_message = :message, finished_at = :now WHERE batch_id = :id AND state = '{IN_FLIGHT}'",
                {"type": error_type, "message": message, "now": now_iso(), "id": local}).rowcount
            self.conn.execute(f"UPDATE batches SET state = :state{collected}, note = :note WHERE id = :id",
                              {"state": state, "note": note, "now": now_iso(), "id": local})
        return n

    # ---- cancel ----------------------------------------------------------------------------------
    def mark_canceled(self, job_id: str) -> None:
        """The job is canceled (since the first cancel): nothing more of it is sent."""
        with self.transaction():
            self.conn.execute("UPDATE jobs SET canceled_at = coalesce(canceled_at, ?) WHERE id = ?",
                              (now_iso(), job_id))

    def cancel_pending(self, job_id: str) -> int:
        """Rows of a canceled job that are waiting to be sent (or sent again) end canceled; how many."""
        with self.transaction():
            return self.conn.execute(
                f"UPDATE requests SET state = '{CANCELED}', result_type = '{CANCELED}', error_type = 'canceled', "
                "error_message = CASE WHEN attempts = 0 THEN 'canceled before it was sent' ELSE "
                "'canceled before it was sent again (attempt ' || attempts || ' ended ' || "
                "coalesce(error_type, result_type, 'without a result') || ')' END, cost_usd = 0.0, finished_at = ? "
                f"WHERE job_id = ? AND state = '{PENDING}'", (now_iso(), job_id)).rowcount

    def batches_to_cancel(self, job_id: str) -> list[Batch]:
        """The job's batches running at the API that no cancel has reached yet."""
        return [Batch.of(b) for b in self.q(f"SELECT * FROM batches WHERE job_id = ? AND state = '{SUBMITTED}' "
                      "AND coalesce(api_status, '') NOT IN ('canceling', 'ended') ORDER BY id", (job_id,))]

    def set_api_status(self, local: int, status: Optional[str]) -> None:
        """The batch's processing status, as the API last told it."""
        with self.transaction():
            self.conn.execute("UPDATE batches SET api_status = ? WHERE id = ?", (status, local))

    # ---- the prompt cache ------------------------------------------------------------------------
    def primer_requests(self, job_id: str) -> int:
        """Requests of the job's primer batches not collected yet (the rest of the job waits for them)."""
        return self.one("SELECT coalesce(sum(request_count), 0) AS n FROM batches WHERE job_id = ? AND primer = 1 "
                        f"AND state IN {sql_list(LIVE_BATCHES)}", (job_id,))["n"]

    def cache_history(self, job_id: str) -> dict:
        """What the job's batches tell about its prompt cache (see BatchDriver.priming):
        touched_at: the latest intent of a collected batch whose replies wrote or read the cache;
        recent: its latest batches (not abandoned), newest first, as (primer, collected, answered, touched)."""
        touched = ("EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = b.id AND "
                   "coalesce(r.cache_creation_input_tokens, 0) + coalesce(r.cache_read_input_tokens, 0) > 0)")
        answered = ("EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = b.id "
                    f"AND r.state IN {sql_list(ANSWERED)})")
        at = self.one(f"SELECT max(b.intent_at) AS at FROM batches b WHERE b.job_id = ? AND b.state = '{COLLECTED}' "
                      f"AND {touched}", (job_id,))["at"]
        recent = [(bool(r[0]), r[1] == COLLECTED, bool(r[2]), bool(r[3])) for r in self.conn.execute(
            f"SELECT b.primer, b.state, {answered}, {touched} FROM batches b WHERE b.job_id = ? "
            f"AND b.state NOT IN {sql_list((ABANDONED, FOREIGN))} ORDER BY b.id DESC LIMIT 5", (job_id,))]
        return {"touched_at": at, "recent": recent}
