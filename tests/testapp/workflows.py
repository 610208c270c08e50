"""Workflows the test suite runs. Step functions record side effects in SideEffect."""

from __future__ import annotations

import asyncio
import datetime
import os
import sys
import threading
import time
import uuid
from pathlib import Path

from django.db import transaction

from django_openworkflow import RetryPolicy, Schedule, StepFailed, workflow

from .models import Ledger, SideEffect

FAST = RetryPolicy(initial_interval="10ms", backoff_coefficient=2.0, maximum_interval="50ms")


def effect(ctx, step):
    SideEffect.objects.create(run_id=ctx.run_id, step=step, pid=os.getpid())


@workflow(name="three-steps")
def three_steps(ctx):
    total = 0
    for i in range(3):

        def step(i=i):
            effect(ctx, f"s{i}")
            return {"i": ctx.input["i"] if ctx.input else 0, "step": i}

        total += ctx.step.run(f"s{i}", step)["step"]
    return {"total": total}


@workflow(name="echo")
def echo(ctx):
    return ctx.step.run("echo", lambda: ctx.input)


@workflow(name="flaky")
def flaky(ctx):
    """Fails its step ctx.input['failures'] times, then succeeds."""

    def step():
        effect(ctx, "flaky")
        done = SideEffect.objects.filter(run_id=ctx.run_id, step="flaky").count()
        if done <= ctx.input["failures"]:
            raise ValueError(f"boom {done}")
        return done

    policy = RetryPolicy(
        initial_interval=ctx.input.get("initial", "10ms"),
        backoff_coefficient=2.0,
        maximum_interval="1m",
        maximum_attempts=ctx.input.get("attempts", 10),
    )
    return ctx.step.run("flaky", step, retry_policy=policy)


@workflow(name="catches-step-failure")
def catches_step_failure(ctx):
    from django_openworkflow import StepFailed

    def bad():
        effect(ctx, "bad")
        raise RuntimeError("always")

    try:
        ctx.step.run("bad", bad, retry_policy=RetryPolicy(maximum_attempts=2, initial_interval=0))
    except StepFailed as exc:
        message = str(exc)
    else:
        message = "unreachable"
    ctx.step.sleep("pause", "10ms")  # forces a replay: the step must raise again, unexecuted
    return ctx.step.run("compensate", lambda: {"compensated": message})


@workflow(
    name="workflow-retries", retry_policy=RetryPolicy(maximum_attempts=3, initial_interval="10ms")
)
def workflow_retries(ctx):
    ctx.step.run("first", lambda: effect(ctx, "first") or 1)
    raise KeyError("workflow code failed")


@workflow(name="sleeper")
def sleeper(ctx):
    ctx.step.run("before", lambda: effect(ctx, "before") or 1)
    ctx.step.sleep("nap", ctx.input.get("sleep", "300ms"))
    return ctx.step.run("after", lambda: effect(ctx, "after") or 2)


@workflow(name="bad-result")
def bad_result(ctx):
    return ctx.step.run("bad", lambda: effect(ctx, "bad") or {1, 2})


@workflow(name="atomic-writer")
def atomic_writer(ctx):
    def write():
        Ledger.objects.create(run_id=ctx.run_id, note="written")
        if ctx.input.get("fail"):
            raise RuntimeError("after the write")
        return Ledger.objects.filter(run_id=ctx.run_id).count()

    return ctx.step.atomic("write", write, retry_policy=RetryPolicy(maximum_attempts=1))


@workflow(name="repeated-names")
def repeated_names(ctx):
    a = ctx.step.run("x:1", lambda: "a")  # explicit: used as given
    b = ctx.step.run("x", lambda: "b")
    c = ctx.step.run("x", lambda: "c")  # x:1 is taken, so x:2
    d = ctx.step.run("x", lambda: "d")
    e = ctx.step.run("x:2", lambda: "e")  # taken by the automatic numbering
    return [a, b, c, d, e]


def wait_for_file(path, max_wait=60):
    deadline = time.monotonic() + max_wait
    while not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.02)


@workflow(name="waits-for-file")
def waits_for_file(ctx):
    """Step 'first' finishes; step 'block' waits until the file named in the input exists.

    With ``atomic`` in the input, 'block' is a ``step.atomic`` that writes a Ledger row
    once the file exists.
    """
    ctx.step.run("first", lambda: effect(ctx, "first") or 1)

    def block():
        effect(ctx, "block")
        wait_for_file(ctx.input["path"], ctx.input.get("max_wait", 60))
        if ctx.input.get("atomic"):
            Ledger.objects.create(run_id=ctx.run_id, note="block")
        return 2

    if ctx.input.get("atomic"):
        ctx.step.atomic("block", block)
    else:
        ctx.step.run("block", block)
    return ctx.step.run("last", lambda: effect(ctx, "last") or 3)


