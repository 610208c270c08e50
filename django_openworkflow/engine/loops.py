"""Event loops for ``async def`` step functions.

A worker thread that runs an async step gets a ``StepLoop``: one event loop,
created at its first async step and kept for the thread's life (a worker's
slot closes it when the slot ends; a thread of ``step.parallel`` when its
call ends). Each step's coroutine is run to completion on it; whatever tasks
the step left behind are then canceled and awaited, as ``asyncio.run()``
does, so nothing of one step runs on into the next.

Where the ORM calls of an async step go: Django refuses a synchronous ORM
call on a thread whose event loop is running (``SynchronousOnlyOperation``),
so an async step reaches the database through ``await Model.objects.aget()``
or ``sync_to_async()``. With ``thread_sensitive=True`` (the default) asgiref
sends those calls to the executor of the current ``ThreadSensitiveContext``,
or else to one thread shared by the whole process. Each ``StepLoop`` enters
one ``ThreadSensitiveContext`` of its own, once, in a ``contextvars.Context``
it keeps, and runs every step in a copy of it: all the thread-sensitive calls
of one slot's async steps run on one companion thread, with one database
connection, never on asgiref's process-wide thread. The thread is made by
the first such call (an async step that makes none costs no thread). After
each step its connection is checked as the slot's own is between runs (a
broken one is closed, an open transaction never leaks into the next step);
``close()`` closes it and ends the companion thread.

The testing helpers run a workflow inside the test's transaction, on the
test's thread: ``run_in_caller()`` runs the coroutine on a loop of its own
while the calling thread serves the thread-sensitive calls (as Django's test
client does for async views), so the step's ORM calls see the test's data.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from asgiref.sync import (
    AsyncToSync,
    SyncToAsync,
    ThreadSensitiveContext,
    async_to_sync,
    sync_to_async,
)
from django.db import connections

logger = logging.getLogger("django_openworkflow.engine")

Step = Coroutine[Any, Any, Any]

# How long the tasks a step left behind get to finish once canceled. A task that
# ignores its cancellation past this is abandoned with the loop (see StepLoop.after).
LEFTOVER_GRACE = 5.0


class StepLoop:
    """One thread's event loop for async steps, and its companion thread for sync calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.context = contextvars.Context()  # where the ThreadSensitiveContext is entered
        self.sensitive = ThreadSensitiveContext()
        self.steps = 0  # steps run
        self.closed = False
        self.loop.run_until_complete(
            self.loop.create_task(self.sensitive.__aenter__(), context=self.context)
        )

    def __repr__(self) -> str:
        return f"<StepLoop steps={self.steps} closed={self.closed}>"

    def run(self, coro: Step, label: str) -> Any:
        """Run ``coro`` (a step's) to completion; return its result or raise what it raised.

        ``label`` names the step in log lines (``run=... workflow=... step=...``).
        """
        if self.loop.is_closed():  # by a step's code (a running loop cannot be closed)
            self.loop = asyncio.new_event_loop()  # the companion thread stays
        task = self.loop.create_task(coro, context=self.step_context())
        self.steps += 1
        try:
            return self.loop.run_until_complete(task)
        finally:
            self.after(label)

    def step_context(self) -> contextvars.Context:
        """A copy of the kept context holding the caller's context variables too.

        (The caller's: the current span of a trace, say. Not a thread-sensitive
        context the caller may be in, nor the thread of an ``async_to_sync()`` it
        serves: the steps' sync calls go to this loop's companion thread.)
        """
        context = self.context.copy()
        for var, value in contextvars.copy_context().items():
            if not isinstance(value, ThreadSensitiveContext):
                context.run(var.set, value)
        if getattr(AsyncToSync.executors, "current", None) is not None:
            # This thread serves an async_to_sync() further up (a test's): thread-sensitive
            # calls would go back to it, blocked here running the loop. Hidden, as asgiref
            # hides it on entering a ThreadSensitiveContext with an executor.
            context.run(setattr, AsyncToSync.executors, "current", None)
        return context

    def after(self, label: str) -> None:
        """After a step: cancel and await the tasks it left, check the companion's connections.

        A task that ignores its cancellation for ``LEFTOVER_GRACE`` seconds, or a
        companion thread still busy that long in a sync call of a canceled task,
        makes the loop abandoned (with its companion thread): the next step of
        this thread gets a new ``StepLoop``. Nothing here raises.
        """
        try:
            if not self.cancel_leftovers(label) or not self.on_companion(check_connections, label):
                self.abandon()
                return
        except Exception as exc:
            logger.warning(
                "async step cleanup failed, the step's event loop is replaced %s error=%s",
                label,
                type(exc).__name__,
                exc_info=True,
            )
            self.drop()
            self.close()

    def cancel_leftovers(self, label: str) -> bool:
        """Cancel the tasks still pending on the loop; False if some would not end."""
        leftovers = [task for task in asyncio.all_tasks(self.loop) if not task.done()]
        if not leftovers:
            return True
        for task in leftovers:
            task.cancel()
        self.loop.run_until_complete(asyncio.wait(leftovers, timeout=LEFTOVER_GRACE))
        stuck = [task for task in leftovers if not task.done()]
        for task in leftovers:
            if task.done() and not task.cancelled() and task.exception() is not None:
                self.loop.call_exception_handler(
                    {
                        "message": f"a task left by an async step raised ({label})",
                        "exception": task.exception(),
                        "task": task,
                    }
                )
        if stuck:
            logger.warning(
                "async step left tasks that ignored their cancellation, abandoning its "
                "event loop %s tasks=%d grace=%ss",
                label,
                len(stuck),
                LEFTOVER_GRACE,
            )
        return not stuck

    def has_companion(self) -> bool:
        """Whether a thread-sensitive call made the companion thread (and so maybe a
        connection): without one, an async step costs no thread hand-off to check it.

        asgiref keeps the thread's executor in ``SyncToAsync.context_to_thread_executor``
        (3.3 to 3.13); were that gone, this says yes and every step is checked.
        """
        executors = getattr(SyncToAsync, "context_to_thread_executor", None)
        return executors is None or self.sensitive in executors

    def on_companion(self, fn: Callable[[], None], label: str) -> bool:
        """Call ``fn`` on the companion thread, if there is one; False if it stayed busy
        for ``LEFTOVER_GRACE`` seconds (in a sync call of a task the step left: a
        canceled task's sync call runs on until it returns)."""
        if not self.has_companion():
            return True
        try:
            self.in_context(asyncio.wait_for(sync_to_async(fn)(), LEFTOVER_GRACE))
        except asyncio.TimeoutError:
            logger.warning(
                "async step left a sync call running on its companion thread, abandoning "
                "its event loop %s grace=%ss",
                label,
                LEFTOVER_GRACE,
            )
            return False
        return True

    def in_context(self, coro: Step) -> Any:
        """Run ``coro`` in a copy of the kept context: its sync calls go to the companion."""
        return self.loop.run_until_complete(
            self.loop.create_task(coro, context=self.context.copy())
        )

    def close(self) -> None:
        """Close the companion thread's connections, end it, and close the loop."""
        if self.closed:
            return
        self.closed = True
        if self.loop.is_closed():  # by a step's code: a new one, to reach the companion
            self.loop = asyncio.new_event_loop()
        try:
            if self.cancel_leftovers("closing") and self.on_companion(
                connections.close_all, "closing"
            ):
                self.loop.run_until_complete(
                    self.loop.create_task(
                        self.sensitive.__aexit__(None, None, None), context=self.context
                    )
                )
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        except Exception:
            logger.warning("closing an async steps' event loop failed", exc_info=True)
        finally:
            self.loop.close()

    def abandon(self) -> None:
        """Drop this loop without waiting for anything: this thread makes a new one.

        The companion thread may be busy in a sync call of a stuck task: it is
        asked to close its connections and end once that call returns.
        """
        self.drop()
        self.closed = True
        self.loop.close()  # pending tasks are dropped (asyncio logs each one)
        executors = getattr(SyncToAsync, "context_to_thread_executor", None)
        executor = executors.get(self.sensitive) if executors is not None else None
        if executor is not None:
            executor.submit(connections.close_all)
            executor.shutdown(wait=False)

    def drop(self) -> None:
        """No longer this thread's loop: its next async step makes a new one."""
        if getattr(_local, "step_loop", None) is self:
            _local.step_loop = None


