"""Soak kinds that leak, one resource a run, to prove ``soak_workflows`` catches growth.

Imported by ``tests/test_soak.py`` through ``--workflows-module`` (in the
command and in its workers), never autodiscovered. Each leak happens inside
a step, so once per run: a replay returns the stored result.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from django.db import connections

from django_openworkflow.conf import app_settings
from django_openworkflow.loadtest.soak import kind

LEAKED: list[Any] = []
NEVER = threading.Event()
MEMORY_PER_RUN = 8 << 20  # bytes


def _leak(thing: Any, i: int) -> int:
    LEAKED.append(thing)
    return i


def _thread() -> threading.Thread:
    thread = threading.Thread(target=NEVER.wait, name="soak-leak", daemon=True)
    thread.start()
    return thread


def _connection() -> Any:
    leaked = connections.create_connection(app_settings.DATABASE)
    leaked.ensure_connection()
    return leaked


@kind("leak-thread", expect=lambda i: i)
def leak_thread(ctx: Any, i: int) -> int:
    return ctx.step.run("leak", lambda: _leak(_thread(), i))


@kind("leak-file", expect=lambda i: i)
def leak_file(ctx: Any, i: int) -> int:
    return ctx.step.run("leak", lambda: _leak(open(os.devnull), i))


@kind("leak-connection", expect=lambda i: i)
def leak_connection(ctx: Any, i: int) -> int:
    return ctx.step.run("leak", lambda: _leak(_connection(), i))


@kind("leak-memory", expect=lambda i: i)
def leak_memory(ctx: Any, i: int) -> int:
    return ctx.step.run("leak", lambda: _leak(b"x" * MEMORY_PER_RUN, i))


@kind("exit-worker", expect=lambda i: i)
def exit_worker(ctx: Any, i: int) -> int:
    os._exit(3)