@workflow(name="fails-once", retry_policy=RetryPolicy(maximum_attempts=2, initial_interval="10ms"))
def fails_once(ctx):
    ctx.step.run("step", lambda: effect(ctx, "step") or 1)
    effect(ctx, "body")
    if SideEffect.objects.filter(run_id=ctx.run_id, step="body").count() < 2:
        raise RuntimeError("first pass fails")
    return "ok"


@workflow(name="fails-at-once")
def fails_at_once(ctx):
    raise LookupError("no such order")


@workflow(name="json-then-sleep")
def json_then_sleep(ctx):
    try:
        ctx.step.run("bad", lambda: effect(ctx, "bad") or datetime.date(2026, 1, 1))
    except TypeError as exc:
        message = str(exc)
    ctx.step.sleep("pause", "10ms")  # on replay the step raises again, unexecuted
    return message


@workflow(name="many-steps")
def many_steps(ctx):
    for i in range(ctx.input["n"]):
        ctx.step.run(f"s{i}", lambda: None)
    return "done"


@workflow(name="bad-sleep")
def bad_sleep(ctx):
    ctx.step.sleep("nap", "-5s")


@workflow(name="huge-sleep")
def huge_sleep(ctx):
    ctx.step.sleep("nap", datetime.timedelta(days=3_000_000))  # a valid timedelta, past 9999


@workflow(name="context", version="v3")
def context(ctx):
    return {"run_id": str(ctx.run_id), "version": ctx.version, "input": ctx.input}


@workflow(name="reserve-then-charge")
def reserve_then_charge(ctx):
    """'charge' fails (no retries) while it has run no more than ctx.input['failures'] times."""
    ctx.step.run("reserve", lambda: effect(ctx, "reserve") or "reserved")

    def charge():
        effect(ctx, "charge")
        if SideEffect.objects.filter(run_id=ctx.run_id, step="charge").count() <= ctx.input.get(
            "failures", 1
        ):
            raise RuntimeError("card declined")
        return "charged"

    return ctx.step.run("charge", charge, retry_policy=RetryPolicy(maximum_attempts=1))


# --- child workflows, signals, parallel steps ------------------------------------


@workflow(name="parent")
def parent(ctx):
    """Runs the child workflow named in the input; returns what the step returned."""
    child_input = ctx.input.get("child_input")
    if ctx.input.get("as_tuple"):
        child_input = tuple(child_input)  # not JSON: refused
    timeout = ctx.input.get("timeout")
    try:
        result = ctx.step.run_workflow(ctx.input["child"], child_input, timeout=timeout)
    except StepFailed as exc:
        if not ctx.input.get("catch"):
            raise
        return {"failed": exc.error}
    ctx.step.run("after", lambda: effect(ctx, "after") or 1)
    return {"child": result}


@workflow(name="waiter")
def waiter(ctx):
    ctx.step.run("before", lambda: effect(ctx, "before") or 1)
    got = ctx.step.wait_for_signal(ctx.input["signal"], timeout=ctx.input.get("timeout"))
    ctx.step.run("after", lambda: effect(ctx, "after") or 1)
    return got


@workflow(name="signaller")
def signaller(ctx):
    woken = ctx.step.send_signal(ctx.input["signal"], ctx.input.get("data"))
    ctx.step.run("after", lambda: effect(ctx, "after") or 1)
    return woken


_barriers: dict[str, threading.Barrier] = {}
_barriers_lock = threading.Lock()


def _barrier(run_id, parties):
    with _barriers_lock:
        return _barriers.setdefault(str(run_id), threading.Barrier(parties, timeout=10))


@workflow(name="fan-out")
def fan_out(ctx):
    """Three parallel steps that can only finish together (a barrier), so they ran at once."""
    concurrent = ctx.input.get("concurrent", True)

    def branch(label):
        def fn():
            effect(ctx, label)
            if concurrent:
                _barrier(ctx.run_id, 3).wait()
            if label == ctx.input.get("block"):
                wait_for_file(ctx.input["path"], ctx.input.get("max_wait", 60))
            return label.upper()

        return fn

    results = ctx.step.parallel([(label, branch(label)) for label in ("a", "b", "c")])
    if ctx.input.get("pause"):
        ctx.step.sleep("pause", "10ms")  # the next pass replays the parallel steps
    return ctx.step.run("join", lambda: "".join(results))


