"""A hostile new user's files and templates (issue 15, probed again): each is refused in one line naming
the row, line or column, with nothing sent, or renders quickly as written — never a hang or an internal
error. Through the CLI against the emulator on loopback (its reply echoes the prompt's start)."""
from __future__ import annotations

import os
import time

import pyarrow.parquet as pq
import pytest

from batchrun.errors import ExitCode
from tests.conftest import refused

MODEL = "claude-haiku-4-5"


def run(cli, inp, out, *extra, prompt="{{ body }}"):
    return cli("run", "--input", inp, "--output", out, "--prompt", prompt, "--model", MODEL,
               "--max-tokens", 200, "--poll-interval", "0.05", *extra)


def prompts(out) -> list:
    return [t[len("Reply to: "):t.rindex(" #")] for t in pq.read_table(out).column("text").to_pylist()]


# ---- templates: an error of the template on a row's cells names the row -----------------------------------

@pytest.mark.parametrize("prompt, needle", [
    ("{{ 10 / (n - 2) }}", "ZeroDivisionError"),          # row 2's cell makes it divide by zero
    ("{{ body + n }}", "TypeError"),                      # text + number
    ("{{ '%d'|format(body) }}", "TypeError"),
])
def test_a_template_that_fails_on_a_rows_cells_is_refused_naming_the_row(emu, cli, tmp_path, prompt, needle):
    inp = tmp_path / "rows.csv"
    inp.write_text("id,body,n\n1,a,1\n2,b,2\n", encoding="utf-8")
    line = refused(run(cli, inp, tmp_path / "out.parquet", prompt=prompt), ExitCode.BAD_INPUT,
                   "prompt: cannot render row", needle)
    if "ZeroDivision" in needle:
        assert "row 2" in line
    assert emu.stats.create_calls == 0


def test_tojson_of_a_row_with_typed_csv_cells_renders_them_as_written(emu, cli, tmp_path):
    """A timestamp cell is typed (it compares as a time) but JSON has no time: |tojson gives the file's text;
    a bool cell is true/false (not 1/0), an empty cell of a number column null (not "")."""
    inp = tmp_path / "rows.csv"
    inp.write_text("id,when,ok,n\n1,2026-03-01T09:30:00+02:00,TRUE,\n2,2026-03-02T10:00:00Z,false,4\n",
                   encoding="utf-8")
    out = tmp_path / "out.parquet"
    r = run(cli, inp, out, prompt="{{ row|tojson }} {{ ok }}")
    assert r.exit_code == 0, r.output
    assert prompts(out) == ['{"id": 1, "n": null, "ok": true, "when": "2026-03-01T09:30:00+02:00"} TRUE',
                            '{"id": 2, "n": 4, "ok": false, "when": "2026-03-02T10:00:00Z"} false']


# ---- templates that would run for hours: refused in one line, quickly ----------------------------------

@pytest.mark.parametrize("prompt, needle", [
    ("{{ lipsum(10**6) }}", "lipsum(1000000)"),
    ('{% set s = "ab" * 500000 %}{% for c in s %}{% for d in s %}x{% endfor %}{% endfor %}', "{% for %} loops"),
    ("{% for c in body %}{% for d in body %}{% for e in body %}x{% endfor %}{% endfor %}{% endfor %}",
     "{% for %} loops"),
    ("{{ body|center(10**9) }}", "center(1,000,000,000)"),     # a gigabyte of spaces, then an internal error
    ("{{ body|indent(10**9, true) }}", "indent(1,000,000,000)"),
    ("{{ body.ljust(10**9) }}", "ljust(1,000,000,000)"),
    ("{{ body.zfill(10**10) }}", "zfill(10,000,000,000)"),
])
def test_templates_that_would_run_for_hours_are_refused_quickly(emu, cli, tmp_path, prompt, needle):
    inp = tmp_path / "rows.csv"
    inp.write_text("id,body\n1," + "w" * 2000 + "\n", encoding="utf-8")
    started = time.monotonic()
    refused(run(cli, inp, tmp_path / "out.parquet", prompt=prompt), ExitCode.BAD_INPUT,
            "prompt: cannot render row 1", needle)
    assert time.monotonic() - started < 30
    assert emu.stats.create_calls == 0


def test_loops_and_lipsum_within_reason_still_render(emu, cli, tmp_path):
    inp = tmp_path / "rows.csv"
    inp.write_text("id,body\n1,abc\n", encoding="utf-8")
    out = tmp_path / "out.parquet"
    r = run(cli, inp, out, prompt="{% for c in body %}{% for k, v in row.items() %}{{ c }}{{ k }}{% endfor %}"
                                   "{% if loop.last %}.{% endif %}{% endfor %} {{ lipsum(2)|length > 10 }}"
                                   "|{{ body|center(7) }}|{{ body.zfill(5) }}|{{ 'x\ny'|indent(2) }}")
    assert r.exit_code == 0, r.output
    assert prompts(out) == ["aidabodybidbbodycidcbody. True|  abc  |00abc|x\n  y"]


