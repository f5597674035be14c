"""Users' files as they are (issue 15): cells reach the prompt as the file wrote them, files that
cannot be read as meant are refused in one line before anything is sent, and keys and flags agree.

Every test goes through the CLI against the emulator; the emulator's free-text reply starts with
"Reply to: " and the first 120 characters of the prompt, so the output's `text` shows what was sent.
"""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.errors import ExitCode
from tests.conftest import refused, row_id

MODEL = "claude-haiku-4-5"


def run(cli, inp, out, *extra, prompt="{{ body }}"):
    return cli("run", "--input", inp, "--output", out, "--prompt", prompt, "--model", MODEL,
               "--max-tokens", 200, "--poll-interval", "0.05", *extra)


def prompts(out) -> list:
    """What each row's prompt was (the emulator echoes it, up to 120 characters)."""
    return [t[len("Reply to: "):t.rindex(" #")] for t in pq.read_table(out).column("text").to_pylist()]


# ---- 1. CSV cells as written ------------------------------------------------------------------------

CSV_TYPED = ("id,flag,when,price,code\n"
             "1,true,2026-03-01T09:30:00+02:00,1.50,007.0\n"
             "2,FALSE,2026-03-01T23:15:00-05:00,2.000,12.5\n")


def test_csv_cells_reach_the_prompt_as_written_and_the_output_keeps_types(emu, cli, tmp_path):
    inp = tmp_path / "typed.csv"
    inp.write_text(CSV_TYPED, encoding="utf-8")
    out = tmp_path / "out.parquet"
    r = run(cli, inp, out, prompt="{{ flag }}|{{ when }}|{{ price }}|{{ code }}")
    assert r.exit_code == 0, r.output
    assert prompts(out) == ["true|2026-03-01T09:30:00+02:00|1.50|007.0",
                            "FALSE|2026-03-01T23:15:00-05:00|2.000|12.5"]
    table = pq.read_table(out)
    assert table.schema.field("flag").type == pa.bool_()
    assert pa.types.is_timestamp(table.schema.field("when").type)
    assert table.schema.field("price").type == pa.float64()
    assert table.column("flag").to_pylist() == [True, False]
    assert table.column("price").to_pylist() == [1.5, 2.0]


def test_csv_cells_in_jinja_render_as_written_and_behave_as_typed(emu, cli, tmp_path):
    """A template with logic sees typed values (FALSE is false, prices add up), printed as written."""
    inp = tmp_path / "typed.csv"
    inp.write_text(CSV_TYPED, encoding="utf-8")
    out = tmp_path / "out.parquet"
    r = run(cli, inp, out, prompt="{% if flag %}yes{% else %}no{% endif %} {{ flag }} {{ price }} "
                                  "{{ price * 2 }} {{ row['when'] }}")
    assert r.exit_code == 0, r.output
    assert prompts(out) == ["yes true 1.50 3.0 2026-03-01T09:30:00+02:00",
                            "no FALSE 2.000 4.0 2026-03-01T23:15:00-05:00"]


# ---- 2, 3. JSONL numbers and late keys --------------------------------------------------------------

def test_jsonl_integers_past_2_53_and_64_bits_reach_the_prompt_exactly(emu, cli, tmp_path):
    inp = tmp_path / "ids.jsonl"
    ids = ["9007199254740993", "9007199254740992", "123456789012345678901234567890", "7"]
    inp.write_text("".join(f'{{"id": {i}, "body": "doc"}}\n' for i in ids), encoding="utf-8")
    out = tmp_path / "out.parquet"
    r = run(cli, inp, out, "--id-column", "id", prompt="id {{ id }}")
    assert r.exit_code == 0, r.output
    assert prompts(out) == [f"id {i}" for i in ids]
    table = pq.read_table(out)
    assert table.column("custom_id").to_pylist() == ids                # distinct ids, every digit
    assert [str(v) for v in table.column("id").to_pylist()] == ids     # the output keeps them exact too
    assert {row_id(c) for c in emu.stats.submitted_custom_ids} == set(ids)


