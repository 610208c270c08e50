"""A database router that keeps the engine's tables on ``OPENWORKFLOW["DATABASE"]``.

```python
# settings.py
OPENWORKFLOW = {"DATABASE": "workflows"}
DATABASE_ROUTERS = ["django_openworkflow.routers.WorkflowRouter"]
```

The engine sends its own queries to that alias whatever the routers say; the
router makes everything else agree with it: the admin, the run pages, the
managers (``WorkflowRun.objects.resume()``), ``migrate``. System check E013
reports a project where they disagree.
"""

from __future__ import annotations

from typing import Any

APP_LABEL = "django_openworkflow"


def _ours(model: Any) -> bool:
    return bool(model._meta.app_label == APP_LABEL)


class WorkflowRouter:
    """Route the ``django_openworkflow`` app's models to ``OPENWORKFLOW["DATABASE"]``.

    The alias is read on each call, so ``override_settings`` works. A model of
    another app reached from one of ours (``WorkflowRunEvent.by``, the user
    who resumed a run) is looked up where the routers send it when it is
    asked for on its own, not on the engine's database (Django's default for
    a related object is the database of the object it was reached from).
    """

    @property
    def alias(self) -> str:
        from .conf import app_settings

        return app_settings.DATABASE

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        if _ours(model):
            return self.alias
        if _reached_from_ours(hints):
            from django.db import router

            return router.db_for_read(model)
        return None

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        if _ours(model):
            return self.alias
        if _reached_from_ours(hints):
            from django.db import router

            return router.db_for_write(model)
        return None

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None:
        """Our models may point at each other and at other apps' rows (an event's user)."""
        if _ours(obj1) or _ours(obj2):
            return True
        return None

    def allow_migrate(
        self, db: str, app_label: str, model_name: str | None = None, **hints: Any
    ) -> bool | None:
        """The app's tables exist on the engine's database only."""
        if app_label == APP_LABEL:
            return db == self.alias
        return None


def _reached_from_ours(hints: dict[str, Any]) -> bool:
    instance = hints.get("instance")
    return instance is not None and _ours(instance)
