"""batchrun against the floor, in one run on one machine, with the emulator on loopback.

    python benchmarks/bench.py                                  # floor vs batchrun at 100k; memory at 20k, 100k
    python benchmarks/bench.py --rows 20000,100000,1000000      # memory at 1M too (minutes)
    python benchmarks/bench.py --profile benchmarks/work/run.prof   # also one cProfile'd batchrun run

The emulator runs in its own process in its timing mode (`batchrun emulator --timing`: validation off,
batches that end at once, tokens counted by characters, a threading HTTP server), so that its own work
is small beside both contenders' (its CPU time during each run is printed); --faithful uses uvicorn
and tokens by words instead. Both contenders share the machine's cores with it.
Every run is a child process, started by a small spawner process (so that none inherits bench.py's
memory); its wall time is taken around it and its peak RSS from `wait4`.

* speed: at --compare rows, the floor (benchmarks/floor.py) and `batchrun run` alternately,
  --rounds times each; batchrun's output is checked row by row against the floor's (every input
  column with its type, the same ids in the same order, reply text, stop reason, model, token counts,
  cost and errors). Medians and the ratio are printed.
* memory: batchrun's peak RSS at each of --rows (one run each; the 100k figure is the speed run's
  largest when the sizes overlap).
* stages: read from batchrun's state file, not from added instrumentation:
    startup  process start → jobs.created_at            (imports, input fingerprint, locks)
    plan     jobs.created_at → jobs.planned_at           (read, render, insert every request)
    gap      jobs.planned_at → first batches.intent_at   (plan's commit, first pending-rows query)
    submit   first intent_at → last batch's created_at   (build payloads, POST, commit ids)
    collect  last created_at → last batches.collected_at (poll, download, parse, record results)
    write    last collected_at → jobs.output_written_at  (stream input again, join, Parquet)
    exit     output_written_at → process exit            (summary, close)
  The API's created_at comes from the emulator, on the same clock.

Prints figures; asserts nothing about them (a failed row check does stop it).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import floor  # noqa: E402  (the prompt, model and max_tokens are shared with the floor)

PY = sys.executable
BATCHRUN = [PY, "-c", "from batchrun.cli import main; main()"]


# ---- the emulator ---------------------------------------------------------------------------------
class EmulatorProcess:
    """`batchrun emulator FLAGS` in its own process on a free loopback port, once it answers (the other
    benchmarks start theirs with their own flags through it)."""

    def __init__(self, *flags: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(BATCHRUN + ["emulator", "--port", str(self.port), *flags],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.control("GET", "stats")
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise SystemExit("the emulator did not start")
                time.sleep(0.1)

    @classmethod
    def timing(cls, processing_seconds: float, faithful: bool = False) -> "EmulatorProcess":
        """--timing (the lean mode) unless `faithful` (then validation alone is off)."""
        return cls("--no-validate" if faithful else "--timing", "--processing-seconds", str(processing_seconds))

    def cpu(self) -> float:
        """CPU seconds (user + system) the emulator process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def control(self, method: str, what: str) -> dict:
        req = urllib.request.Request(f"{self.base_url}/_emulator/{what}", method=method,
                                     data=b"{}" if method == "POST" else None,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"{}")

    def reset(self) -> None:
        """Forget every batch (its memory would otherwise grow run after run)."""
        self.control("POST", "reset")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- one child process ------------------------------------------------------------------------------
# Children are started by this small process, not by bench.py itself: Linux counts in a child's peak
# RSS (ru_maxrss) the memory of the process it was forked from, and bench.py holds whole output tables
# while it compares them, which would be counted as the peak of every run after it.
SPAWNER = r"""
import json, os, sys, time
for line in sys.stdin:
    req = json.loads(line)
    with open(req["log"], "wb") as err:
        started_at, t0 = time.time(), time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(err.fileno(), 2)
            try:
                os.execvpe(req["argv"][0], req["argv"], req["env"])
            finally:
                os._exit(127)
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - t0
    print(json.dumps({"started_at": started_at, "wall": wall, "code": os.waitstatus_to_exitcode(status),
                      "maxrss_kib": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime}), flush=True)
"""
_spawner = None