def _big_jsonl(path, rows: int, late: dict, at: int) -> None:
    """`rows` lines of ~600 bytes (over 1 MB before line `at`), line `at` onwards with `late` added."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            row = {"n": i, "body": f"row {i} " + "x" * 580}
            if i >= at:
                row.update(late)
            f.write(json.dumps(row) + "\n")


def test_jsonl_key_first_seen_after_a_megabyte_becomes_a_column(emu, cli, tmp_path):
    inp = tmp_path / "late.jsonl"
    _big_jsonl(inp, 2100, {"lang": "de"}, at=2000)
    assert os.path.getsize(inp) > 2000 * 600 > (1 << 20)
    out = tmp_path / "out.parquet"
    prompt = "{{ n }} [{{ lang }}]"
    r = run(cli, inp, out, "--batch-size", 5000, prompt=prompt)
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    assert table.num_rows == 2100
    langs = table.column("lang").to_pylist()
    assert langs[:2000] == [None] * 2000 and langs[2000:] == ["de"] * 100
    got = prompts(out)
    assert got[0] == "0 []" and got[2050] == "2050 [de]"
    assert emu.stats.create_calls == 1
    # the job's plan keeps the whole file's schema: a second run finds the job done, sends nothing
    r = run(cli, inp, out, "--batch-size", 5000, prompt=prompt)
    assert r.exit_code == 0, r.output
    assert emu.stats.create_calls == 1
    assert pq.read_table(out).column("lang").to_pylist() == langs


def test_jsonl_huge_integer_after_a_megabyte_keeps_its_digits(emu, cli, tmp_path):
    """The first block says int64; a later line holds an integer past 64 bits (today: cannot read)."""
    inp = tmp_path / "late-big.jsonl"
    _big_jsonl(inp, 2010, {"ref": 5}, at=0)
    with open(inp, "a", encoding="utf-8") as f:
        f.write('{"n": 2010, "body": "last", "ref": 123456789012345678901234567890}\n')
    out = tmp_path / "out.parquet"
    r = run(cli, inp, out, "--id-column", "n", "--batch-size", 5000, prompt="ref {{ ref }}")
    assert r.exit_code == 0, r.output
    got = prompts(out)
    assert len(got) == 2011 and got[0] == "ref 5" and got[-1] == "ref 123456789012345678901234567890"


# ---- 4. a null struct ----------------------------------------------------------------------------------

def test_null_struct_cell_renders_its_fields_empty(emu, cli, tmp_path):
    inp = tmp_path / "meta.jsonl"
    inp.write_text('{"t": "a", "meta": {"lang": "en", "tag": "x"}}\n'
                   '{"t": "b", "meta": null}\n'
                   '{"t": "c", "meta": {"lang": null, "tag": "z"}}\n', encoding="utf-8")
    out = tmp_path / "out.parquet"
    r = run(cli, inp, out, prompt="{{ t }} lang={{ meta.lang }} tag={{ meta['tag'] }}.")
    assert r.exit_code == 0, r.output
    assert prompts(out) == ["a lang=en tag=x.", "b lang= tag=.", "c lang= tag=z."]


# ---- 5. images next to the input ------------------------------------------------------------------------

def test_relative_image_paths_are_read_from_the_input_files_folder(emu, cli, tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    inp = data / "rows.csv"
    inp.write_text("id,photo,body\n1,img/cat.png,a cat\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)          # the working directory has no img/ folder
    out = tmp_path / "out.parquet"
    r = run(cli, inp, out, "--image-column", "photo")
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    assert table.column("status").to_pylist() == ["succeeded"]
    assert table.column("input_tokens").to_pylist()[0] >= 1000     # the emulator counted an image


# ---- 6, 7. CSV files that cannot be read as meant --------------------------------------------------------

@pytest.mark.parametrize("text, extra", [
    ('id,body\n1,fine\n2,"never closed\n3,swallowed\n4,swallowed too\n', ()),
    ('id,body\n1,fine\n2,"never closed\n3,swallowed\n4,swallowed too\n', ("--limit", 2)),   # rows past 2 unread
    ('id,body,n\n1,fine,1\n"2,never closed,2\n3,swallowed,3\n', ()),                 # in the first column
    ('id,body\n1,"fine, ""quoted"""\n2,"last line, never closed', ()),              # no line end at the end
    ('id,body\n1,fine\n2,"', ()),
])
def test_csv_with_an_unterminated_quote_is_refused_naming_its_line(emu, cli, tmp_path, text, extra):
    inp = tmp_path / "broken.csv"
    inp.write_text(text, encoding="utf-8")
    line = refused(run(cli, inp, tmp_path / "out.parquet", *extra), ExitCode.BAD_INPUT, "broken.csv", "line 3",
                   "never closes")
    assert emu.stats.create_calls == 0, line
    assert not (tmp_path / "out.parquet").exists()