@workflow(name="big-result")
def big_result(ctx):
    return ctx.step.run("big", lambda: effect(ctx, "big") or "x" * ctx.input["size"])


@workflow(name="changes-order")
def changes_order(ctx):
    """Calls "a" then "b"; after a flip (a SideEffect row) it calls "b" first: not deterministic."""
    flipped = SideEffect.objects.filter(run_id=ctx.run_id, step="flip").exists()
    order = ["b", "a"] if flipped else ["a", "b"]
    ctx.step.run(order[0], lambda: effect(ctx, order[0]) or 1)
    ctx.step.sleep("pause", "10ms")
    return ctx.step.run(order[1], lambda: effect(ctx, order[1]) or 2)


@workflow(name="bad-child-name")
def bad_child_name(ctx):
    """Starts a child named "x" * length (+ NUL): a name no column can hold."""
    child = "x" * ctx.input["length"] + ("\x00" if ctx.input.get("nul") else "")
    return ctx.step.run_workflow(child, name=ctx.input.get("step"))


# --- BaseException that is not an Exception (asyncio.CancelledError and the like) ---------


class Boom(BaseException):
    """Like ``asyncio.CancelledError``, not an ``Exception``: ``except Exception`` misses it."""


def cancelled_in_asyncio():
    """What a step that calls ``asyncio.run()`` raises when its task is canceled."""

    async def fetch():
        asyncio.current_task().cancel()
        await asyncio.sleep(0)

    asyncio.run(fetch())


def boom():
    raise Boom("boom")


BASE_EXCEPTIONS = {"cancelled": cancelled_in_asyncio, "boom": boom, "exit": sys.exit}
TWO_TRIES = RetryPolicy(maximum_attempts=2, initial_interval="10ms")


@workflow(name="step-raises-base-exception")
def step_raises_base_exception(ctx):
    """Its step raises what BASE_EXCEPTIONS[ctx.input['raise']] raises, twice (its budget)."""

    def step():
        effect(ctx, "step")
        BASE_EXCEPTIONS[ctx.input["raise"]]()

    return ctx.step.run("step", step, retry_policy=TWO_TRIES)


@workflow(name="workflow-raises-base-exception", retry_policy=TWO_TRIES)
def workflow_raises_base_exception(ctx):
    """The workflow function itself raises (outside any step)."""
    effect(ctx, "body")
    BASE_EXCEPTIONS[ctx.input["raise"]]()


@workflow(name="interrupted-once")
def interrupted_once(ctx):
    """Its step raises KeyboardInterrupt the first time it runs (an interrupt, not a failure)."""

    def step():
        effect(ctx, "step")
        if SideEffect.objects.filter(run_id=ctx.run_id, step="step").count() == 1:
            raise KeyboardInterrupt
        return "done"

    return ctx.step.run("step", step)


class Gate:
    """Holds a step function of the thread it is opened for: ``entered`` is set, then it waits."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def pass_through(self) -> None:
        self.entered.set()
        assert self.opened.wait(30), "the test never opened the gate"


# thread name -> the gate its "who" step waits at (set by the test, per test)
gates: dict[str, Gate] = {}


@workflow(name="names-its-finisher")
def names_its_finisher(ctx):
    """Its last step returns the name of the thread that ran it, after that thread's gate."""
    ctx.step.run("first", lambda: effect(ctx, "first") or 1)

    def who():
        name = threading.current_thread().name
        gate = gates.get(name)
        if gate is not None:
            gate.pass_through()
        return name

    return ctx.step.run("who", who)


# --- queues (tests/test_queues.py) ----------------------------------------------------


@workflow(name="queued", queue="emails", priority=10)
def queued(ctx):
    """A workflow with a queue and a priority of its own (the defaults of its runs)."""
    return ctx.step.run("echo", lambda: ctx.input)


@workflow(name="queued-parent")
def queued_parent(ctx):
    """Runs ``queued`` as a child, with the queue, priority and key in ``ctx.input``."""
    return ctx.step.run_workflow("queued", None, **ctx.input)