def check_connections() -> None:
    """On the companion thread, after a step: keep its connections, unless one is broken
    or inside a transaction the step left open (``worker.check_connection``).

    A connection kept is checked again at its next use, by Django's own health
    check (``CONN_HEALTH_CHECKS``, turned on here for the companion's connections:
    once per step, as Django does once per request). It may idle for hours until
    the slot's next async step, and unlike the slot's own connection, which the
    engine's write before each step would find broken (the run is then released),
    nothing but the step's own first query reaches it: a connection the database
    ended meanwhile (a restart, a failover, an idle timeout) would fail that step.
    """
    from ..worker import check_connection

    for connection in connections.all(initialized_only=True):
        check_connection(connection.alias)
        if connection.connection is not None:
            kept: Any = connection  # (the stubs lack the health check's attributes)
            kept.health_check_enabled = True
            kept.health_check_done = False


_local = threading.local()


def thread_loop() -> StepLoop:
    """This thread's ``StepLoop``: made at its first async step, or again after a close."""
    step_loop: StepLoop | None = getattr(_local, "step_loop", None)
    if step_loop is None:
        step_loop = _local.step_loop = StepLoop()
    return step_loop


def run_on_thread_loop(coro: Step, label: str) -> Any:
    """The worker's way: ``coro`` on this thread's ``StepLoop``."""
    return thread_loop().run(coro, label)


def close_thread_loop() -> None:
    """Close this thread's ``StepLoop``, if it has one (at the end of a slot or a thread)."""
    step_loop: StepLoop | None = getattr(_local, "step_loop", None)
    if step_loop is not None:
        _local.step_loop = None
        step_loop.close()


def run_in_caller(coro: Step, label: str) -> Any:
    """The testing helpers' way: ``coro`` on a loop of its own (asgiref's), its
    thread-sensitive calls on this thread, in the transaction open here.

    The loop is new for each step (``asyncio.run``), which also cancels the
    tasks the step left behind.
    """

    async def step() -> Any:
        return await coro

    return async_to_sync(step, force_new_loop=True)()