def test_csv_quotes_that_close_and_quotes_inside_cells_are_read(emu, cli, tmp_path):
    inp = tmp_path / "quotes.csv"
    inp.write_text('id,body\n1,a 5" screen\n2,"quoted, with ""inner"" quotes\nand a line"\n3,"last"\n',
                   encoding="utf-8")
    out = tmp_path / "out.parquet"
    r = run(cli, inp, out)
    assert r.exit_code == 0, r.output
    assert prompts(out) == ['a 5" screen', 'quoted, with "inner" quotes\nand a line', "last"]
    for ending in ('3,"last, no line end"', "3,last", '3,""', '3,"a ""b"""', '3,"a\nb"\n'):
        inp.write_text("id,body\n1,x\n" + ending, encoding="utf-8")
        r = run(cli, inp, tmp_path / "out2.parquet", "--state", tmp_path / "s2.sqlite", prompt="[{{ body }}]")
        assert r.exit_code == 0, (ending, r.output)
        r = run(cli, inp, tmp_path / "out3.parquet", "--state", tmp_path / "s3.sqlite", "--limit", 1,
                prompt="[{{ body }}]")
        assert r.exit_code == 0, (ending, r.output)


def test_duplicate_column_names_are_refused(emu, cli, tmp_path):
    inp = tmp_path / "dup.csv"
    inp.write_text("review_id,title,title\n1,a,b\n", encoding="utf-8")
    refused(run(cli, inp, tmp_path / "out.parquet", prompt="{{ title }}"), ExitCode.BAD_INPUT,
            "dup.csv", "'title' appears twice", "columns 2 and 3")
    assert emu.stats.create_calls == 0


# ---- 8. templates that read other templates or loop without end -------------------------------------------

@pytest.mark.parametrize("prompt, needle", [
    ("{% include 'other.j2' %} {{ body }}", "{% include %}"),
    ("{% import 'macros.j2' as m %}{{ body }}", "{% import %}"),
    ("{% from 'macros.j2' import x %}{{ body }}", "{% from ... import %}"),
    ("{% extends 'base.j2' %}{{ body }}", "{% extends %}"),
    ("{% for i in range(10**9) %}{% endfor %}{{ body }}", "range(1000000000)"),
    ("{% for i in range(9000) %}{% for j in range(9000) %}{% endfor %}{% endfor %}{{ body }}", "range(9000)"),
    ("{{ body * 10**9 }}", "too large for a prompt"),
    ("{{ 7 ** 100000000 }}{{ body }}", "too large for a prompt"),
])
def test_templates_that_include_or_loop_without_end_are_refused(emu, cli, tmp_path, prompt, needle):
    inp = tmp_path / "rows.csv"
    inp.write_text("id,body\n1,a\n2,b\n", encoding="utf-8")
    refused(run(cli, inp, tmp_path / "out.parquet", prompt=prompt), ExitCode.BAD_INPUT, "prompt:", needle)
    assert emu.stats.create_calls == 0


def test_a_small_range_still_works(emu, cli, tmp_path):
    inp = tmp_path / "rows.csv"
    inp.write_text("id,body\n1,a\n", encoding="utf-8")
    out = tmp_path / "out.parquet"
    r = run(cli, inp, out, prompt="{% for i in range(3) %}{{ i }}{% endfor %} {{ body }}")
    assert r.exit_code == 0, r.output
    assert prompts(out) == ["012 a"]


# ---- 14. keys and flags take the same values --------------------------------------------------------------

def _job_id(cli, *args) -> str:
    r = cli("validate", *args)
    assert r.exit_code == 0, r.output
    return r.output.split(" job ", 1)[1].split()[0]


def test_job_keys_take_what_their_flags_take(emu, cli, tmp_path):
    inp = tmp_path / "rows.csv"
    inp.write_text("id,body\n1,good\n", encoding="utf-8")
    job = tmp_path / "job.toml"
    job.write_text(f'input = "{inp.name}"\nprompt = "Rate: {{{{ body }}}}"\nmodel = "{MODEL}"\nmax_tokens = 4096\n'
                   'thinking = 2048\nlabels = "good, bad"\nstop_sequences = "END"\n', encoding="utf-8")
    r = cli("run", job, "--poll-interval", "0.05")
    assert r.exit_code == 0, r.output
    assert pq.read_table(tmp_path / "rows.results.parquet").column("status").to_pylist() == ["succeeded"]
    by_flags = _job_id(cli, "--input", inp, "--prompt", "Rate: {{ body }}", "--model", MODEL, "--max-tokens", 4096,
                       "--thinking", "2048", "--labels", "good,bad", "--stop-sequences", "END")
    assert _job_id(cli, job) == by_flags                     # the same job: the same requests
    # the spelled-out table is the same job as the number
    job.write_text(job.read_text().replace("thinking = 2048", 'thinking = {type = "enabled", budget_tokens = 2048}')
                   .replace('labels = "good, bad"', 'labels = ["good", "bad"]')
                   .replace('stop_sequences = "END"', 'stop_sequences = ["END"]'), encoding="utf-8")
    assert _job_id(cli, job) == by_flags
    job.write_text(job.read_text().replace('thinking = {type = "enabled", budget_tokens = 2048}', 'thinking = "lots"'))
    refused(cli("validate", job), ExitCode.BAD_INPUT, "thinking")


