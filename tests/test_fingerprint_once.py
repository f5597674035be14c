"""The planned input's checks (after the plan reads it, before and after the output's write) hash a local input
again only when stat says its files changed, or changed too recently for their timestamps to tell
(fingerprint._HASHED): the same fingerprint, a file's bytes read once per process while it stays as it was."""
from __future__ import annotations

import os
import time

import pytest

import batchrun.fingerprint as fingerprint
from batchrun.inputs import InputSource


@pytest.fixture
def hashes(monkeypatch):
    """Counts the times an input's bytes are hashed; the cache starts empty."""
    monkeypatch.setattr(fingerprint, "_HASHED", {})
    seen = []
    digest = fingerprint.digest

    def counted(fmt, files, limit, shard):
        seen.append(files)
        return digest(fmt, files, limit, shard)

    monkeypatch.setattr(fingerprint, "digest", counted)
    return seen


def written(path, text):
    path.write_text(text)
    time.sleep(0.05)   # (past the file system's timestamp granularity)
    return str(path)


def test_an_unchanged_file_is_hashed_once(tmp_path, hashes, monkeypatch):
    monkeypatch.setattr(fingerprint, "_RACY_NS", 0)
    path = written(tmp_path / "in.csv", "id,body\n1,a\n2,b\n")
    first = InputSource(path).fingerprint()
    assert InputSource(path).fingerprint() == first and InputSource(path).fingerprint() == first
    assert len(hashes) == 1
    assert InputSource(path, limit=1).fingerprint() != first and len(hashes) == 2   # another input: hashed


def test_a_changed_file_is_hashed_again_even_with_its_size_and_mtime_kept(tmp_path, hashes, monkeypatch):
    monkeypatch.setattr(fingerprint, "_RACY_NS", 0)
    path = written(tmp_path / "in.csv", "id,body\n1,a\n2,b\n")
    first = InputSource(path).fingerprint()
    st = os.stat(path)
    written(tmp_path / "in.csv", "id,body\n1,a\n2,c\n")   # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))    # its modification time put back (ctime moves)
    assert InputSource(path).fingerprint() != first and len(hashes) == 2


def test_a_file_changed_just_before_it_was_hashed_is_hashed_at_every_check(tmp_path, hashes):
    path = written(tmp_path / "in.csv", "id,body\n1,a\n")   # changed less than _RACY_NS ago
    first = InputSource(path).fingerprint()
    assert InputSource(path).fingerprint() == first and len(hashes) == 2


def test_a_dataset_directory_with_a_file_added_is_hashed_again(tmp_path, hashes, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    monkeypatch.setattr(fingerprint, "_RACY_NS", 0)
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"id": ["1"], "body": ["a"]}), tmp_path / "data" / "a.parquet")
    time.sleep(0.05)
    first = InputSource(str(tmp_path / "data")).fingerprint()
    assert InputSource(str(tmp_path / "data")).fingerprint() == first and len(hashes) == 1
    pq.write_table(pa.table({"id": ["2"], "body": ["b"]}), tmp_path / "data" / "b.parquet")
    assert InputSource(str(tmp_path / "data")).fingerprint() != first and len(hashes) == 2


def test_hashed_ahead_while_batchrun_imports_then_found_done(tmp_path, hashes, monkeypatch):
    monkeypatch.setattr(fingerprint, "_RACY_NS", 0)
    path = written(tmp_path / "in.csv", "id,body\n1,a\n2,b\n")
    fingerprint.ahead(path, None, None)
    assert InputSource(path).fingerprint() == fingerprint.digest("csv", [(b"", os.stat(path).st_size, path, None)],
                                                                   None, None)
    assert len(hashes) == 2   # once ahead (the source's fingerprint waited for it, or found it), once above
    fingerprint.ahead(str(tmp_path / "missing.csv"), None, None)   # nothing to hash: nothing done, no error
