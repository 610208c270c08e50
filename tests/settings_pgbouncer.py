"""The test settings, with the default database reached through PgBouncer in transaction
mode (``make test-pgbouncer``; ``scripts/pgbouncer.py up`` starts one).

``OPENWORKFLOW_PGBOUNCER_URL`` is the pooler's URL (default
``postgres://postgres@127.0.0.1:6432/test``); ``DATABASE_URL`` the same server directly
(default ``postgres://postgres@127.0.0.1:5432/test``), kept as the alias ``direct``: a test
mirror of ``default`` (the same test database) and the worker's
``OPENWORKFLOW["LISTEN_DATABASE"]``. ``POOLER`` is left to detection.

The test database is created and dropped through the pooler by
``tests.pgbouncer_postgresql`` (``DROP DATABASE ... WITH (FORCE)``).
"""

from __future__ import annotations

import os

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")

from .settings import *  # noqa: F403
from .settings import DATABASES, OPENWORKFLOW, _second_database, env

_direct = DATABASES["default"]
if not _direct["ENGINE"].endswith("postgresql"):
    raise RuntimeError(f"tests.settings_pgbouncer needs a PostgreSQL DATABASE_URL: {_direct}")

_pooled = env.db_url_config(
    os.environ.get("OPENWORKFLOW_PGBOUNCER_URL", "postgres://postgres@127.0.0.1:6432/test")
)
_pooled["ENGINE"] = "tests.pgbouncer_postgresql"
# Django's advice for transaction pooling: .iterator()'s cursors WITH HOLD outlive a
# transaction (check_inflight_runs reads with .iterator()).
_pooled["DISABLE_SERVER_SIDE_CURSORS"] = True
# The test database's name (OPENWORKFLOW_PG_TEST_NAME), and in a worker subprocess the
# database itself (OPENWORKFLOW_TEST_DB): as tests.settings made them.
_pooled["NAME"] = _direct["NAME"]
if "TEST" in _direct:
    _pooled["TEST"] = dict(_direct["TEST"])

DATABASES["default"] = _pooled
DATABASES["direct"] = {**_direct, "TEST": {"MIRROR": "default"}}
DATABASES["workflows"] = _second_database(_pooled)

OPENWORKFLOW_TEST_POOLER = True
OPENWORKFLOW["LISTEN_DATABASE"] = "direct"