# ---- CSV bytes that are not UTF-8 -------------------------------------------------------------------------

def test_a_latin1_csv_is_refused_naming_its_line_and_column(emu, cli, tmp_path):
    """pyarrow reads a cell that is not UTF-8 as bytes: every prompt of the column would say b'...'."""
    inp = tmp_path / "latin1.csv"
    inp.write_bytes(b"id,body\n1,fine\n2,caf\xe9\n")
    refused(run(cli, inp, tmp_path / "out.parquet"), ExitCode.BAD_INPUT, "latin1.csv", "line 3", "'body'",
            "not UTF-8", "0xe9")
    assert emu.stats.create_calls == 0
    assert not (tmp_path / "out.parquet").exists()


# ---- JSONL integers past 2**53 inside objects and lists ----------------------------------------------------

def test_jsonl_integers_past_2_53_inside_objects_and_lists_keep_every_digit(emu, cli, tmp_path):
    inp = tmp_path / "nested.jsonl"
    inp.write_text('{"id": 1, "m": {"a": 9007199254740993, "l": [18446744073709551617, 1]}}\n'
                   '{"id": 2, "m": {"a": 5, "l": [123456789012345678901234567890]}}\n', encoding="utf-8")
    out = tmp_path / "out.parquet"
    r = run(cli, inp, out, prompt="{{ m.a }} {{ m.l|join(',') }}")
    assert r.exit_code == 0, r.output
    assert prompts(out) == ["9007199254740993 18446744073709551617,1", "5 123456789012345678901234567890"]
    assert [str(v) for v in pq.read_table(out).column("m").to_pylist()[1]["l"]] == ["123456789012345678901234567890"]


# ---- keys and flags: the same value, the same answer ------------------------------------------------------

@pytest.mark.parametrize("value, needle", [("-5", "not -5"), ("2048.5", "2048.5"), ("lots", "'lots'")])
def test_a_bad_thinking_value_is_refused_alike_as_key_and_flag_as_it_was_given(emu, cli, tmp_path, value, needle):
    inp = tmp_path / "rows.csv"
    inp.write_text("id,body\n1,a\n", encoding="utf-8")
    job = tmp_path / "job.toml"
    toml_value = value if value != "lots" else '"lots"'
    job.write_text(f'input = "rows.csv"\nprompt = "{{{{ body }}}}"\nmodel = "claude-sonnet-4-5"\n'
                   f'max_tokens = 4000\nthinking = {toml_value}\n', encoding="utf-8")
    by_key = refused(cli("validate", job), ExitCode.BAD_INPUT, "thinking", needle)
    by_flag = refused(cli("validate", "--input", inp, "--prompt", "{{ body }}", "--model", "claude-sonnet-4-5",
                          "--max-tokens", 4000, "--thinking", value), ExitCode.BAD_INPUT, "thinking", needle)
    assert "{'type'" not in by_flag, by_flag
    assert by_key.rsplit("thinking", 1)[1] == by_flag.rsplit("thinking", 1)[1] or value == "2048.5", (by_key, by_flag)


# ---- JSONL: a key inside an object first seen past the first block ----------------------------------------

def test_a_jsonl_key_inside_an_object_first_seen_late_is_read(emu, cli, tmp_path):
    """The first megabyte's objects lack `late`; a later line has it: the file is valid, {{ m.late }} is ""
    for the rows without it (was: 'dict object' has no attribute 'late' for row 1)."""
    import json
    inp = tmp_path / "late.jsonl"
    lines = [json.dumps({"id": i, "m": {"a": i, "pad": "x" * 5000}}) for i in range(250)]
    lines.append(json.dumps({"id": 250, "m": {"a": 250, "pad": "", "late": "L"}}))
    inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert inp.stat().st_size > 1 << 20
    out = tmp_path / "out.parquet"
    r = run(cli, inp, out, prompt="[{{ m.late }}] {{ m.a }}")
    assert r.exit_code == 0, r.output
    got = prompts(out)
    assert got[0] == "[] 0" and got[-1] == "[L] 250" and len(got) == 251


# ---- a command that only reads a state file leaves an empty file as it is ----------------------------------

@pytest.mark.parametrize("command", [("status",), ("jobs",), ("cancel", "abc123")])
def test_reading_commands_refuse_an_empty_state_file_and_leave_it(emu, cli, tmp_path, command):
    """An empty file at --state (a placeholder, another program's) holds no job: `status` made it a state
    file of its own (73 KB, mode 0600) and said nothing."""
    state = tmp_path / "empty.sqlite"
    state.write_bytes(b"")
    os.chmod(state, 0o644)
    refused(cli(*command, "--state", state), ExitCode.BAD_INPUT, "empty.sqlite", "is empty")
    assert state.read_bytes() == b"" and oct(state.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.sqlite"]
