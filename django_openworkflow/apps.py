from __future__ import annotations

from django.apps import AppConfig
from django.utils.module_loading import autodiscover_modules, import_string
from django.utils.translation import gettext_lazy as _


class OpenWorkflowConfig(AppConfig):
    name = "django_openworkflow"
    verbose_name = _("Workflows")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
        from .tracing import install

        install()  # when opentelemetry-api is installed (it is imported on first use)

        autodiscover_modules("workflows")
        if uses_task_backend():
            from . import tasks  # noqa: F401  (registers the built-in workflow "django-task")


def uses_task_backend() -> bool:
    """Whether ``settings.TASKS`` has a ``WorkflowTaskBackend`` (a subclass too): then the
    workers need its workflow ``django-task``."""
    from django.conf import settings

    tasks = getattr(settings, "TASKS", None)
    if not isinstance(tasks, dict):
        return False
    paths = {params.get("BACKEND") for params in tasks.values() if isinstance(params, dict)}
    return any(isinstance(path, str) and is_task_backend(path) for path in paths)


def is_task_backend(path: str) -> bool:
    if path == TASK_BACKEND:
        return True
    try:  # Django's check_tasks imports every backend too
        backend = import_string(path)
    except ImportError:
        return False  # Django reports a backend it cannot import
    return any(
        f"{cls.__module__}.{cls.__qualname__}" == TASK_BACKEND
        for cls in getattr(backend, "__mro__", ())
    )


TASK_BACKEND = "django_openworkflow.tasks.WorkflowTaskBackend"
