"""Issue 4: every bad input gets one clear line, a non-zero code, no traceback, nothing sent."""
from __future__ import annotations

import os

import pytest

from batchrun.errors import ExitCode
from tests.conftest import PROMPT, refused


def base(inp, tmp_path, *extra):
    return ["run", "--input", inp, "--output", tmp_path / "o.parquet", "--prompt", PROMPT,
            "--model", "claude-haiku-4-5", "--max-tokens", "100", *extra]


def test_template_names_a_missing_column(emu, cli, tmp_path, tickets_csv):
    r = cli("run", "--input", tickets_csv, "--output", tmp_path / "o.parquet", "--prompt", "Hi {{ nope }}")
    refused(r, ExitCode.BAD_INPUT, "'nope'")
    assert emu.stats.create_calls == 0


@pytest.mark.parametrize("content,needle", [
    ("", "empty"),
    ("a,b\n", "empty"),
    ("\x00\x01garbage", None),
])
def test_empty_or_corrupt_csv(emu, cli, tmp_path, content, needle):
    p = tmp_path / "bad.csv"
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    r = cli("run", "--input", p, "--output", tmp_path / "o.parquet", "--prompt", "{{ a }}")
    line = refused(r, ExitCode.BAD_INPUT, str(p))
    if needle:
        assert needle in line
    assert emu.stats.create_calls == 0


