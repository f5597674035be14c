"""`batchrun report` (the HTML page and the numbers behind it) and the progress display of `run`."""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from collections import Counter
from html import unescape as html_unescape
from html.parser import HTMLParser

import pytest

from batchrun.cli.common import ProgressPrinter
from batchrun.errors import ExitCode
from batchrun.report import MAX_FAILED_ROWS, build_report_data, render_report, write_report
from batchrun.runner import Progress
from batchrun.summary import find_job
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


class Charts(HTMLParser):
    """Every <svg class="chart"> by its aria-label: its bars (<rect> attributes and <title> text) and labels."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.charts: dict[str, dict] = {}
        self._svg: dict | None = None
        self._rect: dict | None = None
        self._title: list[str] | None = None
        self._text: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg" and "chart" in (a.get("class") or "").split():
            self._svg = self.charts.setdefault(a["aria-label"], {"rects": [], "texts": []})
        elif self._svg is not None and tag == "rect":
            self._rect = {**a, "title": ""}
            self._svg["rects"].append(self._rect)
        elif self._svg is not None and tag == "title" and self._rect is not None:
            self._title = []
        elif self._svg is not None and tag == "text":
            self._text = []

    def handle_endtag(self, tag):
        if tag == "svg":
            self._svg = None
        elif tag == "rect":
            self._rect = None
        elif tag == "title" and self._title is not None:
            self._rect["title"] = "".join(self._title)
            self._title = None
        elif tag == "text" and self._text is not None:
            self._svg["texts"].append("".join(self._text).strip())
            self._text = None

    def handle_data(self, data):
        if self._title is not None:
            self._title.append(data)
        elif self._text is not None:
            self._text.append(data)


def charts(html: str) -> dict[str, dict]:
    p = Charts()
    p.feed(html)
    p.close()
    return p.charts


def bar_titles(chart: dict) -> dict[str, str]:
    """{label: value text} of a bar chart, from each bar's tooltip "label: value"."""
    return dict(r["title"].split(": ", 1) for r in chart["rects"])


