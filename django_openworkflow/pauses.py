"""Named pause points: the places where the engine's timing against other transactions matters.

The engine calls ``pause_point(name, run_id=...)`` at each of them. Nothing
is registered in production, so a call costs one dictionary lookup. Tests
block a thread there with ``django_openworkflow.testing.pause_at(name)`` and
let another transaction run in between, so a race is forced, not hoped for:

```python
with pause_at("wait.before-park", when=lambda c: c["run_id"] == parent.pk) as pause:
    thread.start()          # the parent's replay found its child unfinished, will park
    pause.wait()            # ... once it stands there
    WorkflowRun.objects.resume(child)
# leaving the block releases the parent
```

Every point is listed in ``PAUSE_POINTS`` with what is true when a thread
stands there; ``pause_at`` refuses names that are not listed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PAUSE_POINTS: dict[str, str] = {
    "claim.queue-locked": "a claim holds a limited queue's lock and has not counted its runs yet",
    "claim.queue-counted": "a claim holds a limited queue's lock and counted its runs in"
    " progress and its starts (PostgreSQL's concurrency-only claim: about to, in one"
    " statement); it has taken none yet. A hook at any claim.* point before the commit makes"
    " PostgreSQL send that claim's statements one by one, not in one round trip",
    "claim.before-commit": "a claim marked its runs and recorded their starts; not committed",
    "claim.after-commit": "a worker committed a claim and is about to hand the run to a slot",
    "step.before-fence": "a step is about to open its fenced transaction (start or finish)",
    "step.atomic-stored": "a step.atomic stored its result under the fence, which holds the"
    " run's row (PostgreSQL, MariaDB) until the step's transaction commits; not committed",
    "step.after-commit": "a step.atomic committed its writes and result; its on_commit hooks ran",
    "step.before-failure": "a step raised; its failure is about to be stored",
    "wait.before-settle": "a replaying run is about to lock itself and re-check an open wait",
    "wait.before-park": "a replaying run holds its row lock, found its wait not over, will park",
    "finish.parent-locked": "a finishing child locked its parent, not yet its own row",
    "finish.before-commit": "a run's finishing write is done but not committed (parent not woken)",
    "signal.locked": "a delivery locked the waiting runs and found steps still waiting; not yet"
    " completed",
    "cancel.before-children": "a cancel changed its own run's row, not yet its children's",
    "resume.locked": "a resume (with changes or not) locked the run's row and has read nothing"
    " under the lock yet",
    "rerun.locked": "a rerun locked the run's row and has read nothing under the lock yet",
    "schedule.before-start": "a worker holds a due schedule's row lock and chose the tick to"
    " start; it has inserted no run yet",
    "schedule.before-commit": "a worker inserted a tick's run and moved the schedule's"
    " next_run_at on; not committed",
    "schedule.declare-missing": "a worker's declare found no row of a declared schedule and"
    " is about to insert it",
    "schedule.declare-inserted": "a worker's declare inserted a declared schedule's row; not"
    " committed",
    "worker.before-poll": "the worker's loop is about to clear its wake-up and look at the queue",
    "worker.after-execute": "a slot finished executing a run and is about to drop it from flight",
    "purge.leased": "a worker took the purge lease and has not purged yet",
    "purge.before-lock": "a purge batch read the families that may go; it has locked none yet",
    "purge.before-runs": "a purge batch deleted its runs' events and step attempts, not yet the"
    " runs; not committed",
    "heartbeat.before-renew": "the heartbeat collected the claims it will renew",
}

_hooks: dict[str, list[Callable[[dict[str, Any]], None]]] = {}


def pause_point(name: str, **context: Any) -> None:
    """Let a test's hook run here (it may block this thread); a no-op otherwise."""
    hooks = _hooks.get(name)
    if hooks:
        for hook in list(hooks):
            hook(context)


def has_hooks(*names: str) -> bool:
    """Whether a test's hook waits at any of these points."""
    return any(name in _hooks for name in names)


def add_hook(name: str, hook: Callable[[dict[str, Any]], None]) -> None:
    if name not in PAUSE_POINTS:
        raise ValueError(f"unknown pause point {name!r}; known: {', '.join(sorted(PAUSE_POINTS))}")
    _hooks.setdefault(name, []).append(hook)


def remove_hook(name: str, hook: Callable[[dict[str, Any]], None]) -> None:
    hooks = _hooks.get(name, [])
    if hook in hooks:
        hooks.remove(hook)
    if not hooks:
        _hooks.pop(name, None)
