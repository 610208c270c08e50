"""The kinds of user the permission tests try every page and POST with."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client

ROLES: dict[str, dict[str, Any] | None] = {
    "anonymous": None,
    "non_staff": {"staff": False, "perms": ("view_workflowrun", "change_workflowrun")},
    "staff_without_perm": {},
    "staff_view": {"perms": ("view_workflowrun",)},
    "staff_change": {"perms": ("change_workflowrun",)},
    "superuser": {"superuser": True},
}
# The roles of "Resume with changes", which asks for correct_workflowrun on top of
# change_workflowrun: ROLES and two more (correct alone is not enough).
CORRECT_ROLES: dict[str, dict[str, Any] | None] = {
    **ROLES,
    "staff_correct": {"perms": ("correct_workflowrun",)},
    "staff_change_correct": {"perms": ("change_workflowrun", "correct_workflowrun")},
}
CSRF_SECRET = "owfcsrfsecret0123456789abcdefghi"  # 32 characters: a valid unmasked token


def create_user(username: str, *perms: str, staff: bool = True, superuser: bool = False) -> Any:
    """A user with the given ``django_openworkflow`` permission codenames."""
    user = get_user_model().objects.create_user(username, is_staff=staff, is_superuser=superuser)
    for codename in perms:
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label="django_openworkflow", codename=codename)
        )
    return user


def login_as(client: Client, kind: str) -> Any:
    """Log ``client`` in as one of ``CORRECT_ROLES`` (``ROLES`` and two more); return the
    user (None for anonymous)."""
    spec = CORRECT_ROLES[kind]
    if spec is None:
        return None
    spec = dict(spec)
    user = create_user(kind, *spec.pop("perms", ()), **spec)
    client.force_login(user)
    return user


def role_client(kind: str, *, enforce_csrf: bool = False) -> Client:
    """A client logged in as one of ``ROLES``; with ``enforce_csrf``, holding a CSRF cookie."""
    client = Client(enforce_csrf_checks=enforce_csrf)
    login_as(client, kind)
    if enforce_csrf:
        client.cookies["csrftoken"] = CSRF_SECRET
    return client