def dollars(text: str) -> float:
    return float(re.match(r"\$([0-9.,]+)", text).group(1).replace(",", ""))


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
    emu.config.errored_types = ("invalid_request_error",)      # final (the service's errors are sent again)
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
    assert data["cost_by_kind"] is None and data["cost_usd"] is None     # unpriced: unknown, never 0
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
    assert_self_contained(html, tags)
    with Store(str(state)) as store:
        job = find_job(store, None)
        reqs = store.q("SELECT * FROM requests WHERE job_id = ? ORDER BY row_index", (job["id"],))
        batches = store.q("SELECT * FROM batches WHERE job_id = ? ORDER BY id", (job["id"],))
    failed = [r for r in reqs if r["state"] not in ("succeeded", "pending", "in_flight")]
    paid = [r for r in reqs if r["state"] in ("succeeded", "invalid_output")]
    drawn = charts(html)
    assert set(drawn) == {"Cost by token kind", "Rows by status", "Histogram of output tokens", "Batch latency",
                          "Values of label"}

    # cost by token kind: the four figures add up to the job's cost; the token counts are the job's
    cost = bar_titles(drawn["Cost by token kind"])
    assert list(cost) == ["input", "output", "cache write", "cache read"]
    assert sum(dollars(v) for v in cost.values()) == pytest.approx(sum(r["cost_usd"] for r in paid), abs=4e-6)
    for kind, column, price in (("input", "input_tokens", 1.0), ("output", "output_tokens", 5.0)):  # $ / M tokens
        tokens = sum(r[column] for r in paid)
        assert cost[kind].endswith(f" · {tokens:,} tokens")
        assert dollars(cost[kind]) == pytest.approx(tokens * price / 1e6 / 2, abs=1e-6)   # batch: half price
    assert cost["cache write"] == "$0.0000 · 0 tokens" and cost["cache read"] == "$0.0000 · 0 tokens"

    # rows by status: a bar per status with the job's counts, lengths in proportion
    by_status = bar_titles(drawn["Rows by status"])
    counts = Counter(r["state"] for r in reqs)
    assert {k: int(v) for k, v in by_status.items()} == {s.replace("_", " "): counts.get(s, 0) for s in
                                                           ("pending", "in_flight", "succeeded", "errored", "expired",
                                                            "canceled", "invalid_output")}
    widths = {r["title"].split(": ")[0]: float(r["width"]) for r in drawn["Rows by status"]["rects"]}
    assert widths["errored"] / widths["succeeded"] == pytest.approx(counts["errored"] / counts["succeeded"], abs=0.01)
    assert widths["pending"] == 0

    # output tokens: the bins hold every reply once, each the replies of its range
    bins = [re.fullmatch(r"(\d+)(?:–(\d+))? tokens: (\d+) rows", r["title"]).groups()
            for r in drawn["Histogram of output tokens"]["rects"]]
    assert sum(int(n) for _, _, n in bins) == len(paid) > 0
    for low, high, n in bins:
        high = high or low
        assert int(n) == sum(1 for r in paid if int(low) <= r["output_tokens"] <= int(high))

    # latency: one bar per batch, named by its id, with its request count
    bars = drawn["Batch latency"]["rects"]
    assert len(bars) == len(batches) == 3
    assert [r["title"].split(":")[0] for r in bars] == [b["api_id"] for b in batches]
    assert all(": 30 requests, " in r["title"] and float(r["width"]) >= 2 for r in bars)

    # labels: the counts of the replies' labels, every allowed value shown
    labels = {k: int(v) for k, v in bar_titles(drawn["Values of label"]).items()}
    assert labels == {"positive": 0, "negative": 0, "neutral": 0,
                      **Counter(json.loads(r["parsed"])["label"] for r in reqs if r["state"] == "succeeded")}
    assert sum(labels.values()) == counts["succeeded"]

    # failed rows, each with its error
    assert tags.failed_rows == len(failed) > 0
    assert tags.failed_cells == [[r["custom_id"], r["state"], r["error_type"], r["error_message"], str(r["attempts"])]
                                 for r in failed]
    assert "reviews &lt;b&gt;" in html                       # the job's name, escaped

    # by name and by id prefix, the same page
    assert cli("report", "reviews <b>", "--state", state, "--html", tmp_path / "a.html").exit_code == 0
    assert cli("report", job["id"][:8], "--state", state, "--html", tmp_path / "b.html").exit_code == 0


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# appended to a copy of the page: the rendered size of every chart and of each of its bars and labels
MEASURE = """<script>
const charts = [...document.querySelectorAll("svg.chart")].map(svg => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; };
  return {label: svg.getAttribute("aria-label"), box: box(svg),
          rects: [...svg.querySelectorAll("rect")].map(r => [parseFloat(r.getAttribute("width")), ...box(r)]),
          texts: [...svg.querySelectorAll("text")].map(box)};
});
document.body.setAttribute("data-measured", JSON.stringify(charts));
</script>"""


def test_report_renders_in_a_real_browser(label_state, cli, tmp_path):
    """Opened in headless Chromium: every chart and every bar with a value has a rendered size, every
    label has been laid out, and the page logs nothing to the console."""
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no Chromium found (apt-get install chromium): the page is checked by parsing only")
    state, _ = label_state
    page = tmp_path / "r.html"
    assert cli("report", "--state", state, "--html", page).exit_code == 0
    html = page.read_text(encoding="utf-8")
    measured = tmp_path / "measured.html"
    measured.write_text(html.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    run = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,2000",
                          "--enable-logging=stderr", "--v=0", "--dump-dom", measured.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    found = re.search(r'data-measured="([^"]*)"', run.stdout)
    assert found, run.stdout[:2000]
    rendered = json.loads(html_unescape(found.group(1)))
    expected = charts(html)
    assert [c["label"] for c in rendered] == list(expected)
    for chart in rendered:
        width, height = chart["box"]
        assert width > 300 and height > 20, chart["label"]
        for (declared, w, h), rect in zip(chart["rects"], expected[chart["label"]]["rects"]):
            assert declared == float(rect["width"])
            assert (w > 0 and h > 0) == (declared > 0), (chart["label"], rect["title"], w, h)
        assert chart["texts"] and all(w > 0 and h > 0 for w, h in chart["texts"]), chart["label"]
    drawn = [c for c in rendered if any(d > 0 for d, _, _ in c["rects"])]
    assert len(drawn) == 5                                  # every chart has bars on screen
    assert "CONSOLE" not in run.stderr, run.stderr[-2000:]


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
