"""Issue #17, attacked: what makes a row rendered again differ from its plan without the input changing, a
mismatch in the middle of sending, and rows asked for out of order over a long input."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

import batchrun
from batchrun.store import Store
from tests.test_bodies import KEY, planned, spec_for, table_rows

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


# ---- what a render reads besides the input ----------------------------------------------------------
def test_an_image_file_edited_or_gone_after_the_plan_sends_the_image_that_was_planned(emu, tmp_path):
    """An image cell names a file beside the input: the file is no part of the input's fingerprint, so a
    render of it again could differ from the plan with the job the same (run again, the same job, refused
    again: stuck). The plan keeps the body of such a row; it is sent as planned."""
    pics = tmp_path / "pics"
    pics.mkdir()
    for n in range(6):
        (pics / f"p{n}.png").write_bytes(PNG + bytes([n]))
    inp = tmp_path / "rows.csv"
    inp.write_text("ticket_id,photo,body\n" + "".join(f"T-{n},pics/p{n}.png,pic {n}\n" for n in range(6))
                   + "T-6,,no picture\n", encoding="utf-8")
    spec = spec_for(inp, tmp_path, image_column="photo", batch_size=3, prompt="{{ body }}")
    planned(spec, emu).close()
    (pics / "p4.png").write_bytes(PNG + b"edited")
    (pics / "p5.png").unlink()
    result = batchrun.run(spec, api_key=KEY, base_url=emu.base_url)
    assert result.exit_code == 0 and result.counts == {"succeeded": 7}
    with Store(str(tmp_path / "s.sqlite")) as s:
        sent = [params for _, _, params in s.params()]
    assert [m["messages"][0]["content"][0]["source"]["data"] for m in sent[:6]] == \
        [__import__("base64").b64encode(PNG + bytes([n])).decode() for n in range(6)]
    # only the rows that read a file keep their body
    assert table_rows(tmp_path / "s.sqlite", "SELECT count(*) FROM bodies") == [(6,)]
    assert pq.read_table(tmp_path / "o.parquet").num_rows == 7


def test_a_template_that_draws_at_random_sends_what_was_planned(emu, tmp_path, tickets_csv):
    """`|random` and `lipsum()` draw anew at each render: a render again never matches its plan. Such a
    template's bodies are kept by the plan (as before issue #17) and sent as planned."""
    for prompt in ("{{ ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j']|random }} {{ body }}",
                   "{{ lipsum(1) }} {{ body }}"):
        spec = spec_for(tickets_csv, tmp_path, prompt=prompt, limit=40, state=str(tmp_path / f"{len(prompt)}.sqlite"))
        result = batchrun.run(spec, api_key=KEY, base_url=emu.base_url)
        assert result.exit_code == 0 and result.counts == {"succeeded": 40}, prompt
        assert table_rows(spec.state, "SELECT count(*) FROM bodies") == [(40,)]


# ---- a mismatch while sending ---------------------------------------------------------------------------
def test_messages_mode_stopped_by_a_changed_row_keeps_every_reply_on_the_wire(emu, tmp_path, monkeypatch):
    """A row of a later page no longer renders as planned while the first page's requests are on the wire:
    the run stops sending, but the requests already sent are waited for and recorded (cancelled, their
    rows stayed pending and the next run paid for them again). One error line, exit code 2, claims released."""
    from batchrun.errors import ExitCode, InputError
    from tests.conftest import make_tickets
    from tests.test_bodies import write_tickets
    import batchrun.messages
    monkeypatch.setattr(batchrun.messages, "PAGE", 50)   # pages of 50 rows: the third holds the edited row
    inp = tmp_path / "t.csv"
    rows = make_tickets(140)
    write_tickets(inp, rows)
    spec = spec_for(inp, tmp_path, mode="messages", concurrency=16)
    runner = planned(spec, emu)
    emu.config.latency = 0.3
    edited = [dict(r) for r in rows]
    edited[110]["body"] = "an edited ticket"
    write_tickets(inp, edited)
    try:
        with runner.locked(), pytest.raises(InputError, match="row 111 no longer makes") as exc:
            runner.step()
        assert exc.value.exit_code == ExitCode.BAD_INPUT and "\n" not in str(exc.value)
        counts = runner.store.counts(runner.job.id)
        assert counts.get("succeeded", 0) >= 100 - 32 and counts["succeeded"] + counts["pending"] == 140
        assert table_rows(spec.state, "SELECT count(*) FROM requests WHERE claimed_at IS NOT NULL") == [(0,)]
        billed = sum(emu.stats.billed.values())
        assert billed == counts["succeeded"]          # every request sent has its reply recorded
    finally:
        runner.close()
    write_tickets(inp, rows)                          # the input as planned: the same job, the rest sent
    emu.config.latency = 0
    result = batchrun.run(spec, api_key=KEY, base_url=emu.base_url)
    assert result.exit_code == 0 and result.counts == {"succeeded": 140}
    assert max(emu.stats.billed.values()) == 1


