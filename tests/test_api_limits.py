"""The API's limits and long failures: a full batch queue, a request too large even alone, results
that never download whole. The job waits where waiting can help, stops in bounded time where it
cannot, and never pays for a row twice."""
from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest

import batchrun
from batchrun.api import RetryPolicy
from batchrun.errors import ExitCode, GaveUpError
from batchrun.runner import Runner
from tests.conftest import PROMPT

KEY = "sk-ant-test-0123456789"


def spec(tickets_csv, tmp_path, **kw):
    return batchrun.JobSpec.from_mapping({"input": str(tickets_csv), "output": str(tmp_path / "o.parquet"),
                                          "state": str(tmp_path / "s.sqlite"), "id_column": "ticket_id",
                                          "prompt": PROMPT, "model": "claude-haiku-4-5", "max_tokens": 100,
                                          "batch_size": 100, "poll_interval": 0.05, **kw})


def run(emu, job, **kw):
    runner = Runner(job, api_key=KEY, base_url=emu.base_url, **kw)
    try:
        return runner.run()
    finally:
        runner.close()


def test_a_full_batch_queue_waits_for_the_batches_in_flight(emu, tmp_path, tickets_csv):
    """The organisation's queue takes 200 requests: creates past it are refused (429) until our own
    batches end; the job keeps polling them and sends the rest as the queue drains."""
    emu.config.max_queued_requests = 200
    emu.config.processing_seconds = 0.3
    result = run(emu, spec(tickets_csv, tmp_path))
    assert result.exit_code == 0 and result.counts == {"succeeded": 450}
    assert emu.stats.status_counts[429] > 0                       # it did run into the full queue
    assert emu.stats.batches_created == 5 and max(emu.stats.submitted_custom_ids.values()) == 1


def test_a_queue_that_never_takes_the_batch_stops_the_run_in_bounded_time(emu, tmp_path, tickets_csv):
    emu.config.max_queued_requests = 50                           # a batch of 100 never fits
    with pytest.raises(GaveUpError) as failure:
        run(emu, spec(tickets_csv, tmp_path), retry=RetryPolicy(max_retries=2, max_elapsed=2))
    assert "429" in str(failure.value) and failure.value.exit_code == ExitCode.API_ERROR
    assert emu.stats.batches_created == 0
    emu.config.max_queued_requests = None                          # the next run finishes the job
    result = run(emu, spec(tickets_csv, tmp_path))
    assert result.exit_code == 0 and result.counts == {"succeeded": 450}


def test_a_request_too_large_even_alone_ends_errored_and_the_rest_succeed(emu, tmp_path):
    """An endpoint (a gateway, say) whose body limit one request alone exceeds: batches are split down
    to that request, which ends errored (request_too_large) — sent once, not forever."""
    csv = tmp_path / "in.csv"
    csv.write_text("id,body\n" + "".join(f"r{i},short row {i}\n" for i in range(20)) + "big," + "x" * 6000 + "\n")
    emu.config.max_body_bytes = 4000
    job = batchrun.JobSpec.from_mapping({"input": str(csv), "output": str(tmp_path / "o.parquet"), "id_column": "id",
                                         "prompt": "{{ body }}", "model": "claude-haiku-4-5", "max_tokens": 50,
                                         "poll_interval": 0.05})
    result = run(emu, job)
    assert result.exit_code == ExitCode.FAILED_ROWS
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "o.parquet").to_pylist()}
    assert rows["big"]["status"] == "errored" and rows["big"]["error_type"] == "request_too_large"
    assert all(r["status"] == "succeeded" for k, r in rows.items() if k != "big")
    assert emu.stats.create_calls < 15 and max(emu.stats.submitted_custom_ids.values()) == 1


def test_results_that_never_come_whole_are_not_sent_again(emu, tmp_path, tickets_csv):
    """Every download is cut short: the rows without a result were paid for, so they are not sent again;
    the run stops (exit 4) with the results it got kept, and the next run downloads the rest."""
    emu.config.truncate_rate = 1.0
    job = spec(tickets_csv, tmp_path, max_attempts=2)
    with pytest.raises(GaveUpError) as failure:
        run(emu, job, sleep=lambda s: time.sleep(min(s, 0.01)))   # the waits between downloads, shortened
    assert "could not be downloaded whole" in str(failure.value)
    assert max(emu.stats.submitted_custom_ids.values()) == 1       # nothing sent twice
    emu.config.truncate_rate = 0.0
    result = run(emu, job)
    assert result.exit_code == 0 and result.counts == {"succeeded": 450}
    assert max(emu.stats.submitted_custom_ids.values()) == 1
    assert all(r["attempts"] == 1 for r in pq.read_table(tmp_path / "o.parquet").to_pylist())


def test_a_chunk_cut_short_sends_exactly_its_first_rows():
    """A budget that lets only the first rows of a chunk go gets a create body cut from the chunk's own (the
    request lines are not kept beside it): valid JSON holding exactly those rows, multi-byte text included."""
    import json as _json
    from batchrun.batches import Chunk
    rows = [(i, f"c{i}", "body", _json.dumps({"custom_id": f"t-c{i}", "params": {"x": "é€" * i}}, ensure_ascii=False))
            for i in range(6)]
    chunk = Chunk(rows)
    whole = _json.loads(chunk.payload)["requests"]
    assert [r["custom_id"] for r in whole] == [f"t-c{i}" for i in range(6)] and chunk.ids == [f"c{i}" for i in range(6)]
    for n in range(1, 7):
        assert _json.loads(chunk.payload_of(n)) == {"requests": whole[:n]}


def test_a_chunk_ends_at_the_first_row_that_does_not_fit(monkeypatch):
    """Rows after one that does not fit in the batch wait for the next batch, even those that would fit in the
    room left: the batch's ids (its intent) and its create body are the same first rows, in order — else a row
    would be marked in flight and never sent, and one sent without being marked (paid twice)."""
    import json as _json
    import batchrun.batches as batches
    monkeypatch.setattr(batches, "MAX_BATCH_BYTES", 300)
    lines = [_json.dumps({"custom_id": f"t-c{i}", "params": {"x": "y" * k}}) for i, k in enumerate((40, 40, 200, 1, 1))]
    chunk = batches.Chunk([(i, f"c{i}", "body", line) for i, line in enumerate(lines)])
    sent = [r["custom_id"] for r in _json.loads(chunk.payload)["requests"]]
    assert chunk.ids == ["c0", "c1"] and sent == ["t-c0", "t-c1"] and len(chunk.payload) <= 300
    assert [r["custom_id"] for r in _json.loads(chunk.payload_of(1))["requests"]] == ["t-c0"]