# ---- 15. a bad max_tokens cell names its own row ----------------------------------------------------------

def test_non_numeric_max_tokens_cell_names_its_row(emu, cli, tmp_path):
    inp = tmp_path / "rows.csv"
    inp.write_text("id,mt,body\n1,100,a\n2,200,b\n3,lots,c\n4,50,d\n", encoding="utf-8")
    line = refused(run(cli, inp, tmp_path / "out.parquet", "--max-tokens-column", "mt"), ExitCode.BAD_INPUT,
                   "mt:", "row 3", "'lots'")
    assert "row 1" not in line
    assert emu.stats.create_calls == 0


def test_max_tokens_cells_written_as_text_are_used(emu, cli, tmp_path):
    """A max_tokens column read as text (a leading zero makes it so) still gives each row its number."""
    inp = tmp_path / "rows.csv"
    inp.write_text("id,mt,body\n1,040,a\n2, 7 ,b\n3,,c\n", encoding="utf-8")
    out = tmp_path / "out.parquet"
    r = run(cli, inp, out, "--max-tokens-column", "mt")
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    assert table.column("stop_reason").to_pylist() == ["end_turn", "max_tokens", "end_turn"]
    assert max(table.column("output_tokens").to_pylist()[:2]) <= 40


# ---- 17. an empty partition cell ---------------------------------------------------------------------------

def test_empty_csv_cell_used_as_partition_goes_with_the_nulls(emu, cli, tmp_path):
    inp = tmp_path / "rows.csv"
    inp.write_text("id,lang,body\n1,en,a\n2,,b\n3,de,c\n4,,d\n", encoding="utf-8")
    out = tmp_path / "by-lang"
    r = run(cli, inp, out, "--partition-by", "lang")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == ["lang=__HIVE_DEFAULT_PARTITION__", "lang=de", "lang=en"]
    nulls = pq.read_table(out / "lang=__HIVE_DEFAULT_PARTITION__")
    assert nulls.column("id").to_pylist() == [2, 4]


# ---- 18. prefill and the full text -------------------------------------------------------------------------

def test_prefill_text_is_the_continuation_unless_asked_for_the_full_text(emu, cli, tmp_path):
    inp = tmp_path / "rows.csv"
    inp.write_text("id,body\n1,hello\n", encoding="utf-8")
    out = tmp_path / "out.parquet"
    r = run(cli, inp, out, "--prefill", "Reply to:")
    assert r.exit_code == 0, r.output
    continuation = pq.read_table(out).column("text")[0].as_py()
    assert continuation.startswith(" hello #")
    full = tmp_path / "full.parquet"
    r = run(cli, inp, full, "--prefill", "Reply to:", "--prefill-in-text")
    assert r.exit_code == 0, r.output
    assert pq.read_table(full).column("text")[0].as_py() == "Reply to:" + continuation
    assert emu.stats.create_calls == 1          # the same requests: answered once, not paid twice
    refused(run(cli, inp, full, "--prefill-in-text"), ExitCode.BAD_INPUT, "prefill_in_text", "needs 'prefill'")


def test_image_dir_names_the_folder_and_run_table_reads_from_the_callers(emu, cli, tmp_path, monkeypatch):
    import batchrun
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    data = tmp_path / "data"
    data.mkdir()
    inp = data / "rows.csv"
    inp.write_text("id,photo,body\n1,cat.png,a cat\n", encoding="utf-8")
    r = run(cli, inp, tmp_path / "out.parquet", "--image-column", "photo", "--image-dir", pics)
    assert r.exit_code == 0, r.output
    assert pq.read_table(tmp_path / "out.parquet").column("input_tokens")[0].as_py() >= 1000
    monkeypatch.chdir(pics)      # a table has no folder: its relative paths are the caller's
    out = batchrun.run_table(pa.table({"photo": ["cat.png"], "body": ["a cat"]}), prompt="{{ body }}", model=MODEL,
                             max_tokens=50, poll_interval=0.05, image_column="photo", state=str(tmp_path / "t.sqlite"))
    assert out.column("status").to_pylist() == ["succeeded"] and out.column("photo").to_pylist() == ["cat.png"]


# ---- unchanged text, unchanged requests -------------------------------------------------------------------