def test_a_template_reading_the_time_zone_or_the_clock_sends_what_was_planned(emu, tmp_path, monkeypatch):
    """A naive time's `.timestamp()` reads the machine's time zone: planned under one TZ, run again by a cron
    job under another, every row rendered anew differed from its plan (the same job, refused each run);
    `created.now()` reads the clock. Their bodies are kept by the plan and sent as planned."""
    import time
    inp = tmp_path / "t.csv"
    inp.write_text("ticket_id,at,body\n" + "".join(f"T-{i},2024-01-0{i + 1} 10:00:00,b{i}\n" for i in range(5)))
    for k, prompt in enumerate(("{{ body }} {{ at.timestamp() }}", "{{ body }}: {{ (at.now() - at).seconds > -1 }}")):
        spec = spec_for(inp, tmp_path, prompt=prompt, state=str(tmp_path / f"{k}.sqlite"))
        monkeypatch.setenv("TZ", "UTC")
        time.tzset()
        try:
            planned(spec, emu).close()
            monkeypatch.setenv("TZ", "Asia/Tokyo")
            time.tzset()
            result = batchrun.run(spec, api_key=KEY, base_url=emu.base_url)
        finally:
            monkeypatch.delenv("TZ")
            time.tzset()
        assert result.exit_code == 0 and result.counts == {"succeeded": 5}, prompt
        assert table_rows(spec.state, "SELECT count(*) FROM bodies") == [(5,)]


def test_a_plain_template_keeps_no_body():
    from batchrun.templates import PromptTemplate
    for prompt in ("{{ body }}", "{% if a %}{{ a|upper }}{% endif %} {{ row|tojson }}", "{{ at.year }} {{ at|string }}"):
        assert not PromptTemplate(prompt).varies, prompt
    for prompt in ("{{ xs|random }}", "{{ xs|map('random')|join }}", "{{ lipsum(1) }}", "{{ at.today() }}",
                   "{{ at['timestamp']() }}", "{{ at|attr('astimezone') }}"):
        assert PromptTemplate(prompt).varies, prompt


# ---- kills while rows are rendered again -------------------------------------------------------------
@pytest.mark.parametrize("mode,failpoint", [("batch", "render:3"), ("messages", "render:1")])
def test_killed_while_rendering_again_then_run_again_sends_each_row_once(emu, tmp_path, tickets_csv, mode, failpoint):
    """Killed while a chunk is rendered again (batch mode: the third chunk, made ahead while the second batch
    uploads, its intent recorded, its create maybe landed; messages mode: its page claimed, nothing sent): the
    next run sends every row once."""
    import signal
    from tests.test_reliability import args, assert_complete, spawn
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    argv = args(tickets_csv, out, state, "--mode", mode)
    p = spawn(emu, argv, failpoint=failpoint)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert emu.stats.batches_created in ((1, 2) if mode == "batch" else (0,)) and emu.stats.messages_calls == 0
    p = spawn(emu, argv)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    if mode == "batch":
        assert_complete(out, tickets_csv, emu)
        assert max(emu.stats.submitted_custom_ids.values()) == 1
    else:
        assert pq.read_table(out).column("status").to_pylist() == ["succeeded"] * 450
        assert emu.stats.messages_calls == 450 and max(emu.stats.billed.values()) == 1


# ---- a job planned without bodies, through the commands that read them -----------------------------------
def test_estimated_then_errored_rows_retried_within_a_budget_then_canceled_and_resumed(emu, cli, tmp_path,
                                                                                       tickets_csv):
    """Estimate, run with rows ending errored here and there, --retry-errored within --max-cost (their maximum
    read from bodies rendered again, scattered over the input), cancel with a batch in flight, then
    --resume-canceled: every row ends succeeded, each errored row sent twice and every other once."""
    import json
    from collections import Counter
    from batchrun.errors import ExitCode
    from tests.conftest import row_id
    from tests.test_reliability import args
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    est = json.loads(cli("estimate", *args(tickets_csv, out, state)[1:], "--json").output)
    assert est["requests"] == 450
    emu.config.errored_rate, emu.config.errored_types = 0.1, ("invalid_request_error",)
    r = cli(*args(tickets_csv, out, state))
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    errored = {row["ticket_id"] for row in pq.read_table(out).to_pylist() if row["status"] == "errored"}
    assert 10 < len(errored) < 100
    emu.config.errored_rate = 0
    emu.config.processing_seconds = 60
    r = cli(*args(tickets_csv, out, state, "--retry-errored", "--max-cost", "5", "--no-wait"))
    assert r.exit_code == ExitCode.IN_PROGRESS, r.output
    r = cli("cancel", *args(tickets_csv, out, state)[1:])
    assert r.exit_code == 0, r.output
    emu.config.processing_seconds = 0.05
    r = cli(*args(tickets_csv, out, state, "--resume-canceled", "--max-cost", "5"))
    assert r.exit_code == 0, r.output
    assert {row["status"] for row in pq.read_table(out).to_pylist()} == {"succeeded"}
    sends = Counter(row_id(cid) for items in emu.stats.accepted.values() for cid, _ in items)
    assert {cid for cid, n in sends.items() if n == 3} == errored     # errored, retried and canceled, resumed
    assert set(sends.values()) == {1, 3} and len(sends) == 450


