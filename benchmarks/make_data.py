"""Write a realistic, deterministic CSV of support tickets for the benchmarks.

    python benchmarks/make_data.py 100000 benchmarks/work/tickets-100k.csv

Columns: ticket_id (a unique string id), customer, priority and account_age_days (ints), and three
text columns of 100-400 characters (subject, body, notes) with commas, quotes, an occasional
embedded newline and some non-ASCII text. The same N always gives the same bytes (seeded), and the
first rows of a larger file are the rows of a smaller one.
"""
from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

WORDS = ("billing refund login error crash invoice shipping delayed broken password reset charge twice "
         "feature request dark mode export csv slow page timeout thanks great support account locked "
         "order missing package tracking number update mobile app android iphone sync calendar email "
         "notification settings subscription cancel upgrade plan discount coupon receipt tax address "
         "warehouse courier damaged replacement warranty screen battery keyboard printer driver install").split()
EXTRAS = (', "quoted" part', ", and, commas", " — naïve café ✓", " (see attached)", " 李雷 asked again",
          "\nsecond line of the message")
NAMES = ("Zoë", "José", "李雷", "Ołeksandr", "Ana", "Müller", "Søren", "Émilie", "Nguyễn", "Ahmed",
         "Priya", "Kwame", "Olga", "Mateo", "Yuki", "Fatima", "Liam", "Chloé", "Björn", "Amara")
COLUMNS = ["ticket_id", "customer", "priority", "account_age_days", "subject", "body", "notes"]


def _phrases(rnd: random.Random, n: int) -> list[str]:
    """A pool of short phrases; texts are built from it (fast, and still varied)."""
    out = []
    for _ in range(n):
        words = [rnd.choice(WORDS) for _ in range(rnd.randint(4, 12))]
        phrase = " ".join(words)
        if rnd.random() < 0.15:
            phrase += rnd.choice(EXTRAS)
        out.append(phrase)
    return out


def _text(rnd: random.Random, pool: list[str], low: int, high: int, tag: str) -> str:
    target = rnd.randint(low, high)
    parts = [tag]
    size = len(tag)
    while size < target:
        p = pool[rnd.randrange(len(pool))]
        parts.append(p)
        size += len(p) + 2
    text = ". ".join(parts)
    return text[:high]


def rows(n: int, seed: int = 20261123):
    rnd = random.Random(seed)
    pool = _phrases(random.Random(seed + 1), 4000)
    tid = 100_000
    for i in range(n):
        tid += rnd.randint(1, 9)
        yield (
            f"T-{tid}",
            rnd.choice(NAMES),
            rnd.randint(1, 5),
            rnd.randint(0, 4000),
            _text(rnd, pool, 100, 200, f"#{i}"),
            _text(rnd, pool, 200, 400, f"ticket {i}"),
            _text(rnd, pool, 100, 300, "note"),
        )


def make(n: int, path: str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows(n))
    tmp.replace(out)
    return out


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python benchmarks/make_data.py N PATH")
    n = int(argv[0].replace("_", ""))
    out = make(n, argv[1])
    print(f"{out}: {n} rows, {out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
