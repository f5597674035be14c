"""Issue 18: a cached prefix is written once and read by every other row, on an emulator whose batches
are cold (no item reads a cache another item of its batch wrote), through the CLI."""
from __future__ import annotations

import json
import re
import sqlite3
import time

import pyarrow.parquet as pq
import pytest

from batchrun.store import Store
from tests.conftest import PROMPT, refused

MODEL = "claude-haiku-4-5"         # caches prefixes of 4,096 tokens and more
# ~4,400 tokens as the emulator counts them (a word or a punctuation mark each); ~28k characters
GUIDE = "\n".join(f"Rule {i}: label the ticket by its main request, and say why in one line." for i in range(300))


@pytest.fixture
def cold(emu):
    emu.config.cold_batches = True
    return emu


def job(tickets_csv, tmp_path, name, *extra, rows=300):
    guide = tmp_path / "guide.txt"
    guide.write_text(GUIDE, encoding="utf-8")
    return ["run", "--input", tickets_csv, "--output", tmp_path / f"{name}.parquet", "--state",
            tmp_path / f"{name}.sqlite", "--id-column", "ticket_id", "--prompt", PROMPT, "--model", MODEL,
            "--max-tokens", 50, "--batch-size", 100, "--limit", rows, "--system-file", guide, "--cache-system",
            "--poll-interval", "0.05", *extra]


def output(tmp_path, name) -> list:
    return pq.read_table(tmp_path / f"{name}.parquet").to_pylist()


def cost_line(text: str) -> float:
    return float(re.search(r"^  cost: \$([0-9.,]+)", text, re.M)[1].replace(",", ""))


def test_a_primed_job_reads_the_cache_on_a_cold_emulator(cold, cli, tmp_path, tickets_csv):
    """The issue's "done when": 300 rows in batches of 100, a ~4k-token cached system prompt. One row
    goes first, alone; the other 299 read what it wrote. Priming off, every row writes, and pays for it."""
    est = json.loads(cli("estimate", *job(tickets_csv, tmp_path, "primed")[1:], "--json").output)
    r = cli(*job(tickets_csv, tmp_path, "primed"))
    assert r.exit_code == 0, r.output
    assert "priming the cache: 1 request" in r.output                        # the progress says so
    rows = output(tmp_path, "primed")
    assert len(rows) == 300 and all(row["status"] == "succeeded" for row in rows)
    reads = sum(1 for row in rows if row["cache_read_input_tokens"])
    writes = sum(1 for row in rows if row["cache_creation_input_tokens"])
    assert reads >= 285 and writes <= 3, (reads, writes)
    assert all(row["cache_read_input_tokens"] >= 4096 for row in rows if row["cache_read_input_tokens"])
    # no row paid twice; the first batch is the primer, alone; then the rest in batches of 100
    assert len(cold.stats.submitted_custom_ids) == 300 and max(cold.stats.submitted_custom_ids.values()) == 1
    assert max(cold.stats.billed.values()) == 1
    assert [len(items) for items in cold.stats.accepted.values()] == [1, 100, 100, 99]
    # the 1-hour cache by default for batches
    with Store(str(tmp_path / "primed.sqlite")) as s:
        assert all(p["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"} for _, _, p in s.params())
    line = re.search(r"cache: (\d+) of (\d+) rows read it \(([\d.]+)%\), (\d+) wrote it; caching saved \$", r.output)
    assert line and (int(line[1]), int(line[2]), int(line[4])) == (reads, 300, writes), r.output
    primed = cost_line(r.output)
    assert primed == pytest.approx(sum(row["cost_usd"] for row in rows), abs=1e-6)

    cold.reset()
    # batches of the real API run for minutes: none ends before the next ones are created (each create
    # uploads ~3 MB here, longer than the fast config's processing time)
    cold.config.cold_batches, cold.config.processing_seconds = True, 1.0
    r = cli(*job(tickets_csv, tmp_path, "unprimed", "--no-cache-prime"))
    assert r.exit_code == 0, r.output
    assert "priming the cache" not in r.output
    rows = output(tmp_path, "unprimed")
    assert sum(1 for row in rows if row["cache_creation_input_tokens"]) == 300          # every row wrote
    assert sum(1 for row in rows if row["cache_read_input_tokens"]) == 0
    assert "cache: 0 of 300 rows read it (0.0%), 300 wrote it; caching cost $" in r.output
    unprimed = cost_line(r.output)
    assert unprimed > 5 * primed
    # the estimate brackets both: its minimum is the primed plan (one write, then reads), its maximum
    # assumes no read
    assert est["cost_usd_min"] <= primed and unprimed <= est["cost_usd_max"]