def test_a_template_making_a_set_sends_what_was_planned_under_another_hash_seed(emu, tmp_path, tickets_csv,
                                                                               monkeypatch):
    """`row.keys() - [...]` is a set: its order is the process's hash seed, so a row rendered again by another
    process (a cron run) differed from its plan, the same job refused each run. A render that makes a set
    keeps its body."""
    from tests.test_reliability import args, spawn
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    argv = [a if a != "Summarise this support ticket from {{ customer }}:\n{{ body }}" else
            "{{ (row.keys() - ['priority'])|join(',') }}: {{ body }}" for a in args(tickets_csv, out, state)]
    for step, seed in (("estimate", "1"), ("run", "2")):
        monkeypatch.setenv("PYTHONHASHSEED", seed)
        p = spawn(emu, [step, *argv[1:]])
        _, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr
    assert pq.read_table(out).column("status").to_pylist() == ["succeeded"] * 450
    assert table_rows(state, "SELECT count(*) FROM bodies") == [(450,)]


def test_rows_whose_result_never_came_are_sent_again_with_resend_lost(emu, cli, tmp_path, tickets_csv):
    """Result lines missing here and there (rows scattered over the input, rendered again): --resend-lost
    sends those rows, and only those, again."""
    from collections import Counter
    from batchrun.errors import ExitCode
    from tests.conftest import row_id
    from tests.test_reliability import args
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    emu.config.missing_result_lines = 2
    r = cli(*args(tickets_csv, out, state))
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    lost = {row["ticket_id"] for row in pq.read_table(out).to_pylist() if row["status"] != "succeeded"}
    assert len(lost) == 2 * 5                                    # two lines of each of the five batches
    emu.config.missing_result_lines = 0
    r = cli(*args(tickets_csv, out, state, "--resend-lost"))
    assert r.exit_code == 0, r.output
    sends = Counter(row_id(cid) for items in emu.stats.accepted.values() for cid, _ in items)
    assert {cid for cid, n in sends.items() if n == 2} == lost and set(sends.values()) == {1, 2}


# ---- memory ---------------------------------------------------------------------------------------------
def test_retry_errored_sums_the_maximum_of_its_rows_without_holding_their_bodies(emu, tmp_path, monkeypatch):
    """Every row errored (a gateway's wrong key, say), then --retry-errored within a budget: the most they may
    cost is summed as their bodies are rendered, not over a list of every body (1M rows: ~0.5 GB).
    On a small scale: 8,000 rows, the input read 128 KB and rows rendered 256 at a time (the product's 1 MB and
    2,048 rows are sized for millions), measured after a first pass has loaded what any first call loads."""
    import tracemalloc

    import batchrun.bodies as bodies_mod
    from batchrun.inputs import InputSource
    from tests.conftest import make_tickets
    from tests.test_bodies import write_tickets
    monkeypatch.setattr(bodies_mod, "_GROUP", 256)
    monkeypatch.setattr(bodies_mod, "InputSource", lambda *a, **kw: InputSource(*a, block_size=1 << 17, **kw))
    inp = tmp_path / "t.csv"
    write_tickets(inp, make_tickets(8_000))
    spec = spec_for(inp, tmp_path, max_cost=1000.0)
    runner = planned(spec, emu)

    def all_errored():
        runner.store.conn.execute("UPDATE requests SET state = 'errored', error_type = 'api_error'")
        runner.store.conn.commit()
    try:
        chars = table_rows(spec.state, "SELECT sum(chars) FROM requests")[0][0]
        runner.retry_errored = True
        for measured in (False, True):   # the first pass loads modules and templates once, unmeasured
            all_errored()
            if measured:
                tracemalloc.start()
            try:
                with runner.locked():
                    runner.planner.retry_errored()
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        assert runner.store.counts(runner.job.id) == {"pending": 8_000}
        assert peak < chars / 2, (peak, chars)   # (a block of the input at a time: ~0.5 MB whatever the rows)
    finally:
        runner.close()