LAST_CPU = [0.0]   # CPU seconds (user + system) of the last child timed


def timed(argv: list, env: dict, log: Path) -> tuple[float, float, float]:
    """(started at, wall seconds, peak RSS in MiB) of one child process; stops the bench if it fails.
    Its CPU seconds are left in LAST_CPU[0]."""
    global _spawner
    if _spawner is None:
        _spawner = subprocess.Popen([PY, "-c", SPAWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    _spawner.stdin.write(json.dumps({"argv": [str(a) for a in argv], "env": env, "log": str(log)}) + "\n")
    _spawner.stdin.flush()
    done = json.loads(_spawner.stdout.readline())
    if done["code"] != 0:
        raise SystemExit(f"failed ({done['code']}): {' '.join(map(str, argv))}\n{log.read_text()[-3000:]}")
    LAST_CPU[0] = done["cpu"]
    return done["started_at"], done["wall"], done["maxrss_kib"] / 1024  # ru_maxrss is in KiB on Linux


def batchrun_argv(data: Path, out: Path, state: Path, *, quiet: bool = True) -> list:
    return ["run", "--input", data, "--output", out, "--state", state, "--id-column", floor.ID_COLUMN,
            "--prompt", floor.JINJA_PROMPT, "--model", floor.MODEL, "--max-tokens", str(floor.MAX_TOKENS),
            "--batch-size", "10000", "--poll-interval", "0.2", "-q" if quiet else "-v"]


def fresh_state(state: Path) -> None:
    for p in state.parent.glob(state.name + "*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def stages(state: Path, started_at: float, ended_at: float) -> dict:
    ts = lambda s: dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    db = sqlite3.connect(state)
    try:
        created, planned, written = db.execute("SELECT created_at, planned_at, output_written_at FROM jobs").fetchone()
        first_intent, last_created, last_collected = db.execute(
            "SELECT min(intent_at), max(created_at), max(collected_at) FROM batches WHERE state = 'collected'").fetchone()
    finally:
        db.close()
    marks = [started_at, ts(created), ts(planned), ts(first_intent), ts(last_created), ts(last_collected),
             ts(written), ended_at]
    names = ["startup", "plan", "gap", "submit", "collect", "write", "exit"]
    return {n: b - a for n, a, b in zip(names, marks, marks[1:])}


def run_batchrun(data: Path, work: Path, tag: str, env: dict, emu: "EmulatorProcess") -> dict:
    out, state = work / f"batchrun-{tag}.parquet", work / f"state-{tag}.sqlite"
    fresh_state(state)
    cpu = emu.cpu()
    started_at, wall, rss = timed(BATCHRUN + batchrun_argv(data, out, state), env, work / f"batchrun-{tag}.log")
    emu_cpu = emu.cpu() - cpu
    st = stages(state, started_at, started_at + wall)
    state_mb = sum(p.stat().st_size for p in state.parent.glob(state.name + "*") if p.is_file()) / 1e6
    tables = state_tables(state)
    fresh_state(state)
    return {"wall": wall, "rss": rss, "stages": st, "output": out, "state_mb": state_mb, "emu_cpu": emu_cpu,
            "cpu": LAST_CPU[0], "tables": tables}


def state_tables(state: Path) -> dict:
    """MB of the state file per table and index (SQLite's dbstat; {} where it is not compiled in)."""
    db = sqlite3.connect(state)
    try:
        return {name: size / 1e6 for name, size in
                db.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name HAVING sum(pgsize) > 100000 "
                           "ORDER BY 2 DESC")}
    except sqlite3.Error:
        return {}
    finally:
        db.close()


def run_floor(data: Path, work: Path, tag: str, env: dict, emu: "EmulatorProcess") -> dict:
    out = work / f"floor-{tag}.parquet"
    cpu = emu.cpu()
    _, wall, rss = timed([PY, HERE / "floor.py", data, out], env, work / f"floor-{tag}.log")
    return {"wall": wall, "rss": rss, "output": out, "emu_cpu": emu.cpu() - cpu, "cpu": LAST_CPU[0]}


def startup_times(work: Path, env: dict, repeat: int = 5) -> dict:
    """Median wall time of `batchrun --help`, `batchrun jobs` and `batchrun status` on a small state file."""
    state = work / "state-startup.sqlite"
    fresh_state(state)
    data = work / "startup.csv"
    data.write_text("id,text\n1,hello\n")
    timed(BATCHRUN + ["run", "--input", data, "--output", work / "startup.parquet", "--state", state,
                      "--prompt", "Say {{ text }}", "--model", floor.MODEL, "--poll-interval", "0.1", "-q"],
          env, work / "startup.log")
    out = {}
    for name, argv in (("--help", ["--help"]), ("jobs", ["jobs", "--state", state]),
                       ("status", ["status", "--state", state])):
        walls, cpus = [], []
        for _ in range(repeat):
            walls.append(timed([Path(PY).parent / "batchrun"] + argv, env, work / "startup.log")[1])
            cpus.append(LAST_CPU[0])
        out[name] = (statistics.median(walls), statistics.median(cpus))
    fresh_state(state)
    return out


RESULT_COLUMNS = ("custom_id", "status", "text", "stop_reason", "model", "input_tokens", "output_tokens",
                  "error_type", "error_message")


def same_rows(ours: Path, theirs: Path, rows: int) -> None:
    """batchrun's output against the floor's, row by row: every input column (values and types) and every
    result column both write, but batch_id (each names its own batches); cost_usd to the last cent-millionth."""
    a, b = pq.read_table(ours), pq.read_table(theirs)
    assert a.num_rows == b.num_rows == rows, (a.num_rows, b.num_rows, rows)
    for col in b.column_names:
        if col == "batch_id":
            continue
        if col not in a.column_names:
            raise SystemExit(f"batchrun's output lacks the floor's column {col!r}")
        if col == "cost_usd":
            worst = max(abs(x - y) for x, y in zip(a.column(col).to_pylist(), b.column(col).to_pylist()))
            if worst > 1e-12:
                raise SystemExit(f"batchrun's cost_usd differs from the floor's by up to {worst}")
        elif col in RESULT_COLUMNS:   # values (the floor's all-null columns have Arrow's null type)
            if a.column(col).to_pylist() != b.column(col).to_pylist():
                raise SystemExit(f"batchrun's output differs from the floor's in column {col!r}")
        elif not a.column(col).equals(b.column(col)):   # input columns: values and types
            raise SystemExit(f"batchrun's output differs from the floor's in input column {col!r}")
    if set(a.column("status").to_pylist()) != {"succeeded"}:
        raise SystemExit("batchrun's output has rows that did not succeed")


def dataset(rows: int, work: Path) -> Path:
    data = work / f"tickets-{rows}.csv"
    if not data.exists():
        subprocess.run([PY, HERE / "make_data.py", str(rows), data], check=True, stdout=subprocess.DEVNULL)
    return data


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")), "0")
    return (f"{os.cpu_count()} cores ({cpu}), {int(mem) / 2**20:.0f} GiB RAM, Python {platform.python_version()}, "
            f"pyarrow {pyarrow.__version__}, {platform.platform()}")


def profile(data: Path, work: Path, env: dict, out: Path) -> None:
    """One batchrun run under cProfile, its stats saved to `out` and the top printed."""
    state = work / "state-profile.sqlite"
    fresh_state(state)
    argv = [str(a) for a in ["batchrun"] + batchrun_argv(data, work / "batchrun-profile.parquet", state)]
    code = ("import cProfile, sys; sys.argv = " + repr(argv) + "\n"
            "from batchrun.cli import main\n"
            "cProfile.run('main()', " + repr(str(out)) + ")\n")
    _, wall, _ = timed([PY, "-c", code], env, work / "batchrun-profile.log")
    fresh_state(state)
    import pstats
    print(f"\ncProfile of one batchrun run ({wall:.1f} s under the profiler), saved to {out}:")
    stats = pstats.Stats(str(out))
    stats.sort_stats("tottime").print_stats(25)


def compare(n: int, rounds: int, work: Path, env: dict, emu: "EmulatorProcess") -> dict:
    """The floor and batchrun alternately, `rounds` times each, at n rows; batchrun's output checked."""
    data = dataset(n, work)
    floors, ours = [], []
    for i in range(rounds):
        emu.reset()
        floors.append(run_floor(data, work, f"{n}", env, emu))
        emu.reset()
        ours.append(run_batchrun(data, work, f"{n}", env, emu))
        same_rows(ours[-1]["output"], floors[-1]["output"], n)
        f, o = floors[-1], ours[-1]
        print(f"  {n:,} rows, round {i + 1}: floor {f['wall']:.2f} s (CPU {f['cpu']:.2f} s; emulator CPU "
              f"{f['emu_cpu']:.2f} s), batchrun {o['wall']:.2f} s (CPU {o['cpu']:.2f} s; emulator CPU "
              f"{o['emu_cpu']:.2f} s): {o['wall'] / f['wall']:.2f}x; output = floor's, row by row", flush=True)
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    f, b = med(floors, "wall"), med(ours, "wall")
    names = list(ours[0]["stages"])
    return {"n": n, "floor": f, "batchrun": b, "ratio": b / f, "rounds": rounds,
            "floor_cpu": med(floors, "cpu"), "batchrun_cpu": med(ours, "cpu"),
            "floor_best": min(r["wall"] for r in floors), "batchrun_best": min(r["wall"] for r in ours),
            "floor_emu_cpu": med(floors, "emu_cpu"), "batchrun_emu_cpu": med(ours, "emu_cpu"),
            "floor_rss": max(r["rss"] for r in floors), "rss": max(r["rss"] for r in ours),
            "state_mb": ours[-1]["state_mb"], "input_mb": data.stat().st_size / 1e6, "tables": ours[-1]["tables"],
            "stages": {k: statistics.median(r["stages"][k] for r in ours) for k in names}}


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="20000,100000", help="sizes for peak memory (default: 20000,100000)")
    ap.add_argument("--compare", default="100000",
                    help="sizes of the floor-vs-batchrun runs, comma-separated (default: 100000; 0: none)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each contender at the first --compare size")
    ap.add_argument("--large-rounds", type=int, default=1, help="runs of each contender at larger --compare sizes")
    ap.add_argument("--processing-seconds", type=float, default=0.0, help="how long the emulator keeps a batch")
    ap.add_argument("--faithful", action="store_true",
                    help="the emulator's faithful mode (uvicorn, tokens by words; validation still off) "
                         "instead of its timing mode")
    ap.add_argument("--no-startup", action="store_true", help="skip timing the CLI's start-up")
    ap.add_argument("--work", default=str(HERE / "work"), help="data, outputs and logs (kept: data is reused)")
    ap.add_argument("--profile", metavar="PATH", help="also run batchrun once under cProfile at --compare rows")
    args = ap.parse_args()
    sizes = [int(r.replace("_", "")) for r in args.rows.split(",") if r]
    compare_sizes = [int(r.replace("_", "")) for r in args.compare.split(",") if r and int(r.replace("_", ""))]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    print(f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {machine()}; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    mode = "faithful mode (uvicorn, tokens by words)" if args.faithful else \
        "timing mode (threading HTTP server, tokens by characters)"
    print(f"emulator: own process, {mode}, validation off, batches end after {args.processing_seconds} s; "
          f"job: {floor.JINJA_PROMPT!r}, max_tokens {floor.MAX_TOKENS}, batches of 10,000, poll interval 0.2 s")
    emu = EmulatorProcess.timing(args.processing_seconds, faithful=args.faithful)
    env = dict(os.environ, ANTHROPIC_BASE_URL=emu.base_url, ANTHROPIC_API_KEY="bench-key")
    peaks: dict = {}
    results: list = []
    states: dict = {}
    try:
        for k, n in enumerate(compare_sizes):
            r = compare(n, args.rounds if k == 0 else args.large_rounds, work, env, emu)
            results.append(r)
            peaks[n] = r["rss"]
            states[n] = (r["state_mb"], r["input_mb"], r["tables"])
        for n in sizes:
            if n in peaks:
                continue
            emu.reset()
            data = dataset(n, work)
            r = run_batchrun(data, work, f"{n}", env, emu)
            peaks[n] = r["rss"]
            states[n] = (r["state_mb"], data.stat().st_size / 1e6, r["tables"])
            print(f"{n:>9,} rows: batchrun {r['wall']:.1f} s, peak RSS {r['rss']:.0f} MiB, state file "
                  f"{r['state_mb']:.0f} MB; stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items()),
                  flush=True)
        startup = {} if args.no_startup else startup_times(work, env)
        if args.profile:
            emu.reset()
            profile(dataset(compare_sizes[0] if compare_sizes else 100_000, work), work, env, Path(args.profile))
    finally:
        emu.stop()

    print("\nagainst the targets (issue #17):")
    for r in results:
        print(f"  {r['n']:>9,} rows: floor {r['floor']:.2f} s, batchrun {r['batchrun']:.2f} s: ratio {r['ratio']:.2f}x "
              f"(target <= 1.3x: {verdict(r['ratio'] <= 1.3)}; medians of {r['rounds']}; best of each: "
              f"{r['batchrun_best'] / r['floor_best']:.2f}x)")
        print(f"             CPU (user + system): floor {r['floor_cpu']:.2f} s, batchrun {r['batchrun_cpu']:.2f} s: "
              f"{r['batchrun_cpu'] / r['floor_cpu']:.2f}x (less sensitive to a loaded machine than wall time)")
        share = r["floor_emu_cpu"] / r["floor"]
        print(f"             emulator CPU: {r['floor_emu_cpu']:.2f} s beside the floor ({share:.0%} of its wall time; "
              f"target < 25%: {verdict(share < 0.25)}), {r['batchrun_emu_cpu']:.2f} s beside batchrun")
        print(f"             peak RSS: floor {r['floor_rss']:.0f} MiB, batchrun {r['rss']:.0f} MiB")
        print("             batchrun stages (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items()))
    for n in sorted(states):
        st, inp, tables = states[n]
        print(f"  {n:>9,} rows: state file {st:.1f} MB, input {inp:.1f} MB: {st / inp:.2f}x the input "
              f"(target <= 1: {verdict(st <= inp)})")
        if tables:
            print("             by table/index (MB): " + ", ".join(f"{k} {v:.1f}" for k, v in tables.items()))
    print("  peak RSS of batchrun: " + ", ".join(f"{n:,} rows {peaks[n]:.0f} MiB" for n in sorted(peaks)))
    if 20_000 in peaks and 100_000 in peaks:
        x = peaks[100_000] / peaks[20_000]
        print(f"  peak(100k) / peak(20k) = {x:.2f} (target <= 1.3: {verdict(x <= 1.3)})")
    if 1_000_000 in peaks:
        mb = peaks[1_000_000] * 2**20 / 1e6
        print(f"  peak(1M) = {peaks[1_000_000]:.0f} MiB = {mb:.0f} MB (target < 400 MB: {verdict(mb < 400)})")
    for name, (t, cpu) in startup.items():
        print(f"  batchrun {name}: starts and ends in {t:.3f} s, {cpu:.3f} s of CPU (medians of 5; "
              f"target < 0.25 s: {verdict(t < 0.25)})")
    print("  (messages mode at the rate limit: benchmarks/messages_rpm.py)")


if __name__ == "__main__":
    main()
