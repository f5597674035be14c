"""`batchrun report` (the HTML page and the numbers behind it) and the progress display of `run`."""
from __future__ import annotations

import csv
import io
import json
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from html.parser import HTMLParser

import pytest

from batchrun.cli.common import ProgressPrinter
from batchrun.errors import ExitCode
from batchrun.report import MAX_FAILED_ROWS, build_report_data, render_report, write_report
from batchrun.runner import Progress
from batchrun.status import find_job
from batchrun.store import Store, now_iso

MODEL = "claude-haiku-4-5"


# ---- helpers -------------------------------------------------------------------------------------
class Tags(HTMLParser):
    """Every start tag with its attributes, and the rows of the failed-rows table."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.stack: list[str] = []
        self.in_failed = False
        self.failed_rows = 0
        self.failed_cells: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table" and a.get("id") == "failed-rows":
            self.in_failed = True
        if self.in_failed and tag == "tr" and "tbody" in self.stack:
            self.failed_rows += 1
            self.failed_cells.append([])
        if self.in_failed and tag == "td":
            self._cell = []
        self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag == "table":
            self.in_failed = False
        if tag == "td" and self._cell is not None:
            self.failed_cells[-1].append("".join(self._cell).strip())
            self._cell = None
        while self.stack:
            if self.stack.pop() == tag:
                break

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def names(self) -> Counter:
        return Counter(t for t, _ in self.tags)


def parse(html: str) -> Tags:
    p = Tags()
    p.feed(html)
    p.close()
    return p


def assert_self_contained(html: str, tags: Tags) -> None:
    assert "<script src" not in html.lower()
    assert not [t for t, _ in tags.tags if t in ("link", "iframe", "img", "object", "embed")]
    for tag, attrs in tags.tags:
        for name, value in attrs.items():
            v = (value or "").strip().lower()
            assert not v.startswith(("http:", "https:", "//")), (tag, name, value)
            assert "url(" not in v, (tag, name, value)
    assert "http://" not in html and "https://" not in html
    assert "@import" not in html


def png_pixels(path) -> tuple[int, int, bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def write_csv(path, n: int) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        for i in range(n):
            w.writerow([f"r{i:03d}", f"review {i}: {'great' if i % 3 else 'awful'} <b>&amp; \"quoted\""])


@pytest.fixture
def label_state(emu, cli, tmp_path):
    """A finished label job of 90 rows in 3 batches; about a fifth of the rows errored (one attempt)."""
    emu.config.errored_rate = 0.2
    inp, out, state = tmp_path / "x.csv", tmp_path / "o.parquet", tmp_path / "s.sqlite"
    write_csv(inp, 90)
    result = cli("run", "--input", inp, "--output", out, "--state", state, "--id-column", "id",
                 "--prompt", "{{ text }}", "--labels", "positive,negative,neutral", "--model", MODEL,
                 "--max-tokens", 50, "--poll-interval", 0.1, "--max-attempts", 1, "--batch-size", 30,
                 "--name", "reviews <b>")
    assert result.exit_code in (ExitCode.OK, ExitCode.FAILED_ROWS), result.output
    return state, result


def hand_state(path, *, spec: dict, rows: list[dict], batches: list[dict] = (), name="hand", model=MODEL) -> dict:
    """A state file written directly: one job, its requests and batches."""
    store = Store(str(path))
    jid = "ab" * 32
    full = {"input": "in.csv", "output": "out.parquet", "prompt": "{{ x }}", "model": model, "mode": "batch",
            "cache_ttl": "5m", "max_tokens": 100, **spec}
    with store.transaction() as c:
        c.execute("INSERT INTO jobs (id, name, spec, input, output, input_fingerprint, mode, model, rows, created_at, "
                  "planned_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (jid, name, json.dumps(full), "in.csv", "out.parquet", "fp", full["mode"], model, len(rows),
                   now_iso(), now_iso() if rows else None))
        for b in batches:
            c.execute("INSERT INTO batches (id, job_id, api_id, state, request_count, intent_at, created_at, ended_at) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (b["id"], jid, b.get("api_id"), b.get("state", "collected"), b.get("requests", 1),
                       b.get("created_at") or now_iso(), b.get("created_at"), b.get("ended_at")))
        for i, r in enumerate(rows):
            c.execute("INSERT INTO bodies (id, body) VALUES (?, '{}')", (i + 1,))
            c.execute("INSERT INTO requests (job_id, custom_id, row_index, params_hash, body_id, state, attempts, "
                      "parsed, input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens, "
                      "cost_usd, error_type, error_message, batch_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                      (jid, r.get("custom_id", f"row-{i}"), i, f"h{i}", i + 1, r.get("state", "succeeded"),
                       r.get("attempts", 1), json.dumps(r["parsed"]) if "parsed" in r else None,
                       r.get("input_tokens"), r.get("output_tokens"), r.get("cache_write"), r.get("cache_read"),
                       r.get("cost_usd"), r.get("error_type"), r.get("error_message"), r.get("batch_id")))
    return store


# ---- the numbers ---------------------------------------------------------------------------------
def test_report_data_matches_the_state(label_state):
    state, _ = label_state
    with Store(str(state)) as store:
        job = find_job(store, None)
        data = build_report_data(store, job)
        counts = store.counts(job["id"])
        reqs = store.q("SELECT * FROM requests WHERE job_id = ?", (job["id"],))
        batches = store.q("SELECT * FROM batches WHERE job_id = ?", (job["id"],))

    assert data["job"]["rows"] == 90 and data["job"]["status"] == "finished" and data["job"]["model"] == MODEL
    assert {s: n for s, n in data["counts"].items() if n} == counts
    assert sum(data["counts"].values()) == 90
    failed = [r for r in reqs if r["state"] not in ("succeeded", "pending", "in_flight")]
    assert failed, "errored_rate 0.2 with one attempt: some rows must fail"
    assert data["failed"]["total"] == len(failed) and len(data["failed"]["rows"]) == len(failed)
    assert data["failed"]["more"] == 0
    assert [r["custom_id"] for r in data["failed"]["rows"]] == sorted(r["custom_id"] for r in failed)

    paid = [r for r in reqs if r["state"] in ("succeeded", "invalid_output")]
    assert data["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in paid), rel=1e-9)
    assert data["cost_usd"] > 0
    kinds = data["cost_by_kind"]
    assert set(kinds) == {"input", "output", "cache_write", "cache_read"}
    assert sum(kinds.values()) == pytest.approx(data["cost_usd"], rel=1e-9)
    assert data["tokens"]["input"] == sum(r["input_tokens"] for r in paid)
    assert data["tokens"]["output"] == sum(r["output_tokens"] for r in paid)

    hist = data["output_tokens"]
    assert hist["rows"] == len(paid) == sum(b["rows"] for b in hist["bins"])
    assert hist["min"] == min(r["output_tokens"] for r in paid)
    assert hist["max"] == max(r["output_tokens"] for r in paid)
    for b in hist["bins"]:
        assert b["rows"] == sum(1 for r in paid if b["low"] <= r["output_tokens"] <= b["high"])

    assert len(data["batches"]) == len(batches) == 3
    for b in data["batches"]:
        assert b["api_id"].startswith("msgbatch_") and b["requests"] == 30
        assert b["seconds"] is not None and b["seconds"] >= 0 and not b["running"]

    (label,) = data["labels"]
    assert label["property"] == "label"
    expected = Counter(json.loads(r["parsed"])["label"] for r in reqs if r["state"] == "succeeded")
    assert {k: n for k, n in label["counts"].items() if n} == dict(expected)
    assert set(label["counts"]) == {"positive", "negative", "neutral"}   # every allowed value, even unused
    assert label["rows"] == counts["succeeded"]
    json.dumps(data)  # plain data


def test_report_of_a_job_not_yet_run(tmp_path):
    """Planned but nothing sent (and a job with no rows at all): zeros, no crash, every chart drawn."""
    store = hand_state(tmp_path / "s.sqlite", spec={"labels": ["a", "b"]},
                       rows=[{"state": "pending", "attempts": 0} for _ in range(5)])
    job = find_job(store, None)
    data = build_report_data(store, job)
    assert data["counts"]["pending"] == 5 and data["job"]["status"] == "planned"
    assert data["cost_usd"] == 0 and data["cost_by_kind"] == {k: 0.0 for k in data["cost_by_kind"]}
    assert data["output_tokens"]["rows"] == 0 and data["output_tokens"]["bins"] == []
    assert data["batches"] == [] and data["failed"] == {"total": 0, "rows": [], "more": 0}
    assert data["labels"][0]["counts"] == {"a": 0, "b": 0}
    tags = parse(render_report(data))
    assert tags.names()["svg"] >= 4

    empty = hand_state(tmp_path / "e.sqlite", spec={}, rows=[])
    data = build_report_data(empty, find_job(empty, None))
    assert data["job"]["rows"] == 0 and data["labels"] == [] and data["job"]["status"] == "not planned"
    assert parse(render_report(data)).names()["svg"] >= 4


def test_schema_job_values_unpriced_model_and_running_batch(tmp_path):
    schema = {"type": "object", "properties": {
        "category": {"type": "string", "enum": ["bug", "billing", "other"]},
        "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
        "needs_human": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "summary": {"type": "string"},
        "score": {"type": "number"},
    }}
    parsed = [{"category": c, "urgency": u, "needs_human": h, "tags": t, "summary": f"text {i}", "score": 0.5}
              for i, (c, u, h, t) in enumerate([("bug", 5, True, ["crash", "ios"]), ("bug", 3, False, ["crash"]),
                                                ("billing", 3, False, []), ("bug", 1, True, ["ios"])] * 5)]
    rows = [{"parsed": p, "input_tokens": 10, "output_tokens": 3, "batch_id": 1} for p in parsed]
    rows.append({"state": "invalid_output", "error_type": "invalid_output", "error_message": "bad", "output_tokens": 7,
                 "input_tokens": 10, "batch_id": 1})
    store = hand_state(tmp_path / "s.sqlite", spec={"output_schema": schema}, rows=rows, model="some-future-model",
                       batches=[{"id": 1, "api_id": "msgbatch_1", "state": "submitted",
                                 "created_at": "2026-01-01T00:00:00.000Z", "requests": 21},
                                {"id": 2, "state": "abandoned", "requests": 21}])
    data = build_report_data(store, find_job(store, None))
    by = {p["property"]: p for p in data["labels"]}
    assert set(by) == {"category", "urgency", "needs_human", "tags", "summary"}   # not the number
    assert by["category"]["counts"] == {"bug": 15, "billing": 5, "other": 0}
    assert list(by["urgency"]["counts"]) == ["1", "2", "3", "4", "5"]              # numeric order
    assert by["urgency"]["counts"] == {"1": 5, "2": 0, "3": 10, "4": 0, "5": 5}
    assert by["needs_human"]["counts"] == {"true": 10, "false": 10}
    assert by["tags"]["counts"] == {"crash": 10, "ios": 10, "(none)": 5}
    assert by["summary"]["free_text"] and by["summary"]["values"] == []
    assert data["cost_by_kind"] is None and data["cost_usd"] is None or data["cost_usd"] == 0
    (b,) = data["batches"]
    assert b["running"] and b["seconds"] > 0
    html = render_report(data)
    tags = parse(html)
    assert tags.names()["svg"] >= 4 + 4          # a chart per counted property, not the free text
    assert "Free text" in html and "unpriced" in html
    assert tags.failed_rows == 1


def test_failed_rows_capped_and_everything_escaped(tmp_path):
    evil = '<script>alert("x")</script><img src=https://evil.example/x.png onerror=alert(1)>'
    rows = [{"state": "errored", "error_type": "api_error", "error_message": f"{evil} #{i}", "attempts": 3,
             "custom_id": f'id-{i}"><b>'} for i in range(MAX_FAILED_ROWS + 37)]
    rows += [{"parsed": {"label": evil}, "input_tokens": 1, "output_tokens": 1, "cost_usd": 0.0}]
    store = hand_state(tmp_path / "s.sqlite", spec={"labels": ["ok", evil]}, rows=rows, name=evil,
                       batches=[{"id": 1, "api_id": evil, "created_at": "2026-01-01T00:00:00Z",
                                 "ended_at": "2026-01-01T00:10:00Z"}])
    path = tmp_path / "r.html"
    write_report(store, find_job(store, None), str(path))
    html = path.read_text(encoding="utf-8")
    tags = parse(html)
    assert "script" not in tags.names() and "img" not in tags.names() and "b" not in tags.names()
    assert evil in "".join(tags.text)                        # shown as text, not markup
    assert tags.failed_rows == MAX_FAILED_ROWS
    assert tags.failed_cells[0][0] == 'id-0"><b>' and tags.failed_cells[0][4] == "3"
    assert "37 more failed rows" in html
    assert not any(v and "evil.example" in v for _, a in tags.tags for v in a.values() if a)


# ---- the command and the page --------------------------------------------------------------------
def test_report_command_writes_a_self_contained_page(label_state, cli, tmp_path):
    state, _ = label_state
    out = tmp_path / "report" / "r.html"
    result = cli("report", "--state", state, "--html", out)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stderr
    html = out.read_text(encoding="utf-8")
    tags = parse(html)
    assert tags.names()["svg"] >= 4
    assert_self_contained(html, tags)
    with Store(str(state)) as store:
        job = find_job(store, None)
        failed = store.q("SELECT custom_id, state, error_type, error_message, attempts FROM requests "
                         "WHERE job_id = ? AND state NOT IN ('succeeded', 'pending', 'in_flight') ORDER BY row_index",
                         (job["id"],))
    assert tags.failed_rows == len(failed) > 0
    assert tags.failed_cells == [[r["custom_id"], r["state"], r["error_type"], r["error_message"], str(r["attempts"])]
                                 for r in failed]
    assert "reviews &lt;b&gt;" in html                       # the job's name, escaped

    # by name and by id prefix, the same page
    assert cli("report", "reviews <b>", "--state", state, "--html", tmp_path / "a.html").exit_code == 0
    assert cli("report", job["id"][:8], "--state", state, "--html", tmp_path / "b.html").exit_code == 0

    if shutil.which("chromium"):
        png = tmp_path / "r.png"
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                        "--window-size=1200,2000", out.resolve().as_uri()], check=True, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        width, height, pixels = png_pixels(png)
        assert (width, height) == (1200, 2000)
        assert png.stat().st_size > 20_000
        assert len(set(pixels)) > 50                          # not a blank page


def test_report_command_errors(cli, tmp_path, label_state):
    state, _ = label_state
    missing = cli("report", "--state", tmp_path / "nope.sqlite", "--html", tmp_path / "r.html")
    assert missing.exit_code == ExitCode.BAD_INPUT and "does not exist" in missing.stderr
    nojob = cli("report", "zzzz", "--state", state, "--html", tmp_path / "r.html")
    assert nojob.exit_code == ExitCode.BAD_INPUT and "no job" in nojob.stderr
    assert not (tmp_path / "r.html").exists()


# ---- progress ------------------------------------------------------------------------------------
def test_run_prints_plain_progress_lines_when_not_a_terminal(label_state):
    _, result = label_state
    lines = [l for l in result.stderr.splitlines() if l.startswith("progress: ")]
    assert lines, result.stderr
    assert lines[-1].startswith("progress: 90/90 rows done (")
    assert "\x1b[" not in result.stderr                      # no live display, no escape codes


def progress(done: int, failed: int = 0, in_flight: int = 0, total: int = 100, elapsed: float = 1.0,
             cost=0.01) -> Progress:
    counts = {"succeeded": done - failed, "errored": failed, "in_flight": in_flight,
              "pending": total - done - in_flight}
    return Progress(job_id="j", total=total, counts=counts, batches_in_flight=1 if in_flight else 0,
                    batches_total=2, cost_usd=cost, elapsed=elapsed)


def test_live_progress_on_a_terminal():
    from rich.console import Console
    buf = io.StringIO()
    printer = ProgressPrinter(console=Console(file=buf, force_terminal=True, width=120, color_system=None))
    assert printer.live
    printer(progress(0, in_flight=60, elapsed=0.0))
    printer(progress(40, failed=3, in_flight=20, elapsed=20.0))
    printer(progress(100, failed=5, elapsed=30.0, cost=None))
    printer.close()
    printer.close()                                          # twice is fine
    out = buf.getvalue()
    assert "100/100 rows" in out and "100 submitted" in out and "5 failed" in out
    assert "2 created" in out and "unknown" in out and "$0.0100" in out
    assert "ETA 30s" in out                                  # 40 rows in 20 s, 60 to go
    assert "progress:" not in out


def test_plain_progress_format_and_eta_from_this_run(capsys):
    printer = ProgressPrinter(live=False)
    printer(progress(50, elapsed=0.0))                       # 50 rows finished by an earlier run
    printer(progress(60, failed=2, in_flight=10, elapsed=10.0))
    printer.close()
    printer.close()
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("progress: 50/100 rows done (0 failed), 0 in flight in 0 batches (2 created), $0.0100, "
                      "0s elapsed")
    # the pace is this run's: 10 rows in 10 s, 40 left
    assert err[1] == ("progress: 60/100 rows done (2 failed), 10 in flight in 1 batches (2 created), $0.0100, "
                      "10s elapsed, ETA 40s")
