"""Run our benchmark and the peers' back to back, then print one table with ratios.

Usage (``make bench-compare``)::

    python scripts/bench_compare.py [--skip-peers] [--skip-ours] [--skip-queues] [--reps 3]

Ours: ``manage.py bench_workflows`` on ``BENCH_URL``; the peers' harness is
``PEERS_DIR`` (default ``../shared/bench-peers``). (C = 10 and 50, both
variants, and latency; then the queue-limit variants against our unlimited
``enqueue_first``, ours alone). Peers: ``../shared/bench-peers/run_all.sh``
with the steps that match (OpenWorkflow, DBOS with a 10 ms poll, pgbench).
The JSON lines land in ``bench-results/`` and the tables are printed and
written to ``bench-results/compare.md``. Only figures from the same sitting
are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-results"
PEERS = Path(os.environ.get("PEERS_DIR", ROOT.parent / "shared" / "bench-peers"))
PEERS_WORKDIR = Path(os.environ.get("PEERS_WORKDIR", "/tmp/bench-peers"))
BENCH_URL = os.environ.get("BENCH_URL", "postgres://postgres@127.0.0.1:5432/openworkflow_bench")
PEER_STEPS = "pgbench openworkflow_c10 dbos_poll10ms_c10 openworkflow_c50 dbos_poll10ms_c50"
OURS = "django-openworkflow"
OURS_BULK = "django-openworkflow (start_many)"
OW = "openworkflow"
DBOS = "dbos_poll10ms"
PLAIN = "enqueue_first,worker_running"
LIMITS = "queue_concurrency,key_concurrency,rate_limit"


def run_ours(reps: int, queues: bool = True) -> None:
    env = {**os.environ, "DATABASE_URL": BENCH_URL}
    python = sys.executable
    subprocess.run(
        [python, "manage.py", "migrate", "--verbosity", "0"], cwd=ROOT, env=env, check=True
    )
    common = [python, "manage.py", "bench_workflows", "--concurrency", "10,50", "--reps", str(reps)]
    with open(OUT / "ours.jsonl", "w") as out:
        # start() per run from 10 threads, as the peers' drivers enqueue; then the bulk API
        variants = f"{PLAIN},{LIMITS}" if queues else PLAIN
        subprocess.run(
            [*common, "--variants", variants, "--latency-runs", "50"],
            cwd=ROOT,
            env=env,
            stdout=out,
            check=True,
        )
        subprocess.run(
            [*common, "--skip-latency", "--enqueue", "bulk", "--system-label", OURS_BULK],
            cwd=ROOT,
            env=env,
            stdout=out,
            check=True,
        )


def run_peers(reps: int) -> None:
    if not (PEERS / "run_all.sh").exists():
        sys.exit(f"bench-compare: no peer benchmark at {PEERS}; set PEERS_DIR to its folder")
    env = {**os.environ, "ONLY": PEER_STEPS, "REPS": str(reps), "PEERS_WORKDIR": str(PEERS_WORKDIR)}
    subprocess.run(["bash", str(PEERS / "run_all.sh")], env=env, check=True)
    (OUT / "peers.jsonl").write_text((PEERS_WORKDIR / "results.jsonl").read_text())


def load(name: str) -> list[dict]:
    path = OUT / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def median(rows: list[dict], system: str, variant: str, concurrency: int | None, key: str):
    values = [
        r[key]
        for r in rows
        if r.get("system") == system
        and r.get("variant") == variant
        and (concurrency is None or r.get("concurrency") == concurrency)
        and r.get(key) is not None
    ]
    return statistics.median(values) if values else None


def fmt(value, digits=1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def ratio(a, b) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def table(rows: list[dict]) -> str:
    lines = [
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} "
        f"({os.cpu_count()} cores), PostgreSQL on 127.0.0.1, W = 1000 runs x 3 steps, "
        "median of repeats.",
        "",
        "| measure | ours, start() | ours, start_many() | OpenWorkflow | DBOS (10 ms poll) "
        "| ours / OpenWorkflow | ours / DBOS |",
        "|---|---|---|---|---|---|---|",
    ]
    systems = (OURS, OURS_BULK, OW, DBOS)

    def row(label: str, values: list, digits: int = 1, suffix: str = "") -> None:
        if label.startswith(("latency", "commits")):  # lower is better: compare start()
            best = values[0]
        else:
            best = max((v for v in values[:2] if v is not None), default=None)
        lines.append(
            f"| {label} | "
            + " | ".join("-" if v is None else fmt(v, digits) + suffix for v in values)
            + f" | {ratio(best, values[2])} | {ratio(best, values[3])} |"
        )

    for concurrency in (10, 50):
        for variant in ("enqueue_first", "worker_running"):
            row(
                f"runs/s, C={concurrency}, {variant}",
                [median(rows, s, variant, concurrency, "runs_per_s") for s in systems],
            )
    for key, label in (("p50_ms", "latency p50 ms"), ("p95_ms", "latency p95 ms")):
        row(label, [median(rows, s, "latency_idle_worker", None, key) for s in systems])
    row(
        "commits per 3-step run (C=10, worker_running)",
        [median(rows, s, "worker_running", 10, "db_commits_per_run") for s in systems],
    )
    pgbench = median(rows, "pgbench", "durable_step_txn", 10, "tps")
    steps = [median(rows, s, "worker_running", 10, "steps_per_s") for s in systems]
    share = [None if v is None or not pgbench else 100 * v / pgbench for v in steps]
    row(f"steps/s (C=10) as % of pgbench durable-step TPS ({fmt(pgbench, 0)})", share, 0, " %")
    lines.append("")
    lines.append(
        "Ratios take ours at its best of the two enqueue modes for throughput, "
        "and start() for latency and commits."
    )
    return "\n".join(lines) + "\n"


def queue_table(rows: list[dict]) -> str:
    """The queue-limit variants (ours, start()): ratio of medians, verdict on it."""
    limited = [r for r in rows if r.get("system") == OURS and r.get("queue_limits")]
    if not limited:
        return ""
    lines = [
        "Queue limits (ours, start(), enqueue first; C = the worker's concurrency; "
        "medians of repeats, against the unlimited enqueue first above):",
        "",
        "| variant | C | runs/s | unlimited runs/s | ratio | first starts/s (steady) "
        "| needs | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for concurrency in (10, 50):
        unlimited = median(rows, OURS, "enqueue_first", concurrency, "runs_per_s")
        for variant in ("queue_concurrency", "key_concurrency", "rate_limit"):
            same = [
                r for r in limited if (r["variant"], r["concurrency"]) == (variant, concurrency)
            ]
            if not same:
                continue
            runs_per_s = median(same, OURS, variant, concurrency, "runs_per_s")
            share = runs_per_s / unlimited if runs_per_s is not None and unlimited else None
            started = median(same, OURS, variant, concurrency, "started_per_s")
            if variant == "rate_limit":
                label = f"rate limit {same[0]['rate_limit']}"
                limit, tolerance = same[0]["rate_limit_per_s"], same[0]["rate_tolerance_pct"]
                error = None if started is None else 100 * (started / limit - 1)
                needs = f"{fmt(limit)}/s within {tolerance:g} %"
                ok = error is not None and abs(error) <= tolerance
                verdict = "-" if error is None else f"{error:+.1f} %: " + ("pass" if ok else "fail")
            else:
                label = ", ".join(f"{k} {v}" for k, v in same[0]["queue_limits"].items())
                if "concurrency_keys" in same[0]:
                    label += f", {same[0]['concurrency_keys']} keys"
                needs = f">= {same[0]['min_ratio']:.2f}"
                ok = share is not None and share >= same[0]["min_ratio"]
                verdict = "pass" if ok else "fail"
            lines.append(
                f"| {label} | {concurrency} | {fmt(runs_per_s)} | {fmt(unlimited)} "
                f"| {fmt(share, 2)} | {fmt(started)} | {needs} | {verdict} |"
            )
    lines.append("")
    lines.append(
        "The rate of first starts counts WorkflowRun.started_at over whole windows of the "
        "limit, from one window after the first start to the last whole window before the "
        "last start (see django_openworkflow/loadtest/limits.py)."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument(
        "--skip-queues", action="store_true", help="Leave out the queue-limit variants."
    )
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    if not args.skip_peers:
        run_peers(args.reps)
    if not args.skip_ours:
        run_ours(args.reps, queues=not args.skip_queues)
    rows = load("peers.jsonl") + load("ours.jsonl")
    text = table(rows)
    queues = queue_table(rows)
    if queues:
        text += "\n" + queues
    (OUT / "compare.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