def queue_load(queue):
    """Runs of ``queue`` in progress now, in all and per concurrency key."""
    from django_openworkflow.models import WorkflowRun

    in_progress = WorkflowRun.objects.active().filter(queue=queue, started_at__isnull=False)
    keys = list(in_progress.values_list("concurrency_key", flat=True))
    return {"runs": len(keys), "per_key": max((keys.count(k) for k in keys if k), default=0)}


@workflow(name="counts-its-queue", queue="narrow")
def counts_its_queue(ctx):
    """Records how many runs of its queue are in progress while its step runs."""
    return ctx.step.run("count", lambda: queue_load("narrow"))


# --- the stateful test (tests/test_stateful.py) ------------------------------------

SWITCH_RUN = uuid.UUID(int=1)  # SideEffect rows of this run id are switches:
FAIL_SWITCH = "fail"  # steps raise
HOOK_SWITCH = "hook"  # the on_commit hook of step.atomic "write" raises
STATEFUL_SIGNAL = "stateful-go"
ONE_RETRY = RetryPolicy(initial_interval=0, maximum_attempts=2)
NO_RETRY = RetryPolicy(maximum_attempts=1)


def switch_on(name):
    return SideEffect.objects.filter(run_id=SWITCH_RUN, step=name).exists()


def after_commit():
    if switch_on(HOOK_SWITCH):
        raise RuntimeError("the on_commit hook failed")


@workflow(name="stateful")
def stateful(ctx):
    """Step "first"; then, per ``shape``: a sleep; a child run (that waits for the signal);
    a signal wait; or a step that fails the first time, its compensation, and a sleep.
    Last, a ``step.atomic`` "write" that writes a Ledger row (and registers an on_commit
    hook). Steps fail while the fail switch is on."""

    def switched(name):
        def fn():
            effect(ctx, name)
            if switch_on(FAIL_SWITCH):
                raise RuntimeError(f"the switch is on in {name}")
            return name

        return fn

    def risky():  # fails the first time, and while the switch is on
        effect(ctx, "risky")
        runs = SideEffect.objects.filter(run_id=ctx.run_id, step="risky").count()
        if runs == 1 or switch_on(FAIL_SWITCH):
            raise RuntimeError(f"risky failed (execution {runs})")
        return "risky"

    def write():
        Ledger.objects.create(run_id=ctx.run_id, note="write")
        transaction.on_commit(after_commit)
        return switched("write")()

    ctx.step.run("first", switched("first"), retry_policy=ONE_RETRY)
    shape = ctx.input["shape"]
    if shape == "sleep":
        ctx.step.sleep("nap", "1h")
    elif shape == "child":  # the child waits for the signal
        ctx.step.run_workflow(stateful, {"shape": "signal"}, name="child")
    elif shape == "signal":
        ctx.step.wait_for_signal(STATEFUL_SIGNAL)
    elif shape == "compensate":
        try:
            ctx.step.run("risky", risky, retry_policy=NO_RETRY)
        except StepFailed:
            ctx.step.run("compensate", lambda: effect(ctx, "compensate") or "undone")
        ctx.step.sleep("nap", "1h")
    return ctx.step.atomic("write", write, retry_policy=ONE_RETRY)


from . import hardening, review  # noqa: E402, F401  (their @workflow definitions)


@workflow(name="exact-step-names")
def exact_step_names(ctx):
    """One step per name in the input, returning its name: names that differ only in case,
    accents, a trailing space or which emoji they hold are different steps."""
    return [ctx.step.run(name, lambda name=name: name) for name in ctx.input]


@workflow(name="tick")
def tick(ctx):
    """Started by the schedules of tests/test_schedules.py: returns its tick."""
    return {"scheduled_at": ctx.scheduled_at.isoformat(), "input": ctx.input}


@workflow(
    name="declared-schedules",
    # Ticks that do not come while the suite runs (February 29th at midnight, 2028 next):
    # every worker declares these schedules, and none may start a run in another test.
    schedule=[
        "0 0 29 2 *",
        Schedule("0 0 29 2 *", name="declared-berlin", input={"n": 1}, timezone="Europe/Berlin"),
    ],
)
def declared_schedules(ctx):
    return ctx.scheduled_at.isoformat()


@workflow(name="reads-subject")
def reads_subject(ctx):
    """ctx.subject as a step stored it in the first pass, and as this pass reads it."""
    stored = ctx.step.run("read", lambda: str(ctx.subject))
    ctx.step.sleep("nap", "1h")
    now = ctx.subject
    return {"stored": stored, "now": None if now is None else str(now)}


