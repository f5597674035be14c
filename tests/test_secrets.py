"""Issue 4, secrets: the API key is read cleanly, refused plainly, and appears in no output, error,
log line or debug traceback; the base URL's source is named; the state file is private."""
from __future__ import annotations

import logging
import os
import stat

import httpx
import pytest

from batchrun.api import ApiClient
from batchrun.errors import ApiError, ExitCode
from tests.conftest import PROMPT, refused

KEY = "sk-ant-api03-secret-value-0123456789"


def base(inp, tmp_path, *extra):
    return ["run", "--input", inp, "--output", tmp_path / "o.parquet", "--state", tmp_path / "s.sqlite",
            "--prompt", PROMPT, "--id-column", "ticket_id", "--model", "claude-haiku-4-5", "--max-tokens", "100",
            "--batch-size", "200", "--poll-interval", "0.1", *extra]


def assert_key_nowhere(key, result, tmp_path):
    for form in (key, key.strip(), repr(key)[1:-1], repr(key.strip().encode("utf-8", "replace"))[2:-1]):
        assert form not in result.output
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert key.strip().encode() not in path.read_bytes(), path


@pytest.mark.parametrize("raw", [KEY + "\n", f"  {KEY}\r\n", f"\t{KEY} "])
def test_a_key_with_surrounding_whitespace_is_used_stripped(emu, cli, tmp_path, tickets_csv, monkeypatch, raw):
    emu.config.api_key = KEY                      # the emulator accepts only the bare key
    monkeypatch.setenv("ANTHROPIC_API_KEY", raw)
    r = cli(*base(tickets_csv, tmp_path, "-v"))
    assert r.exit_code == 0, r.output
    assert "batchrun: error" not in r.output and "header" not in r.output
    assert_key_nowhere(raw, r, tmp_path)


@pytest.mark.parametrize("raw", [KEY[:10] + "é" + KEY[10:], KEY[:10] + "\n" + KEY[10:], KEY + "\x00",
                                 KEY[:10] + "\x7f" + KEY[10:], "sk-ant-x\u2028y"])
def test_a_key_that_cannot_be_a_header_is_refused_by_its_variable(emu, cli, tmp_path, tickets_csv, monkeypatch, raw):
    if "\x00" in raw:   # the environment cannot hold a NUL: only the flag can
        monkeypatch.delenv("ANTHROPIC_API_KEY")
        r = cli(*base(tickets_csv, tmp_path, "--api-key", raw))
        source = "--api-key"
    else:
        monkeypatch.setenv("ANTHROPIC_API_KEY", raw)
        r = cli(*base(tickets_csv, tmp_path))
        source = "ANTHROPIC_API_KEY"
    line = refused(r, ExitCode.BAD_INPUT, source, "cannot be sent in an HTTP header")
    assert line.startswith(f"batchrun: error: {source}:")
    assert "UnicodeEncodeError" not in r.output and "internal error" not in r.output
    assert_key_nowhere(raw, r, tmp_path)
    assert emu.stats.create_calls == 0


def test_a_flag_key_is_refused_by_the_flag(emu, cli, tmp_path, tickets_csv):
    r = cli(*base(tickets_csv, tmp_path, "--api-key", "sk-ant-ünïcode-key"))
    refused(r, ExitCode.BAD_INPUT, "--api-key:")
    assert "ünïcode" not in r.output
    r = cli(*base(tickets_csv, tmp_path, "--api-key", "   "))
    refused(r, ExitCode.BAD_INPUT, "no API key", "--api-key")


def test_an_error_reply_that_quotes_the_key_is_scrubbed(tmp_path):
    """A gateway that echoes the key in its error message: our exception (and so every line, log and
    output cell made from it) carries a redacted key."""
    def gateway(request):
        key = request.headers["x-api-key"]
        return httpx.Response(400, json={"type": "error", "error": {"type": "invalid_request_error",
                                                                     "message": f"bad key {key}!"}})

    api = ApiClient(api_key=KEY, base_url="https://gw.example", transport=httpx.MockTransport(gateway))
    with pytest.raises(ApiError) as failure:
        api.retrieve_batch("msgbatch_1")
    assert KEY not in str(failure.value) and "bad key sk-ant-…!" in str(failure.value)


def test_log_lines_are_scrubbed(capsys):
    from batchrun.cli.common import setup_logging
    from batchrun.errors import register_secret
    register_secret(KEY)
    setup_logging(verbose=True, quiet=False)
    log = logging.getLogger("batchrun.test")
    log.warning("a line with the key %s in it", KEY)
    try:
        raise RuntimeError(f"failed with {KEY}")
    except RuntimeError:
        log.exception("and a traceback")
    err = capsys.readouterr().err
    assert KEY not in err
    assert "a line with the key sk-ant-… in it" in err and "failed with sk-ant-…" in err


def test_debug_traceback_of_an_internal_error_is_scrubbed(emu, cli, tmp_path, tickets_csv, monkeypatch):
    """BATCHRUN_DEBUG=1 prints the traceback of a bug; the key in its message is redacted."""
    from batchrun import runner
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("BATCHRUN_DEBUG", "1")

    def buggy(self, wait=True):
        raise RuntimeError(f"a bug that quotes {os.environ['ANTHROPIC_API_KEY']}")

    monkeypatch.setattr(runner.Runner, "run", buggy)
    r = cli(*base(tickets_csv, tmp_path))
    assert r.exit_code == ExitCode.INTERNAL
    assert "Traceback" in r.output and "a bug that quotes sk-ant-…" in r.output
    assert KEY not in r.output


@pytest.mark.parametrize("how, source", [("flag", "--base-url"), ("env", "ANTHROPIC_BASE_URL")])
def test_an_insecure_base_url_names_where_it_came_from(emu, cli, tmp_path, tickets_csv, monkeypatch, how, source):
    url = "http://api.example.com"
    if how == "flag":
        r = cli(*base(tickets_csv, tmp_path, "--base-url", url))
    else:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", url)
        r = cli(*base(tickets_csv, tmp_path))
    refused(r, ExitCode.BAD_INPUT, f"{source}: https is required for api.example.com")
    assert emu.stats.create_calls == 0


def test_a_state_file_made_public_is_made_private_again(emu, cli, tmp_path, tickets_csv):
    state = tmp_path / "s.sqlite"
    r = cli(*base(tickets_csv, tmp_path, "--limit", "5"))
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    os.chmod(state, 0o644)                         # an older version, a copy, a umask, a careless chmod
    for extra in (tmp_path / "s.sqlite-wal", tmp_path / "s.sqlite-shm"):
        if extra.exists():
            os.chmod(extra, 0o644)
    r = cli(*base(tickets_csv, tmp_path, "--limit", "5"))
    assert r.exit_code == 0, r.output
    for path in (state, tmp_path / "s.sqlite-wal", tmp_path / "s.sqlite-shm"):
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