def test_corrupt_parquet_missing_file_and_unknown_type(emu, cli, tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    refused(cli("run", "--input", bad, "--prompt", "x"), ExitCode.BAD_INPUT, str(bad))
    refused(cli("run", "--input", tmp_path / "missing.csv", "--prompt", "x"), ExitCode.BAD_INPUT, "not found")
    xlsx = tmp_path / "data.xlsx"
    xlsx.write_bytes(b"PK")
    refused(cli("run", "--input", xlsx, "--prompt", "x"), ExitCode.BAD_INPUT, "unsupported input type")
    assert emu.stats.create_calls == 0


def test_duplicate_null_and_missing_ids(emu, cli, tmp_path):
    dup = tmp_path / "dup.csv"
    dup.write_text("id,body\na,x\nb,y\na,z\n")
    refused(cli(*base(dup, tmp_path, "--id-column", "id"), "--prompt", "{{ body }}"),
            ExitCode.BAD_INPUT, "duplicate id 'a'", "rows 1 and 3")
    null = tmp_path / "null.csv"
    null.write_text("id,body\n1,x\n,y\n")
    refused(cli(*base(null, tmp_path, "--id-column", "id"), "--prompt", "{{ body }}"),
            ExitCode.BAD_INPUT, "row 2", "empty")
    refused(cli(*base(dup, tmp_path, "--id-column", "nope"), "--prompt", "{{ body }}"),
            ExitCode.BAD_INPUT, "'nope'")
    assert emu.stats.create_calls == 0


def test_unknown_model_and_max_tokens_and_refused_param(emu, cli, tmp_path, tickets_csv):
    refused(cli("run", "--input", tickets_csv, "--prompt", "{{ body }}", "--model", "claude-nonesuch-9"),
            ExitCode.BAD_INPUT, "claude-nonesuch-9")
    refused(cli("run", "--input", tickets_csv, "--prompt", "{{ body }}", "--max-tokens", "0"),
            ExitCode.BAD_INPUT, "max_tokens")
    refused(cli("run", "--input", tickets_csv, "--prompt", "{{ body }}", "--model", "claude-haiku-4-5",
                "--max-tokens", "10000000"), ExitCode.BAD_INPUT, "max_tokens")
    refused(cli("run", "--input", tickets_csv, "--prompt", "{{ body }}", "--model", "claude-opus-5-5",
                "--top-k", "5"), ExitCode.BAD_INPUT, "top_k", "claude-opus-5-5")
    assert emu.stats.create_calls == 0


def test_malformed_job_file_names_the_key(emu, cli, tmp_path, tickets_csv):
    job = tmp_path / "job.toml"
    job.write_text(f'input = "{tickets_csv}"\nprompt = "{{{{ body }}}}"\nmax_tokns = 5\n')
    refused(cli("run", job), ExitCode.BAD_INPUT, "max_tokns", "max_tokens")
    job.write_text(f'input = "{tickets_csv}"\nprompt = "x"\nbatch_size = "many"\n')
    refused(cli("run", job), ExitCode.BAD_INPUT, "batch_size")
    job.write_text('input = "x.csv"\nprompt = \n')
    refused(cli("run", job), ExitCode.BAD_INPUT, "not valid TOML")
    assert emu.stats.create_calls == 0


def test_wrong_api_key(emu, cli, tmp_path, tickets_csv, monkeypatch):
    emu.config.api_key = "sk-ant-the-right-one"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-wrong-key-123")
    r = cli(*base(tickets_csv, tmp_path))
    refused(r, ExitCode.API_ERROR, "authentication failed", "ANTHROPIC_API_KEY")
    assert "sk-ant-wrong-key-123" not in r.output
    assert emu.stats.batches_created == 0


def test_missing_key(emu, cli, tmp_path, tickets_csv, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    refused(cli(*base(tickets_csv, tmp_path)), ExitCode.BAD_INPUT, "ANTHROPIC_API_KEY")


def test_plain_http_to_a_remote_host_is_refused(emu, cli, tmp_path, tickets_csv, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://api.example.com")
    refused(cli(*base(tickets_csv, tmp_path)), ExitCode.BAD_INPUT, "https is required", "api.example.com")


def test_output_in_a_read_only_directory_found_before_sending(emu, cli, tmp_path, tickets_csv):
    locked = tmp_path / "ro"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        r = cli("run", "--input", tickets_csv, "--output", locked / "o.parquet", "--prompt", "{{ body }}",
                "--state", tmp_path / "s.sqlite")
        refused(r, ExitCode.BAD_INPUT, "cannot write")
    finally:
        os.chmod(locked, 0o700)
    assert emu.stats.create_calls == 0


def test_unwritable_output_found_before_sending(emu, cli, tmp_path, tickets_csv):
    # a path under a regular file cannot be written, even by root
    (tmp_path / "afile").write_text("x")
    refused(cli("run", "--input", tickets_csv, "--output", tmp_path / "afile" / "o.parquet", "--prompt", "{{ body }}",
                "--state", tmp_path / "s.sqlite"), ExitCode.BAD_INPUT, "cannot write")
    # a directory where the file should be: empty, or holding other files
    (tmp_path / "adir.parquet").mkdir()
    refused(cli("run", "--input", tickets_csv, "--output", tmp_path / "adir.parquet", "--prompt", "{{ body }}"),
            ExitCode.BAD_INPUT, "directory")
    (tmp_path / "adir.parquet" / "notes.txt").write_text("mine")
    refused(cli("run", "--input", tickets_csv, "--output", tmp_path / "adir.parquet", "--prompt", "{{ body }}"),
            ExitCode.BAD_INPUT, "directory")
    assert (tmp_path / "adir.parquet" / "notes.txt").read_text() == "mine"
    assert emu.stats.create_calls == 0


def test_validate_finds_what_run_would_refuse(emu, cli, tmp_path):
    dup = tmp_path / "dup.csv"
    dup.write_text("id,body\na,x\nb,y\na,z\n")
    refused(cli("validate", "--input", dup, "--id-column", "id", "--prompt", "{{ body }}"),
            ExitCode.BAD_INPUT, "duplicate id 'a'")
    r = cli("validate", "--input", dup, "--prompt", "{{ body }}", "--show", "1")
    assert r.exit_code == 0 and "ok: 3 rows" in r.output and '"custom_id": "row-0"' in r.output
    assert emu.stats.create_calls == 0 and not (tmp_path / "batchrun-state.sqlite").exists()
