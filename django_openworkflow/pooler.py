"""Is the engine's database reached through a pooler in transaction mode (PgBouncer)?

Behind such a pooler, one client connection is served by a different server
session from one transaction to the next. What a session keeps between
transactions is then not ours to keep: statements prepared by name, ``SET``
without ``LOCAL``, ``LISTEN``.

``OPENWORKFLOW["POOLER"]`` says so (``True`` or ``False``); ``None`` (the
default) lets the worker find out. Callers ask ``behind_pooler(using)``.
"""

from __future__ import annotations

from .conf import app_settings


def behind_pooler(using: str) -> bool:
    """Whether the database ``using`` is reached through a pooler in transaction mode."""
    setting = app_settings.POOLER
    if setting is not None:
        return setting
    return False  # detection: issue 17 (PgBouncer)
