"""A/B benchmark of two revisions in one sitting, interleaved: A, B, A, B, ...

Usage (``make bench-ab BASE=<git ref>``)::

    python scripts/bench_ab.py BASE [--rounds 4] [--runs 1000] [--variants worker_running]

A is ``BASE`` checked out into a temporary git worktree, B the working tree.
Each round runs ``manage.py bench_workflows`` once for each side (C = 10 and
50, the worker-running variant, and latency), each side on a database of its
own (``openworkflow_bench_a``/``_b``, created and migrated by its own code), so
load that drifts during the sitting hits both sides alike. Prints the median
of each measure per side and B/A (for a queue-limit variant given with
``--variants``, its ratio to the unlimited throughput too); the JSON lines land in
``bench-results/ab-a.jsonl`` and ``ab-b.jsonl``.

With ``--history N``, side B runs on a database whose tables also hold N
finished runs (``bench_workflows --history``; ``openworkflow_bench_history``,
filled once and kept): ``make bench-ab BASE=HEAD BENCH_AB_ARGS="--history
1000000"`` measures what a long history costs the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-results"
SERVER = os.environ.get("BENCH_SERVER", "postgres://postgres@127.0.0.1:5432")
MEASURES = [
    ("runs/s C=10", "worker_running", 10, "runs_per_s"),
    ("runs/s C=50", "worker_running", 50, "runs_per_s"),
    ("latency p50 ms", "latency_idle_worker", None, "p50_ms"),
    ("latency p95 ms", "latency_idle_worker", None, "p95_ms"),
    ("commits per run C=10", "worker_running", 10, "db_commits_per_run"),
    ("WAL bytes per run C=10", "worker_running", 10, "wal_bytes_per_run"),
]


def createdb(name: str) -> None:
    exists = subprocess.run(
        [
            "psql",
            f"{SERVER}/postgres",
            "-tAc",
            f"SELECT 1 FROM pg_database WHERE datname = '{name}'",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    if exists.stdout.strip() != "1":
        subprocess.run(["psql", f"{SERVER}/postgres", "-c", f"CREATE DATABASE {name}"], check=True)


def bench(tree: Path, database: str, runs: int, variants: str, out: Path, extra: list[str]) -> None:
    env = {**os.environ, "DATABASE_URL": f"{SERVER}/{database}", "DEBUG": "false"}
    env["PYTHONPATH"] = str(tree)  # that side's package, not the installed one
    python = sys.executable
    subprocess.run(
        [python, "manage.py", "migrate", "--verbosity", "0"], cwd=tree, env=env, check=True
    )
    command = [
        python, "manage.py", "bench_workflows", "--concurrency", "10,50", "--reps", "1",
        "--runs", str(runs), "--variants", variants, "--latency-runs", "50", *extra,
    ]  # fmt: skip
    with open(out, "a") as lines:
        subprocess.run(command, cwd=tree, env=env, stdout=lines, check=True)


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def median(rows: list[dict], variant: str, concurrency: int | None, key: str) -> float | None:
    values = [
        r[key]
        for r in rows
        if r.get("variant") == variant
        and (concurrency is None or r.get("concurrency") == concurrency)
        and r.get(key) is not None
    ]
    return statistics.median(values) if values else None


def show(value: float | None, key: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if key == "ratio" else f"{value:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="git ref of side A")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument(
        "--variants",
        default="worker_running",
        help="bench_workflows --variants (default: worker_running)",
    )
    parser.add_argument(
        "--history",
        type=int,
        default=0,
        help="side B's tables also hold this many finished runs (default: 0)",
    )
    args = parser.parse_args()
    databases = {"a": "openworkflow_bench_a", "b": "openworkflow_bench_b"}
    extra: dict[str, list[str]] = {"a": [], "b": []}
    if args.history:
        databases["b"] = "openworkflow_bench_history"
        extra["b"] = ["--history", str(args.history)]
    OUT.mkdir(exist_ok=True)
    files = {side: OUT / f"ab-{side}.jsonl" for side in "ab"}
    for path in files.values():
        path.write_text("")
    for side in "ab":
        createdb(databases[side])
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "a"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT, check=True
        )
        try:
            trees = {"a": base, "b": ROOT}
            for round_ in range(args.rounds):
                for side in "ab" if round_ % 2 == 0 else "ba":
                    print(f"round {round_ + 1}/{args.rounds}: {side.upper()}", flush=True)
                    bench(
                        trees[side], databases[side], args.runs, args.variants, files[side],
                        extra[side],
                    )  # fmt: skip
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=True
            )
    rows = {side: load(path) for side, path in files.items()}
    b_side = "working tree" + (f" with {args.history:,} finished runs" if args.history else "")
    print(f"\nA = {args.base}, B = {b_side}; median of {args.rounds} interleaved rounds\n")
    print("| measure | A | B | B/A |\n|---|---|---|---|")
    measures = list(MEASURES)
    for variant in args.variants.split(","):
        if variant not in ("worker_running", "enqueue_first"):
            for c in (10, 50):
                measures.append((f"{variant} runs/s C={c}", variant, c, "runs_per_s"))
                measures.append((f"{variant} ratio C={c}", variant, c, "ratio"))
    for label, variant, concurrency, key in measures:
        a, b = (median(rows[side], variant, concurrency, key) for side in "ab")
        change = "-" if a is None or b is None or not a else f"{b / a:.2f}"
        print(f"| {label} | {show(a, key)} | {show(b, key)} | {change} |")


if __name__ == "__main__":
    main()
