"""The request hash is byte-identical to the one state files already in use hold (issue #17: the plan's
speed-ups must not change it, or answers already paid for would no longer be found again).

The expected values were computed by the code before those speed-ups (commit 6e7e31a) for this job."""
from __future__ import annotations

import sqlite3

EXPECTED = {"A1": "caeaa91d8c854f4738dafc913a504b2bac005cea6a937f50c553efbcfe48fe8a",
            "A2": "4b26239bc9db8e8490aa982d156630df3270ec290bd34f13519b214db9020c7d",
            "A3": "b03cafc67e1a1f29352544ed65156f276859d960984293ac8cf90a9e14138be3"}


def test_request_hashes_are_the_ones_stored_before(emu, cli, tmp_path):
    data = tmp_path / "in.csv"
    data.write_text('id,title,body\nA1,Zoë,"naïve café ✓, ""quoted""\nsecond line"\nA2,李雷,plain\nA3,,\n',
                    encoding="utf-8")
    state = tmp_path / "s.sqlite"
    r = cli("run", "--input", data, "--output", tmp_path / "out.parquet", "--state", state, "--id-column", "id",
            "--prompt", "Review {{ title }}: {{ body }}", "--system", "Be brief.", "--max-tokens", "64",
            "--poll-interval", "0.05", "-q")
    assert r.exit_code == 0, r.output
    with sqlite3.connect(state) as db:
        got = dict(db.execute("SELECT custom_id, params_hash FROM requests ORDER BY row_index"))
    assert got == EXPECTED