def test_status_and_report_show_the_read_rate_and_the_saving(cold, cli, tmp_path, tickets_csv):
    r = cli(*job(tickets_csv, tmp_path, "j", rows=40))
    assert r.exit_code == 0, r.output
    rows = output(tmp_path, "j")
    reads = sum(1 for row in rows if row["cache_read_input_tokens"])
    assert reads == 39
    st = cli("status", "--state", tmp_path / "j.sqlite")
    assert "cache: 39 of 40 rows read it (97.5%), 1 wrote it; caching saved $" in st.output, st.output
    assert "priming the cache" in st.output          # the primer batch is marked
    data = json.loads(cli("status", "--state", tmp_path / "j.sqlite", "--json").output)[0]
    assert data["cache"]["rows_read"] == 39 and data["cache"]["read_rate"] == 0.975
    # what caching saved: the cached tokens at the input price, less what their writes and reads cost
    write = sum(row["cache_creation_input_tokens"] for row in rows)
    read = sum(row["cache_read_input_tokens"] for row in rows)
    saved = ((write + read) * 1.00 - write * 2.00 - read * 0.10) / 1e6 / 2          # Haiku 4.5, 1h, batch
    assert data["cache"]["saved_usd"] == pytest.approx(saved, rel=1e-9)
    page = tmp_path / "r.html"
    assert cli("report", "--state", tmp_path / "j.sqlite", "--html", page).exit_code == 0
    html = page.read_text(encoding="utf-8")
    assert "39 of 40 rows read it (97.5%)" in html and "caching saved" in html


def test_no_wait_submits_the_primer_and_the_next_run_the_rest(cold, cli, tmp_path, tickets_csv):
    args = job(tickets_csv, tmp_path, "cron", "--no-wait", rows=120)
    r = cli(*args)
    assert r.exit_code == 5, r.output
    assert [len(items) for items in cold.stats.accepted.values()] == [1]       # the primer only
    st = cli("status", "--state", tmp_path / "cron.sqlite")
    assert "priming the cache: 1 request" in st.output, st.output
    time.sleep(0.15)                                                              # the primer ends
    r = cli(*args)
    assert r.exit_code == 5, r.output
    assert [len(items) for items in cold.stats.accepted.values()] == [1, 100, 19]
    time.sleep(0.15)
    r = cli(*args)
    assert r.exit_code == 0, r.output
    rows = output(tmp_path, "cron")
    assert sum(1 for row in rows if row["cache_read_input_tokens"]) == 119
    assert max(cold.stats.submitted_custom_ids.values()) == 1


def test_a_primer_whose_create_reply_is_lost_is_adopted(cold, cli, tmp_path, tickets_csv):
    cold.config.drop_after_create = 1                     # the primer is created, its reply dropped
    r = cli(*job(tickets_csv, tmp_path, "lost", rows=60))
    assert r.exit_code == 0, r.output
    assert cold.stats.faults["drop_after_create"] == 1
    assert [len(items) for items in cold.stats.accepted.values()] == [1, 59]  # adopted, not sent again
    assert max(cold.stats.submitted_custom_ids.values()) == 1
    assert sum(1 for row in output(tmp_path, "lost") if row["cache_read_input_tokens"]) == 59


