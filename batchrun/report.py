"""`batchrun report`: one job of a state file as a single self-contained HTML page.

`build_report_data(store, job)` gathers the numbers (totals, cost by token kind, rows by status, the
distribution of output tokens, how long each batch took, the label counts of label and schema jobs,
the failed rows); `write_report(store, job, path)` lays them out as HTML with inline CSS and inline
SVG charts drawn here, so the page opens offline and needs no script. Every value from the state
file is escaped by the template (Jinja2 autoescape).
"""
from __future__ import annotations

import datetime as dt
import errno
import json
import math
import os
import tempfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from .errors import NoSpaceError
from .requests import output_schema_for
from .models import CostByKind
from .states import (CANCELED, ERRORED, EXPIRED, IN_FLIGHT, INTENT, INVALID_OUTPUT, PENDING, SUBMITTED,
                     SUCCEEDED)
from .summary import (ROW_STATES, budget_text, failures_by_cause, invalid_output_reasons, job_status, priming_text,
                      stored_pricing, usage_problems, usage_text)
from .store import Store, now_iso, parse_iso

TOKEN_KINDS = CostByKind.KINDS
MAX_FAILED_ROWS = 500
MAX_LABEL_VALUES = 15      # values charted per property; the rest are summed as "other"
MAX_DISTINCT = 5000        # distinct values counted per property without a fixed set (memory bound)
HISTOGRAM_BINS = 20


# ---- the numbers ---------------------------------------------------------------------------------
def build_report_data(store: Store, job: dict, *, max_failed_rows: int = MAX_FAILED_ROWS) -> dict:
    """Everything the report shows, as plain numbers and strings (JSON-serialisable)."""
    jid = job["id"]
    spec = _spec(job)
    st = job_status(store, job)
    mode = job["mode"] or spec.get("mode") or "batch"
    cache_ttl = spec.get("cache_ttl") or "5m"
    pricing = stored_pricing(store, job)   # one pass: the cost by kind and what caching saved
    problems = usage_problems(store, jid)

    return {
        "generated_at": now_iso(),
        "job": {
            "id": jid, "name": job["name"], "model": job["model"], "mode": mode, "input": job["input"],
            "output": job["output"], "rows": st["rows"], "status": _status_word(st),
            "created_at": job["created_at"], "planned_at": job.get("planned_at"),
            "finished_at": job["finished_at"], "output_written_at": job.get("output_written_at"),
            "canceled_at": job.get("canceled_at"), "max_tokens": spec.get("max_tokens"),
            "max_cost": spec.get("max_cost"), "cache_ttl": cache_ttl,
        },
        "counts": {s: st["counts"].get(s, 0) for s in ROW_STATES},
        "tokens": dict(st["tokens"]),
        "cost_usd": st["cost_usd"],
        "cost_by_kind": pricing.shown() if pricing is not None else None,
        "cache_write_by_ttl": pricing.cache_write_by_ttl() if pricing is not None else None,
        "cache": {**st["cache"], "saved_usd": float(pricing.cache_saved) if pricing is not None else None},
        "reused_rows": st["reused_rows"],
        "failures_by_cause": [{"cause": c, "error_type": t, "rows": n} for c, t, n in failures_by_cause(store, jid)],
        "invalid_output_reasons": [{"reason": m, "rows": n} for m, n in invalid_output_reasons(store, jid)[0]],
        "usage_problems": problems,
        "usage_note": usage_text(problems),
        "output_tokens": _output_tokens(store, jid),
        "stop_reasons": store.stop_reasons(jid),
        "batches": _batches(store, jid),
        "labels": _labels(store, jid, spec),
        "failed": _failed_rows(store, jid, max_failed_rows),
    }


