"""``runworker --reload``: restart the worker when a Python file changes.

Django's autoreloader, as ``runserver`` uses it: a parent process starts
the command again as a child (``RUN_MAIN=true``), the child watches the
files of every imported module (``StatReloader``, or Watchman when it is
installed) and exits with status 3 when one changes, and the parent starts
a new child. Three things differ from ``runserver``, because a worker holds
runs:

- **A change stops the worker first.** It takes no new run; the runs in
  flight get ``grace`` seconds to finish; those still running then are
  released (their claim and lease ended now), so the new child replays them
  at once from their last completed step, with the new code, rather than
  after their lease runs out. From the release on, the old process can
  write nothing more to them (the claim fence) nor renew their leases. A
  step cut short this way counts as a failed attempt (``WorkerLost``) and is
  retried under its retry policy.
- **A failed child** (an import broken by the change) **waits for a fix**:
  the parent watches the files itself and starts a new child at the next
  change (``runserver``'s child survives such an error; a worker's exits).
- **The parent stops the child and waits for it**: on SIGTERM or SIGINT
  it closes a pipe the child watches, and the child stops cleanly (a second
  signal kills it), so no worker is left behind. A signal that reached both
  (Ctrl-C in a terminal, a process manager signalling the group) counts
  once. A child whose parent died (SIGKILL) stops as well.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.db import connections
from django.utils import autoreload

from .worker import Worker

logger = logging.getLogger(__name__)

# The exit status that asks the parent for a new child (Django's trigger_reload()).
RELOAD_EXIT_CODE = 3
RELOAD_GRACE = 5.0
# The environment variable naming the child's end of a pipe from the parent: at its end of
# file (the parent asks the child to stop, or died) the worker stops.
PARENT_PIPE_ENV = "OPENWORKFLOW_RELOAD_PIPE"


def is_child() -> bool:
    """True in the process that runs the worker (the parent only restarts it)."""
    return os.environ.get(autoreload.DJANGO_AUTORELOAD_ENV) == "true"


def run_with_reloader(make_worker: Callable[[], Worker], *, grace: float = RELOAD_GRACE) -> None:
    """Run a worker that restarts when a Python file changes (see the module docstring)."""
    if is_child():
        run_child(make_worker(), grace=grace)
    else:
        connections.close_all()  # the parent only waits: no connection held meanwhile
        sys.exit(restart_with_reloader())


def restart_with_reloader() -> int:
    """The parent: start the child again each time it exits for a reload; its exit status.

    SIGTERM or SIGINT asks the child to stop by closing the pipe it watches
    (so a signal that reached both processes, from a terminal's Ctrl-C or a
    process manager signalling the group, counts once); a second one kills it.
    """
    args = autoreload.get_child_arguments()
    stopping = False
    while True:
        read_end, write_end = os.pipe()
        env = {
            **os.environ,
            autoreload.DJANGO_AUTORELOAD_ENV: "true",
            PARENT_PIPE_ENV: str(read_end),
        }
        child = subprocess.Popen(args, env=env, pass_fds=(read_end,))
        os.close(read_end)

        def stop(signum: int, frame: Any, child: subprocess.Popen[bytes] = child) -> None:
            nonlocal stopping, write_end
            if stopping and write_end < 0:
                child.kill()
                return
            stopping = True
            if write_end >= 0:
                os.close(write_end)
                write_end = -1

        previous = {
            sig: signal.signal(
                sig, signal.SIG_IGN if signal.getsignal(sig) is signal.SIG_IGN else stop
            )
            for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            code = child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if write_end >= 0:
                os.close(write_end)
        if stopping:  # a child that exited for a reload meanwhile stopped as asked, too
            return 0 if code == RELOAD_EXIT_CODE else code
        if code == 0:
            return code
        if code != RELOAD_EXIT_CODE:
            # It failed: an error in the code it imports, say. Try again once a file changes.
            logger.error("worker process failed, waiting for a file change code=%s", code)
            if not wait_for_change():
                return code


def wait_for_change() -> bool:
    """The parent, after a failed child: True once a watched file changes; False on a
    SIGTERM or SIGINT. (The parent watches the modules it imported at its start.)"""
    reloader = autoreload.get_reloader()
    changed = threading.Event()

    def on_change(sender: Any, file_path: Path, **kwargs: Any) -> bool:
        changed.set()
        reloader.stop()
        return True  # no trigger_reload(): this process goes on

    def on_signal(signum: int, frame: Any) -> None:
        reloader.stop()

    autoreload.file_changed.connect(on_change, weak=False, dispatch_uid="openworkflow-reload-wait")
    previous = {
        sig: signal.signal(
            sig, signal.SIG_IGN if signal.getsignal(sig) is signal.SIG_IGN else on_signal
        )
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        reloader.run_loop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        autoreload.file_changed.disconnect(dispatch_uid="openworkflow-reload-wait")
    return changed.is_set()


def run_child(worker: Worker, *, grace: float) -> None:
    """The child: the worker on a thread, Django's reloader on the main thread."""
    worker.install_signal_handlers()  # the main thread's: a clean stop, then exit now
    reloader = autoreload.get_reloader()
    stopped = threading.Event()  # worker.run() returned
    crashed = threading.Event()  # it raised: the reloader waits for a fix (as runserver does)

    def work() -> None:
        try:
            worker.run()  # returns after stop(): a signal, a file change or the parent's death
        except BaseException:
            crashed.set()
            raise
        stopped.set()
        reloader.stop()

    def changed(sender: Any, file_path: Path, **kwargs: Any) -> None:
        if Path(file_path).suffix == ".mo":
            return  # translations are reloaded in place (django.utils.translation.reloader)
        try:
            logger.info("file changed, reloading worker=%s path=%s", worker.worker_id, file_path)
            stop_for_reload(worker, stopped, grace)
        except Exception:  # the reload goes on: a new process replays what is left
            logger.exception("stopping for the reload failed worker=%s", worker.worker_id)

    autoreload.file_changed.connect(changed, weak=False, dispatch_uid="openworkflow-reload")
    watch_parent(worker, lambda: reloader.stop() if crashed.is_set() else None)
    logger.info(
        "watching for file changes worker=%s reloader=%s", worker.worker_id, type(reloader).__name__
    )
    autoreload.start_django(reloader, work)


def stop_for_reload(worker: Worker, stopped: threading.Event, grace: float) -> None:
    """Stop taking runs; give the runs in flight ``grace`` seconds, then release the rest.

    The process exits then without ``worker.run()`` returning: its row in the
    registry is marked stopped here, or it would show live, then dead for a day.
    """
    worker.stop()
    if stopped.wait(grace):
        return
    released = worker.release_in_flight()
    logger.warning(
        "runs released for the reload, the new process replays them worker=%s runs=%d grace=%gs",
        worker.worker_id,
        released,
        grace,
    )
    worker.presence.stop()
    connections[worker.using].close()


def watch_parent(worker: Worker, then: Callable[[], None]) -> None:
    """Stop the worker when the parent closes the pipe: it was told to stop, or it died.

    ``then`` is called after: it ends the process when no worker is running.
    """
    fd = os.environ.get(PARENT_PIPE_ENV)
    if fd is None:  # started by hand with RUN_MAIN=true
        return

    def watch() -> None:
        while os.read(int(fd), 1):
            pass
        logger.info("reloader stopping or gone, stopping worker=%s", worker.worker_id)
        worker.stop()
        then()

    threading.Thread(target=watch, name="openworkflow-reload-parent", daemon=True).start()