def test_no_priming_below_the_minimum_or_when_turned_off(cold, cli, tmp_path, tickets_csv):
    args = job(tickets_csv, tmp_path, "short", rows=60)
    args[args.index("--system-file"):args.index("--system-file") + 2] = ["--system", "Label tickets. " * 50]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "below the 4096-token minimum" in r.output and "priming the cache" not in r.output
    assert [len(items) for items in cold.stats.accepted.values()] == [60]
    cold.reset()
    cold.config.cold_batches = True
    job_file = tmp_path / "j.toml"
    job_file.write_text("cache_prime = false\n", encoding="utf-8")
    r = cli("run", job_file, *job(tickets_csv, tmp_path, "off", rows=60)[1:])
    assert r.exit_code == 0, r.output
    assert [len(items) for items in cold.stats.accepted.values()] == [60]
    assert "cache: 0 of 60 rows read it" in r.output
    bad = tmp_path / "bad.toml"
    bad.write_text('cache_prime = "no"\n', encoding="utf-8")
    refused(cli("run", bad, *job(tickets_csv, tmp_path, "bad", rows=60)[1:]), 2, "cache_prime")


def test_rows_sent_after_the_cache_may_have_lapsed_are_primed_again(cold, cli, tmp_path, tickets_csv, monkeypatch):
    """A later chunk (here the rows retried after transient errors, two hours on) is primed again, so
    it reads the cache instead of writing it once per row."""
    args = job(tickets_csv, tmp_path, "later", "--no-wait", "--batch-size", 10, rows=30)
    assert cli(*args).exit_code == 5                            # the primer
    time.sleep(0.15)
    assert cli(*args).exit_code == 5                            # the rest: 29 rows in 3 batches
    assert [len(items) for items in cold.stats.accepted.values()] == [1, 10, 10, 9]
    cold.config.errored_rate = 0.5                              # their batches end with transient errors
    time.sleep(0.15)
    # two hours pass: the cache those batches read has lapsed, at the API and by batchrun's reckoning
    with sqlite3.connect(tmp_path / "later.sqlite") as db:
        db.execute("UPDATE batches SET intent_at = '2026-01-01T00:00:00.000Z'")
    real = time.time
    monkeypatch.setattr(cold, "clock", lambda: real() + 7200)
    assert cli(*args).exit_code == 5
    sizes = [len(items) for items in cold.stats.accepted.values()]
    assert sizes[:4] == [1, 10, 10, 9] and sizes[4:] == [1], sizes           # primed again
    retried = sum(1 for v in cold.stats.submitted_custom_ids.values() if v > 1)
    assert retried == 1   # the primer is the first row to retry; the others wait for it
    cold.config.errored_rate = 0.0
    time.sleep(0.15)
    assert cli(*args).exit_code == 5                            # the retried rows, after the primer
    time.sleep(0.15)
    r = cli(*args)
    assert r.exit_code == 0, r.output
    sent_late = list(cold.stats.accepted.values())[5:]
    assert sent_late and sum(len(b) for b in sent_late) >= PRIME_MIN_RETRIED
    late_ids = {wire.split("-", 1)[1] for b in sent_late for wire, _ in b}     # (sent as <job tag>-<custom_id>)
    late = [row for row in output(tmp_path, "later") if row["custom_id"] in late_ids]
    assert len(late) == len(late_ids) >= PRIME_MIN_RETRIED
    assert all(row["cache_read_input_tokens"] and not row["cache_creation_input_tokens"] for row in late)


PRIME_MIN_RETRIED = 5