# params_hash of each row as main computed it before cells were read as written (commit 2796f61): a
# state file in use keeps matching these requests, so nothing whose text did not change is sent again.
OLD_HASHES = {
    "csv": ["540ae972aa5a81e07e407af00c17cb2bbef425bb401bb2b286bc83ac7409915e",
            "20a4e4109c03e4b137310049d8b56fbc3a28253fbaf08146730604bd237a7a35",
            "2026294e287fd81253cc3477b51628ffda2c2c4d36d1486746ed72983a71cd60"],
    "csvj": ["a938ecce1e24305c282ebf4baad664196f8bf267a1e41e9b7b0b3baa01154cfa",
             "76087847dbd69376cd7a5f22370ff585bb49424b5aa5bb323d5dddfecee81c32",
             "16aebb493f11a55134738cbec9dfaf2c7e0d928032679b22c6ea33727c143d65"],
    "jsonl": ["33e379b00b14286776e35abaec4f88ca09108ec4c989a5fdedb215ffe85fb2b7",
              "2e1ada5a426871c44c2bd10a8a825087023fcbee58ce196ac0b96eb7e304201e"],
}


def test_cells_whose_text_reads_the_same_keep_their_request_hash(cli, tmp_path, monkeypatch, quick_builtin_emulator):
    """The built-in emulator (--emulator) is one endpoint whatever its port, so the hashes are stable."""
    import sqlite3
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    csv_in = tmp_path / "t.csv"
    csv_in.write_text('id,n,x,name,note\nT-1,3,2.5,Zoë,"a, ""b""\nc"\nT-2,-7,0.125,李雷,\nT-3,12,10.0,Ana,plain\n',
                      encoding="utf-8")
    jsonl_in = tmp_path / "t.jsonl"
    jsonl_in.write_text('{"id": 5, "s": 1.5, "m": {"a": 1, "b": "x"}, "l": [1, 2], "t": "hi"}\n'
                        '{"id": 6, "s": 2.0, "m": {"a": 2, "b": "y"}, "l": [], "t": "yo"}\n', encoding="utf-8")
    jobs = {"csv": (csv_in, "{{ n }}|{{ x }}|{{ name }}|{{ note }}"),
            "csvj": (csv_in, "{% if n > 5 %}big {% endif %}{{ n }} {{ x }} {{ name|upper }} {{ note }}"),
            "jsonl": (jsonl_in, "{{ id }} {{ s }} {{ m.a }} {{ m.b }} {{ l }} {{ t }}")}
    for name, (inp, prompt) in jobs.items():
        state = tmp_path / f"{name}.sqlite"
        r = cli("run", "--emulator", "--input", inp, "--output", tmp_path / f"{name}.parquet", "--state", state, "--prompt", prompt,
                "--model", MODEL, "--max-tokens", 50, "--poll-interval", "0.05", "--id-column", "id")
        assert r.exit_code == 0, r.output
        db = sqlite3.connect(state)
        try:
            got = [h for (h,) in db.execute("SELECT params_hash FROM requests ORDER BY row_index")]
        finally:
            db.close()
        assert got == OLD_HASHES[name], name


def test_jsonl_key_changing_kind_after_a_megabyte_is_refused_naming_its_line(emu, cli, tmp_path):
    inp = tmp_path / "kinds.jsonl"
    _big_jsonl(inp, 2000, {}, at=2000)
    with open(inp, "a", encoding="utf-8") as f:
        f.write('{"n": "two thousand", "body": "x"}\n')
    refused(run(cli, inp, tmp_path / "out.parquet", prompt="{{ n }} {{ body }}"), ExitCode.BAD_INPUT,
            "kinds.jsonl", "line 2001", "'n'")
    assert emu.stats.create_calls == 0


def test_max_tokens_null_cells_take_the_jobs_max_tokens(emu, cli, tmp_path):
    """A number column's null markers (NA, an empty cell) reach a template as written, and max_tokens
    from them is the job's own, as for any null."""
    inp = tmp_path / "rows.csv"
    inp.write_text("id,mt,body\n1,5,a\n2,NA,b\n3,,c\n", encoding="utf-8")
    out = tmp_path / "out.parquet"
    r = run(cli, inp, out, "--max-tokens-column", "mt", prompt="{{ body }} [{{ mt }}]")
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    assert table.column("stop_reason").to_pylist() == ["max_tokens", "end_turn", "end_turn"]
    assert table.column("mt").to_pylist() == [5, None, None]
    texts = table.column("text").to_pylist()
    assert texts[1].startswith("Reply to: b [NA] #") and texts[2].startswith("Reply to: c [] #")