def _spec(job: dict) -> dict:
    try:
        spec = json.loads(job["spec"] or "{}")
    except (TypeError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


def _status_word(st: dict) -> str:
    if st["state"] == "planned" and st["rows"] == 0 and not any(st["counts"].values()):
        return "not planned"
    return st["state"]   # finished, canceled, planned (nothing sent yet) or in progress


def _output_tokens(store: Store, jid: str) -> dict:
    """Histogram of output tokens over rows with a reply: equal-width bins of a round width."""
    values = store.output_token_counts(jid)   # smallest first
    if not values:
        return {"rows": 0, "min": None, "max": None, "mean": None, "median": None, "bins": []}
    low, top = values[0], values[-1]
    width = _nice_width(top - low + 1, HISTOGRAM_BINS)
    start = low // width  # bins start at a multiple of their width at or below the smallest value
    n_bins = top // width - start + 1
    counts = Counter(v // width for v in values)
    bins = [{"low": i * width, "high": (i + 1) * width - 1, "rows": counts.get(i, 0)}
            for i in range(start, start + n_bins)]
    mid = len(values) // 2
    median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
    return {"rows": len(values), "min": values[0], "max": top, "mean": round(sum(values) / len(values), 2),
            "median": median, "bins": bins}


def _nice_width(span: int, bins: int) -> int:
    """The smallest of 1, 2, 5 × 10^k that covers `span` in at most `bins` bins."""
    raw = max(1.0, span / bins)
    exp = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * exp >= raw:
            return int(m * exp)
    return int(10 * exp)  # pragma: no cover


def _batches(store: Store, jid: str) -> list[dict]:
    now = dt.datetime.now(dt.timezone.utc)
    out = []
    for b in store.batches_of(jid):   # (as in status)
        created = _when(b["created_at"])
        ended = _when(b["ended_at"])
        seconds = None
        running = False
        if created is not None:
            if ended is not None:
                seconds = max(0.0, (ended - created).total_seconds())
            elif b["state"] in (SUBMITTED, INTENT):
                seconds, running = max(0.0, (now - created).total_seconds()), True
        counts = None
        if b["request_counts"]:
            try:
                counts = json.loads(b["request_counts"])
            except ValueError:
                counts = None
        out.append({
            "api_id": b["api_id"], "state": b["state"], "api_status": b["api_status"],
            "requests": b["request_count"], "intent_at": b["intent_at"], "created_at": b["created_at"],
            "ended_at": b["ended_at"], "collected_at": b["collected_at"], "seconds": seconds,
            "running": running, "adopted": bool(b["adopted"]), "request_counts": counts,
        })
    return out


def _when(text: Optional[str]) -> Optional[dt.datetime]:
    if not text:
        return None
    try:
        value = parse_iso(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _label_properties(spec: dict) -> list[tuple[str, str, Optional[list]]]:
    """(property, kind, values) for each top-level property of the output schema worth counting:
    kind is "string", "boolean", "integer" (an enum, or a range of at most 20 values) or "list" (an
    array of strings, each item counted); values are the allowed ones when the schema lists them."""
    view = SimpleNamespace(output_schema=spec.get("output_schema"), labels=spec.get("labels"),
                           multi_label=bool(spec.get("multi_label")))
    try:
        schema = output_schema_for(view)  # type: ignore[arg-type]
    except Exception:
        return []
    if not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict):
        return []
    out = []
    for name, prop in schema["properties"].items():
        if not isinstance(prop, dict):
            continue
        ptype = prop.get("type")
        if "enum" in prop:
            enum = [v for v in prop["enum"]]
            if all(isinstance(v, bool) for v in enum):
                out.append((name, "boolean", enum))
            elif all(isinstance(v, str) for v in enum):
                out.append((name, "string", enum))
            elif all(isinstance(v, int) and not isinstance(v, bool) for v in enum):
                out.append((name, "integer", sorted(enum)))
        elif ptype == "integer" and isinstance(prop.get("minimum"), int) and isinstance(prop.get("maximum"), int) \
                and 0 <= prop["maximum"] - prop["minimum"] < 20:
            out.append((name, "integer", list(range(prop["minimum"], prop["maximum"] + 1))))
        elif ptype == "boolean":
            out.append((name, "boolean", [True, False]))
        elif ptype == "string":
            out.append((name, "string", None))
        elif ptype == "array" and isinstance(prop.get("items"), dict):
            items = prop["items"]
            if items.get("type") == "string" or (isinstance(items.get("enum"), list)
                                                 and all(isinstance(v, str) for v in items["enum"])):
                out.append((name, "list", items.get("enum")))
    return out


def _labels(store: Store, jid: str, spec: dict) -> list[dict]:
    """Counts of values per property, from the `parsed` column of rows whose reply fit the schema."""
    props = _label_properties(spec)
    if not props:
        return []
    counters = {name: Counter() for name, _, _ in props}
    capped: set = set()
    rows = 0

    def count(name: str, key: str, bounded: bool) -> None:
        c = counters[name]
        if key in c or bounded or len(c) < MAX_DISTINCT:
            c[key] += 1
        else:
            capped.add(name)

    for parsed in store.parsed_replies(jid):
        try:
            value = json.loads(parsed)
        except ValueError:
            continue
        if not isinstance(value, dict):
            continue
        rows += 1
        for name, kind, enum in props:
            v = value.get(name)
            if kind == "list":
                items = v if isinstance(v, list) else []
                if not items:
                    count(name, "(none)", True)
                for item in items:
                    count(name, _key(item), enum is not None)
            else:
                count(name, _key(v), enum is not None)
    out = []
    for name, kind, enum in props:
        counter = counters[name]
        ordered = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
        if enum is not None:  # every allowed value, even unused; integers in numeric order
            known = [_key(v) for v in enum]
            order = {k: i for i, k in enumerate(known)}
            for k in known:
                counter.setdefault(k, 0)
            if kind == "integer":
                ordered = sorted(counter.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
            else:
                ordered = sorted(counter.items(), key=lambda kv: (-kv[1], order.get(kv[0], len(order)), kv[0]))
        distinct = sum(1 for _, n in ordered if n)
        # free text (a summary, a name): nearly every row its own value, nothing to chart
        free_text = kind == "string" and enum is None and distinct > MAX_LABEL_VALUES and (
            distinct * 2 > rows or name in capped)
        shown = [] if free_text else ordered[:MAX_LABEL_VALUES]
        rest = ordered[len(shown):]
        out.append({
            "property": name, "kind": kind, "rows": rows, "distinct": distinct, "free_text": free_text,
            "capped": name in capped, "counts": {} if free_text else dict(ordered),
            "values": [{"value": k, "rows": n} for k, n in shown],
            "other_values": len(rest), "other_rows": sum(n for _, n in rest),
        })
    return out


def _key(value: Any) -> str:
    if value is None:
        return "(missing)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _failed_rows(store: Store, jid: str, limit: int) -> dict:
    failed = store.failed_rows(jid, limit)
    return {**failed, "more": max(0, failed["total"] - len(failed["rows"]))}


# ---- the page ------------------------------------------------------------------------------------
STATE_COLORS = {
    SUCCEEDED: "#2e7d32", ERRORED: "#c62828", EXPIRED: "#ef6c00", CANCELED: "#757575",
    INVALID_OUTPUT: "#6a1b9a", PENDING: "#b0bec5", IN_FLIGHT: "#1565c0",
}
KIND_COLORS = {"input": "#1565c0", "output": "#2e7d32", "cache_write": "#ef6c00", "cache_read": "#00838f"}
CHART_WIDTH = 900


def write_report(store: Store, job: dict, path: str) -> None:
    """Write the job's report to `path` (one HTML file, nothing else), atomically."""
    html = render_report(build_report_data(store, job))
    target = Path(path)
    if target.parent and not target.parent.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(html)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise NoSpaceError(path) from None
        raise


def render_report(data: dict) -> str:
    import jinja2
    env = jinja2.Environment(loader=jinja2.PackageLoader("batchrun", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["money"] = _money
    env.filters["budget"] = budget_text
    env.filters["num"] = _num
    env.filters["duration"] = _duration
    env.filters["when"] = _when_text
    env.filters["priming"] = lambda n: priming_text(n, rest=False)
    return env.get_template("report.html.j2").render(d=data, charts=_charts(data), max_distinct=MAX_DISTINCT)


def _charts(data: dict) -> dict:
    """Geometry of the SVG charts (positions and sizes in px); the template draws them."""
    kinds = data["cost_by_kind"]
    tokens = data["tokens"]
    split = data["cache_write_by_ttl"]
    both = split is not None and split["5m"] and split["1h"]   # cache writes of both lifetimes: each told
    cost_items = [{"label": k.replace("_", " "), "value": (kinds or {}).get(k, 0.0),
                   "text": (_money(kinds[k]) if kinds is not None else "unpriced") + f" · {_num(tokens[k])} tokens"
                   + (f" ({_money(split['5m'])} 5m, {_money(split['1h'])} 1h)" if k == "cache_write" and both else ""),
                   "color": KIND_COLORS[k]} for k in TOKEN_KINDS]
    status_items = [{"label": s.replace("_", " "), "value": n, "text": _num(n), "color": STATE_COLORS[s]}
                    for s, n in data["counts"].items()]
    label_charts = []
    for prop in data["labels"]:
        items = [{"label": v["value"], "value": v["rows"], "text": _num(v["rows"]), "color": "#37474f"}
                 for v in prop["values"]]
        scale = max((i["value"] for i in items), default=0)
        if prop["other_values"]:  # drawn at most full length: the scale is the values shown
            items.append({"label": f"{prop['other_values']} other values", "value": prop["other_rows"],
                          "text": _num(prop["other_rows"]), "color": "#90a4ae"})
        label_charts.append({"prop": prop, "chart": hbars(items, scale=scale or None)})
    return {
        "cost": hbars(cost_items),
        "status": hbars(status_items),
        "histogram": histogram(data["output_tokens"]["bins"], data["job"].get("max_tokens")),
        "latency": timeline(data["batches"]),
        "labels": label_charts,
    }


def hbars(items: list[dict], *, width: int = CHART_WIDTH, label_width: int = 170, text_width: int = 230,
          row: int = 24, scale: Optional[float] = None) -> dict:
    """Horizontal bars, one per item ({label, value, text, color}); bar length ∝ value, the longest
    (or `scale`) filling the bar area; longer ones are cut at its end."""
    bar_area = width - label_width - text_width
    top = scale or max((i["value"] for i in items), default=0) or 0
    bars = []
    for n, item in enumerate(items):
        length = 0.0 if top <= 0 else max(min(item["value"] / top, 1.0) * bar_area,
                                           1.0 if item["value"] > 0 else 0.0)
        bars.append({**item, "y": n * row + 4, "h": row - 8, "x": label_width, "w": round(length, 1),
                     "text_x": label_width + round(length, 1) + 6, "mid": n * row + row / 2 + 4,
                     "label": _cut(str(item["label"]), 26)})
    return {"width": width, "height": max(len(items), 1) * row + 8, "bars": bars, "label_x": label_width - 8,
            "empty": not items or top <= 0}


def histogram(bins: list[dict], max_tokens: Optional[int], *, width: int = CHART_WIDTH, height: int = 220) -> dict:
    """Vertical bars over equal-width bins of output tokens."""
    left, right, top_pad, bottom = 50, 10, 10, 40
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    peak = max((b["rows"] for b in bins), default=0)
    n = len(bins)
    slot = plot_w / n if n else plot_w
    bars = []
    for i, b in enumerate(bins):
        h = 0.0 if peak == 0 else b["rows"] / peak * plot_h
        bars.append({"x": round(left + i * slot + 1, 1), "w": round(max(slot - 2, 1), 1),
                     "y": round(top_pad + plot_h - h, 1), "h": round(h, 1), "rows": b["rows"],
                     "range": f"{b['low']}–{b['high']}" if b["high"] != b["low"] else str(b["low"])})
    step = max(1, math.ceil(n / 10))
    if bins and bins[0]["low"] == bins[0]["high"]:  # one value per bin: label the bars
        ticks = [{"x": round(left + (i + 0.5) * slot, 1), "text": str(b["low"])}
                 for i, b in enumerate(bins) if i % step == 0]
    else:  # label the bin edges
        ticks = [{"x": round(left + i * slot, 1), "text": str(b["low"])} for i, b in enumerate(bins) if i % step == 0]
        if n and n % step == 0:
            ticks.append({"x": round(left + n * slot, 1), "text": str(bins[-1]["high"] + 1)})
    y_ticks = []
    if peak:
        for frac in (0, 0.5, 1):
            y_ticks.append({"y": round(top_pad + plot_h - frac * plot_h, 1), "text": _num(round(peak * frac))})
    return {"width": width, "height": height, "bars": bars, "ticks": ticks, "y_ticks": y_ticks,
            "left": left, "base": top_pad + plot_h, "right": width - right, "empty": not bins,
            "axis_y": height - 8, "max_tokens": max_tokens}


def timeline(batches: list[dict], *, width: int = CHART_WIDTH, label_width: int = 190, text_width: int = 130,
             row: int = 24) -> dict:
    """One horizontal bar per batch, from its created_at to its ended_at, on a shared time axis."""
    spans = []
    for b in batches:
        start = _when(b["created_at"])
        if start is None or b["seconds"] is None:
            continue
        spans.append((b, start, start + dt.timedelta(seconds=b["seconds"])))
    area = width - label_width - text_width
    if not spans:
        return {"width": width, "height": 40, "bars": [], "empty": True, "ticks": [], "label_x": label_width - 8}
    t0 = min(s for _, s, _ in spans)
    t1 = max(e for _, _, e in spans)
    total = max((t1 - t0).total_seconds(), 1e-9)
    bars = []
    for n, (b, start, end) in enumerate(spans):
        x = label_width + (start - t0).total_seconds() / total * area
        w = max((end - start).total_seconds() / total * area, 2.0)
        label = b["api_id"] or "(creating)"
        bars.append({"y": n * row + 4, "h": row - 8, "x": round(x, 1), "w": round(w, 1),
                     "mid": n * row + row / 2 + 4, "label": _cut(label, 21), "full": label,
                     "text_x": round(x + w + 6, 1), "requests": b["requests"],
                     "text": _duration(b["seconds"]) + (" (running)" if b["running"] else ""),
                     "color": "#1565c0" if b["running"] else "#546e7a"})
    axis_y = len(bars) * row + 8
    ticks = [{"x": round(label_width + f * area, 1), "text": "+" + _tick(total * f, total)}
             for f in (0, 0.25, 0.5, 0.75, 1)]
    return {"width": width, "height": axis_y + 24, "bars": bars, "empty": False, "ticks": ticks,
            "axis_y": axis_y, "label_x": label_width - 8, "x0": label_width, "x1": label_width + area,
            "started": t0.isoformat(), "span": total}


# ---- formatting ----------------------------------------------------------------------------------
def _money(v: Optional[float]) -> str:
    if v is None:
        return "unknown"
    if v != 0 and abs(v) < 0.01:
        return f"${v:,.6f}"
    return f"${v:,.4f}"


def _num(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:,.2f}"
    return f"{int(v):,}"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    s = float(seconds)
    if s < 10:
        return f"{s:.1f}s"
    s = int(round(s))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def _tick(seconds: float, span: float) -> str:
    if span < 1:
        return f"{seconds * 1000:.0f}ms"
    if span < 10:
        return f"{seconds:.1f}s"
    return _duration(seconds)


def _when_text(text: Optional[str]) -> str:
    value = _when(text)
    if value is None:
        return "–"
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