def test_the_cache_ttl_default_and_jobs_planned_with_the_old_one(cold, cli, tmp_path, tickets_csv):
    """Batch jobs cache for an hour unless 5m is asked for; messages mode keeps 5 minutes. A job planned
    with the 5-minute cache when that was the default is continued as it was, not planned and paid again."""
    args = job(tickets_csv, tmp_path, "old", rows=30)
    shown = cli("validate", *args[1:args.index("--poll-interval")], "--show", 1)
    assert '"ttl": "1h"' in shown.output, shown.output
    messages = cli("validate", *args[1:args.index("--poll-interval")], "--mode", "messages", "--show", 1)
    assert messages.exit_code == 0 and '"ttl"' not in messages.output, messages.output
    r = cli(*args, "--cache-ttl", "5m", "--no-wait")           # as planned by the 5-minute default
    assert r.exit_code == 5, r.output
    time.sleep(0.15)
    r = cli(*args)                                              # the same job: its primer, then the rest
    assert r.exit_code == 0, r.output
    with Store(str(tmp_path / "old.sqlite")) as s:
        assert len(s.find_jobs()) == 1
        assert all(p["system"][0]["cache_control"] == {"type": "ephemeral"} for _, _, p in s.params())
    assert max(cold.stats.submitted_custom_ids.values()) == 1 and len(cold.stats.submitted_custom_ids) == 30


def test_estimate_says_how_the_cache_is_paid(cold, cli, tmp_path, tickets_csv):
    args = job(tickets_csv, tmp_path, "est", rows=40)[1:]
    args = args[:args.index("--poll-interval")]
    primed = cli("estimate", *args)
    assert primed.exit_code == 0, primed.output
    assert "primed: 1 request is sent alone first and writes the cache" in primed.output
    off = json.loads(cli("estimate", *args, "--no-cache-prime", "--json").output)
    assert off["cache"].startswith("not primed (cache_prime = false)")
    on = json.loads(cli("estimate", *args, "--json").output)
    assert on["cost_usd_max"] == off["cost_usd_max"]        # the maximum assumes no read either way
    assert cold.stats.batches_created == 0


def test_few_shot_turns_are_part_of_the_cached_prefix(cold, cli, tmp_path, tickets_csv):
    """With cache_system, the breakpoint goes after the few-shot turns: a short system prompt and long
    examples make a prefix long enough to cache, primed and read like a system prompt alone."""
    example = " ".join(f"word{i}" for i in range(1500))
    job_file = tmp_path / "shots.toml"
    job_file.write_text('system = "Label support tickets."\ncache_system = true\nfew_shot = [\n'
                        + "".join(f'  {{user = "Example {k}: {example}", assistant = "Label {k}: {example}"}},\n'
                                  for k in range(2))
                        + "]\n", encoding="utf-8")
    args = job(tickets_csv, tmp_path, "shots", rows=40)
    del args[args.index("--system-file"):args.index("--system-file") + 3]      # the system comes from the file
    est = json.loads(cli("estimate", job_file, *args[1:args.index("--poll-interval")], "--json").output)
    assert est["system_tokens"] >= 6000 and est["cache"].startswith("primed")
    r = cli("run", job_file, *args[1:])
    assert r.exit_code == 0, r.output
    assert "priming the cache: 1 request" in r.output and "below the" not in r.output
    with Store(str(tmp_path / "shots.sqlite")) as s:
        params = next(p for _, _, p in s.params())
    assert params["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert params["messages"][3]["content"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert params["messages"][3]["content"][0]["text"].startswith("Label 1:")
    rows = output(tmp_path, "shots")
    assert all(row["status"] == "succeeded" for row in rows)
    assert sum(1 for row in rows if row["cache_read_input_tokens"]) == 39
    assert all(row["cache_read_input_tokens"] >= 6000 for row in rows if row["cache_read_input_tokens"])
    cost = sum(row["cost_usd"] for row in rows)
    assert est["cost_usd_min"] <= cost <= est["cost_usd_max"]


def test_a_cached_job_moving_to_messages_mode_is_the_same_job(cold, cli, tmp_path, tickets_csv):
    """Each mode has its own default TTL (batch 1h, messages 5m): a cached job planned in batch mode at a
    gateway without batches still continues in messages mode as the same job."""
    cold.config.no_batches = True
    args = job(tickets_csv, tmp_path, "moved", rows=12)
    refused(cli(*args), 4, "--mode messages")
    r = cli(*args, "--mode", "messages")
    assert r.exit_code == 0, r.output
    with Store(str(tmp_path / "moved.sqlite")) as s:
        assert len(s.find_jobs()) == 1
    assert cold.stats.messages_calls == 12
