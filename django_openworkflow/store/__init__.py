"""The storage layer: ``get_store()`` is the only place that looks at the database vendor."""

from __future__ import annotations

from .base import Claim, Claims, Deferred, LockWaitExpired, Store

__all__ = ["Claim", "Claims", "Deferred", "LockWaitExpired", "Store", "get_store"]

_stores: dict[tuple[str, str], Store] = {}


def get_store(using: str | None = None) -> Store:
    """The store for the database ``using`` (default: ``OPENWORKFLOW["DATABASE"]``)."""
    from django.db import connections

    from ..conf import app_settings

    alias = using or app_settings.DATABASE
    vendor = connections[alias].vendor
    store = _stores.get((alias, vendor))
    if store is None:
        if vendor == "postgresql":
            from .postgres import PostgresStore

            store = PostgresStore(alias)
        elif vendor == "mysql":
            from .mysql import MysqlStore

            store = MysqlStore(alias)
        else:
            from .orm import OrmStore

            store = OrmStore(alias)
        _stores[(alias, vendor)] = store
    return store
