"""The benchmark's workflows (imported by ``bench_workflows`` and its worker, not autodiscovered).

The workload matches ``../shared/bench-peers``: a workflow of three steps that
each return a small JSON value, and a one-step workflow for latency.
"""

from __future__ import annotations

from typing import Any

from ..registry import workflow

NAMESPACE = "openworkflow-bench"
HOLD_NAMESPACE = "openworkflow-bench-hold"


@workflow(name="django_openworkflow.bench.three-steps")
def three_steps(ctx: Any) -> dict[str, int]:
    i = ctx.input["i"]
    for k in range(3):
        ctx.step.run(f"step-{k}", lambda k=k: {"i": i, "step": k})
    return {"i": i}


@workflow(name="django_openworkflow.bench.one-step")
def one_step(ctx: Any) -> dict[str, int]:
    i = ctx.input["i"]
    return ctx.step.run("step-0", lambda: {"i": i, "step": 0})  # type: ignore[no-any-return]
