"""Settings of a ``bench_workflows`` or ``chaos_workflows`` worker: the project's, with
``OPENWORKFLOW`` keys replaced.

``bench_workflows`` starts the worker of a limit variant with
``DJANGO_SETTINGS_MODULE`` naming this module (``limits.worker_env``):
``OPENWORKFLOW_BENCH_PROJECT_SETTINGS`` names the project's settings module,
whose settings are taken as they are, and ``OPENWORKFLOW_BENCH_OVERRIDES``
is a JSON object of ``OPENWORKFLOW`` keys that replace the project's (the
variant's ``QUEUES``). The command itself uses ``override_settings`` with
the same keys, so both sides see one configuration.

``chaos_workflows`` also sets ``OPENWORKFLOW_CHAOS_PROXY`` (``host:port``): the
worker's engine database is reached through that partition proxy
(``loadtest/proxy.py``) instead of its own ``HOST`` and ``PORT``.
"""

from __future__ import annotations

import importlib
import json
import os

from django.core.exceptions import ImproperlyConfigured

from .limits import OVERRIDES_ENV, PROJECT_SETTINGS_ENV
from .proxy import PROXY_ENV

if PROJECT_SETTINGS_ENV not in os.environ:
    raise ImproperlyConfigured(
        f"{__name__} is the settings of a bench_workflows worker: it needs "
        f"{PROJECT_SETTINGS_ENV}, the project's settings module (bench_workflows sets it)"
    )
_project = importlib.import_module(os.environ[PROJECT_SETTINGS_ENV])
globals().update({name: getattr(_project, name) for name in dir(_project) if name.isupper()})
OPENWORKFLOW = {
    **(getattr(_project, "OPENWORKFLOW", None) or {}),
    **json.loads(os.environ.get(OVERRIDES_ENV, "{}")),
}
if PROXY_ENV in os.environ:
    import copy

    _alias = OPENWORKFLOW.get("DATABASE", "default")
    _host, _, _port = os.environ[PROXY_ENV].rpartition(":")
    DATABASES = copy.deepcopy(_project.DATABASES)
    DATABASES[_alias].update(HOST=_host, PORT=_port)
