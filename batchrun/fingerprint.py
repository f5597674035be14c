"""An input's fingerprint (its job's identity, and the proof that the input a job writes is the one it planned):
a hash of its format, each file's size and bytes (local files) or size and modification time (remote URIs),
and its limit and shard. Standard library only, so that `run` starts hashing its input (`ahead`) while the
rest of batchrun is imported: hashlib reads and hashes a large file without the GIL.

A local input is hashed once per process while stat says its files are as they were (`_HASHED`): the planned
input is checked again after the plan reads it and around the output's write, and each check reads stat and
hashes the files again only if any of it differs: device, inode, size, modification and change times (ns).
Any write to a file moves its change time (ctime: the kernel sets it, no program can set it back); one that
lands within a timestamp's granularity of the hash might not, so a file changed less than _RACY_NS before it
was hashed is hashed again at every check (as git treats a file changed as its index was written: "racily
clean"). stat is read from an open descriptor, so that NFS revalidates what it caches (close-to-open).
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Optional

CSV_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".json")

_HASHED: dict = {}   # key (see local) -> digest
_BUSY: dict = {}     # key -> Event: that input is being hashed by another thread
_LOCK = threading.Lock()
_RACY_NS = 2_000_000_000


def input_format(path: str) -> str:
    lower = path.lower().rstrip("/")
    if lower.endswith(CSV_SUFFIXES):
        return "csv"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "unknown"


def digest(fmt: str, files: list, limit: Optional[int], shard: Optional[tuple]) -> str:
    """The fingerprint of an input's `files`: (name hashed (a dataset's file path; b"" for a single file), size,
    local path to read, or None and the remote file's modification time in ns)."""
    h = hashlib.sha256()
    h.update(fmt.encode())
    for name, size, path, mtime_ns in files:
        h.update(name)
        h.update(str(size).encode())
        if path is not None:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        else:  # remote: size and modification time stand in for the bytes
            h.update(str(mtime_ns).encode())
    if limit is not None:
        h.update(f"limit={limit}".encode())
    if shard is not None:
        h.update(f"shard={shard[0]}/{shard[1]}".encode())
    return h.hexdigest()


def local(fmt: str, files: list, limit: Optional[int], shard: Optional[tuple]) -> str:
    """digest() of local files, hashed again only when stat says they changed (see above); while another
    thread hashes the same input (`ahead`), its digest is waited for."""
    key = (fmt, limit, shard, tuple((name, file_identity(path)) for name, _, path, _ in files))
    with _LOCK:
        known, busy = _HASHED.get(key), _BUSY.get(key)
        if known is None and busy is None:
            _BUSY[key] = mine = threading.Event()
    if known is not None:
        return known
    if busy is not None:
        busy.wait()
        return local(fmt, files, limit, shard)   # (hashed there; or not kept, then hashed here)
    try:
        settled = time.time_ns() - _RACY_NS
        value = digest(fmt, files, limit, shard)
        if all(i[3] < settled and i[4] < settled for _, i in key[3]) and \
                key[3] == tuple((name, file_identity(path)) for name, _, path, _ in files):
            _HASHED[key] = value
        return value
    finally:
        with _LOCK:
            del _BUSY[key]
        mine.set()


def ahead(uri: Optional[str], limit: Optional[int], shard: Optional[tuple]) -> None:
    """Start hashing a local input file in a daemon thread, for the fingerprint the job asks for next (local()
    waits for it, or finds it done). Any failure is left to that fingerprint, which reads the file itself."""
    if not uri or "://" in uri or input_format(uri) == "unknown" or not os.path.isfile(uri):
        return

    def run() -> None:
        try:
            local(input_format(uri), [(b"", os.stat(uri).st_size, uri, None)], limit, shard)
        except Exception:  # noqa: BLE001 - see above
            pass

    threading.Thread(target=run, name="batchrun-fingerprint", daemon=True).start()


def file_identity(path: str) -> tuple:
    """What changes when a file is written or replaced: (device, inode, size, mtime, ctime), read from an open
    descriptor (ctime cannot be set back by the writer, as mtime can)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
