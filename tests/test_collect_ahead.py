"""Collecting (issue #17): the next batch's retrieve and results download begin while a batch's results
are recorded — the requests in the order they always went out, nothing left running after an error — and
a results file read line by line at "\\n" only."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

import batchrun
from batchrun import collector
from batchrun.api import Client, jsonl_values
from batchrun.errors import TransientApiError
from batchrun.prefetch import Prefetch
from batchrun.store import Store

KEY = "sk-ant-test-0123456789"


# ---- the results file, line by line ---------------------------------------------------------------
def values(pieces):
    got = []
    try:
        for value in jsonl_values(iter(pieces)):
            got.append(value)
    except TransientApiError:
        got.append("cut short")
    return got


def test_lines_split_across_pieces_blank_lines_and_crlf():
    assert values(['{"a":1}\n{"b"', ':2}\r\n', '\n  \n', ' [1] \n', '{"c"', ':', '3}']) == \
        [{"a": 1}, {"b": 2}, [1], {"c": 3}]


def test_a_line_is_what_ends_at_a_newline_only():
    # U+2028, U+2029 and NEL are line breaks to str.splitlines (and httpx's iter_lines), not to
    # JSONL: a reply text holding one, unescaped, is one line
    text = "a\u2028b\u2029c\x85d"
    line = '{"custom_id":"r1","result":{"type":"succeeded","message":{"content":[{"type":"text","text":"%s"}]}}}'
    assert values([line % text + "\n"])[0]["result"]["message"]["content"][0]["text"] == text


@pytest.mark.parametrize("bad", ['{"a":1', '{"a":1} x', "1,2", '\ufeff{"a":1}', '{"a":"no end'])
def test_a_line_that_is_not_one_json_value_is_a_download_cut_short(bad):
    assert values(['{"ok":1}\n', bad + "\n", '{"never":1}\n']) == [{"ok": 1}, "cut short"]
    assert values(['{"ok":1}\n' + bad]) == [{"ok": 1}, "cut short"]   # the last line, without its "\n"


def test_the_client_reads_a_results_file_with_a_line_separator_in_a_text():
    body = ('{"custom_id":"a","result":{"type":"expired"}}\n'
            '{"custom_id":"b","result":{"type":"succeeded","message":{"content":[{"type":"text","text":"x\u2028y"}]}}}\n')

    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body.encode("utf-8"))

    client = Client(api_key=KEY, base_url="https://api.example", transport=httpx.MockTransport(server))
    lines = list(client.iter_results("https://api.example/v1/messages/batches/b1/results"))
    assert [line["custom_id"] for line in lines] == ["a", "b"]
    assert lines[1]["result"]["message"]["content"][0]["text"] == "x\u2028y"


# ---- the prefetch, started at once -----------------------------------------------------------------
def test_a_prefetch_never_consumed_stops_when_closed_and_closes_its_source():
    closed = threading.Event()

    def source():
        try:
            yield from range(10**9)
        finally:
            closed.set()

    ahead = Prefetch(source(), depth=2, chunk=3)   # running from now on, nobody taking its items
    ahead.close()
    assert closed.wait(5), "the source was not closed"


# ---- the next batch downloaded while one is recorded -----------------------------------------------
class Logged(httpx.BaseTransport):
    """The real transport, each request noted (method, last two parts of the path) as it goes out."""

    def __init__(self, log: list):
        self.log = log
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.rstrip("/").split("/")
        self.log.append((request.method, parts[-1] if parts[-1] == "results" else "batch", parts[-2]
                         if parts[-1] == "results" else parts[-1]))
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def no_prefetch_left() -> bool:
    """No download thread still running (within a few seconds: a stopped one ends at its next put)."""
    deadline = time.monotonic() + 5
    while any(t.name == "batchrun-prefetch" for t in threading.enumerate()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def job_spec(tmp_path, n=40, batch_size=10):
    data = tmp_path / "in.csv"
    data.write_text("id,msg\n" + "".join(f"r{i},text {i}\n" for i in range(n)))
    return dict(input=str(data), output=str(tmp_path / "out.parquet"), state=str(tmp_path / "s.sqlite"),
                id_column="id", prompt="Say {{ msg }}", batch_size=batch_size, poll_interval=0.05)


@pytest.fixture
def noted(monkeypatch):
    """Batches closed (Store.finalize_batch) and look-aheads begun, by local batch id, in one log."""
    log: list = []
    real_finalize, real_ahead = Store.finalize_batch, collector._Ahead.__init__

    def finalize_batch(self, local):
        log.append(("collected", local))
        return real_finalize(self, local)

    def ahead(self, batch, source):
        log.append(("ahead", batch))
        real_ahead(self, batch, source)

    monkeypatch.setattr(Store, "finalize_batch", finalize_batch)
    monkeypatch.setattr(collector._Ahead, "__init__", ahead)
    return log


@pytest.mark.parametrize("polled", [False, True], ids=["submitted", "ended"])
def test_the_next_batch_is_retrieved_and_downloaded_while_one_is_recorded_in_the_same_order(
        emu, tmp_path, noted, polled):
    requests: list = []
    with batchrun.Job(job_spec(tmp_path), transport=Logged(requests)) as job:
        assert job.submit() == 4
        time.sleep(0.2)   # every batch ended (processing_seconds 0.05)
        if polled:        # known to have ended: collected without a retrieve
            assert job.poll()
        del requests[:]
        result = job.collect()
    assert result.finished and result.exit_code == 0
    # the requests as they always went out: each batch retrieved (unless known to have ended), then its
    # results downloaded, in turn
    api_ids = list(dict.fromkeys(api_id for _, _, api_id in requests))
    assert len(api_ids) == 4
    each = ("results",) if polled else ("batch", "results")
    assert requests == [("GET", what, api_id) for api_id in api_ids for what in each]
    # each next batch's retrieve and download begun before the one before it was closed
    assert noted == [("ahead", 2), ("collected", 1), ("ahead", 3), ("collected", 2), ("ahead", 4), ("collected", 3),
                     ("collected", 4)]
    assert no_prefetch_left()


def test_an_error_while_recording_leaves_no_download_running(emu, tmp_path, monkeypatch):
    real = Store.record_results
    calls = []

    def record_results(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:   # the second batch's results: the third batch's download has begun by now
            raise OSError("disk I/O error (injected)")
        return real(self, *a, **kw)

    monkeypatch.setattr(Store, "record_results", record_results)
    with batchrun.Job(job_spec(tmp_path), transport=httpx.HTTPTransport()) as job:
        job.submit()
        time.sleep(0.2)
        with pytest.raises(Exception, match="disk I/O error"):
            job.collect()
    assert no_prefetch_left()
    with Store(str(tmp_path / "s.sqlite")) as store:   # the first batch collected, the rest still to collect
        states = [b["state"] for b in store.q("SELECT state FROM batches ORDER BY id")]
    assert states == ["collected", "ended", "submitted", "submitted"]   # (the third's retrieve not recorded)


def test_a_next_batch_the_api_no_longer_knows_is_lost_as_before(emu, tmp_path, noted):
    """The look-ahead's retrieve answered 404: raised where the poll would have retrieved it itself."""
    with batchrun.Job(job_spec(tmp_path), transport=httpx.HTTPTransport()) as job:
        assert job.submit() == 4
        time.sleep(0.2)
        with Store(str(tmp_path / "s.sqlite")) as store:
            gone = store.q("SELECT api_id FROM batches WHERE id = 2")[0]["api_id"]
        httpx.delete(f"{emu.base_url}/v1/messages/batches/{gone}",
                     headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"}).raise_for_status()
        result = job.collect()
    assert result.finished and result.exit_code == 3   # the lost batch's rows end errored
    with Store(str(tmp_path / "s.sqlite")) as store:
        states = [b["state"] for b in store.q("SELECT state FROM batches ORDER BY id")]
        errors = {r["error_type"] for r in store.q("SELECT error_type FROM requests WHERE batch_id = 2")}
    assert states == ["collected", "lost", "collected", "collected"]
    assert errors == {"batch_not_found"}
    # found lost by the look-ahead's retrieve; the next batch then retrieved by the poll itself
    assert noted == [("ahead", 2), ("collected", 1), ("ahead", 4), ("collected", 3), ("collected", 4)]
    assert no_prefetch_left()