@workflow(name="ignores-subject")
def ignores_subject(ctx):
    return ctx.step.run("work", lambda: 1)


# --- resume with changes and rerun (tests/test_corrections.py, tests/test_rerun.py) -------

ONCE = RetryPolicy(maximum_attempts=1)


@workflow(name="charge-card")
def charge_card(ctx):
    """'charge-card' declines the card "declined" (no retries); 'ship' ships what it charged.

    With ``ship_fails`` in the input, 'ship' fails too (no retries)."""
    ctx.step.run("reserve", lambda: effect(ctx, "reserve") or "reserved")

    def charge():
        effect(ctx, "charge-card")
        if ctx.input["card"] == "declined":
            raise RuntimeError(f"card {ctx.input['card']} was declined")
        return {"card": ctx.input["card"]}

    charged = ctx.step.run("charge-card", charge, retry_policy=ONCE)

    def ship():
        effect(ctx, "ship")
        if ctx.input.get("ship_fails"):
            raise RuntimeError("no courier")
        return {"shipped": charged}

    return ctx.step.run("ship", ship, retry_policy=ONCE)


@workflow(name="recovers-then-fails")
def recovers_then_fails(ctx):
    """'wobbly' fails once, then succeeds on its retry; 'final' always fails (no retries)."""

    def wobbly():
        effect(ctx, "wobbly")
        if SideEffect.objects.filter(run_id=ctx.run_id, step="wobbly").count() == 1:
            raise RuntimeError("first try fails")
        return "steady"

    ctx.step.run("wobbly", wobbly, retry_policy=RetryPolicy(initial_interval=0))

    def final():
        effect(ctx, "final")
        raise RuntimeError("always")

    return ctx.step.run("final", final, retry_policy=ONCE)


@workflow(name="counts-executions")
def counts_executions(ctx):
    """Each step returns how many times it has executed for this run (its output changes
    when a rerun executes it again)."""

    def counted(name):
        def fn():
            effect(ctx, name)
            return SideEffect.objects.filter(run_id=ctx.run_id, step=name).count()

        return fn

    return {name: ctx.step.run(name, counted(name)) for name in ("a", "b", "c")}


@workflow(name="atomic-then")
def atomic_then(ctx):
    """A ``step.atomic`` "write" (a Ledger row), then by ``ctx.input["then"]``: "fail" fails
    the run (no retry), "sleep" parks it for an hour (tests/test_busy_pages.py)."""

    def write():
        return Ledger.objects.create(run_id=ctx.run_id, note="write").pk

    ctx.step.atomic("write", write, retry_policy=ONCE)
    if ctx.input["then"] == "fail":
        raise RuntimeError("after the atomic step")
    ctx.step.sleep("nap", "1h")
    return "woke"


from . import async_steps, replaying  # noqa: E402, F401  (their @workflow definitions)

# --- network partitions (tests/test_partitions.py) ---------------------------------------


def _partition_ledger_row(run_id):
    from django_openworkflow.conf import app_settings

    # On the engine's alias, so the row commits with the step's result.
    Ledger.objects.db_manager(app_settings.DATABASE).create(run_id=run_id, note="second")
    return 2


@workflow(name="partition-ledger")
def partition_ledger(ctx):
    first = ctx.step.run("first", lambda: 1)
    second = ctx.step.atomic("second", lambda: _partition_ledger_row(ctx.run_id))
    return {"total": first + second}


def _connection_settings():
    from django.db import connections

    from django_openworkflow.conf import app_settings

    connection = connections[app_settings.DATABASE]
    with connection.cursor() as cursor:
        shown = {}
        for name in (
            "tcp_keepalives_idle",
            "tcp_keepalives_interval",
            "tcp_keepalives_count",
            "tcp_user_timeout",
        ):
            cursor.execute(f"SHOW {name}")
            shown[name] = cursor.fetchone()[0]
    parameters = connection.connection.info.get_parameters()
    return {"server": shown, "libpq": parameters, "pooled": connection.pool is not None}


@workflow(name="connection-settings")
def connection_settings(ctx):
    return ctx.step.run("show", _connection_settings)


@workflow(name="slow-query")
def slow_query(ctx):
    def query():
        from django.db import connections

        from django_openworkflow.conf import app_settings

        with connections[app_settings.DATABASE].cursor() as cursor:
            cursor.execute("SELECT pg_sleep(%s)", [ctx.input["seconds"]])
        return "done"

    return ctx.step.run("query", query)
