"""Runs about model instances: ``start(..., subject=order)``.

A run's subject is stored as its content type and its primary key as text
(``WorkflowRun.subject_type`` / ``subject_id``), so any model can be one,
whatever its primary key (integer, UUID, text). Nothing links the two in
the database: a deleted object, or a removed model, leaves its runs as
they were, and ``run.subject`` is then ``None``.

Content types are read where the routers send ``ContentType`` (the
``default`` database, usually), never from the engine's database: with
``OPENWORKFLOW["DATABASE"]`` elsewhere, the two may number them differently.
The subject itself is read where the routers send its model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.contrib.auth import get_permission_codename
from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models, router
from django.urls import NoReverseMatch, reverse

if TYPE_CHECKING:
    from django.contrib.contenttypes.models import ContentType

    from .models import WorkflowRun

MAX_SUBJECT_ID_LENGTH = 255  # WorkflowRun.subject_id


def subject_key(obj: Any, of: str) -> tuple[int, str]:
    """The (content type id, primary key as text) that stores ``obj`` as a run's subject.

    ``obj`` must be a saved model instance; ``of`` names where it was given
    (``' of workflow "charge-order"'``) for the error. The content type is
    the concrete model's: a proxy's instance is stored as its concrete model's.
    """
    if not isinstance(obj, models.Model):
        raise TypeError(f"subject{of} must be a model instance, not {type(obj).__name__} {obj!r}")
    if obj.pk is None:
        raise ValueError(
            f"subject{of} must be saved first: {type(obj).__name__} {obj!r} has no primary key"
        )
    subject_id = str(obj.pk)
    if len(subject_id) > MAX_SUBJECT_ID_LENGTH:
        raise ValueError(
            f"subject{of}: the primary key of {type(obj).__name__} {obj!r} is "
            f"{len(subject_id)} characters as text; at most {MAX_SUBJECT_ID_LENGTH}"
        )
    return content_type_of(type(obj)).pk, subject_id


def content_type_of(model: type[models.Model]) -> ContentType:
    """The content type a subject of ``model`` is stored with (the concrete model's)."""
    from django.contrib.contenttypes.models import ContentType

    return ContentType.objects.get_for_model(model, for_concrete_model=True)


def content_type_by_id(content_type_id: int | None) -> ContentType | None:
    """The content type with this id (cached), or None when there is none."""
    from django.contrib.contenttypes.models import ContentType

    if content_type_id is None:
        return None
    try:
        return ContentType.objects.get_for_id(content_type_id)
    except ContentType.DoesNotExist:
        return None


def model_of(content_type_id: int | None) -> type[models.Model] | None:
    """The model of a stored subject type, or None when the type or the model is gone."""
    content_type = content_type_by_id(content_type_id)
    return None if content_type is None else content_type.model_class()


def pk_value(model: type[models.Model], subject_id: Any) -> Any:
    """``subject_id`` as a value of ``model``'s primary key; ``ValueError`` when it is none."""
    if subject_id is None:
        raise ValueError("no subject id")
    try:
        field = model._meta.pk
        value = field.to_python(subject_id)  # type: ignore[union-attr]
        for validator in field.validators:  # type: ignore[union-attr]
            if isinstance(validator, (MinValueValidator, MaxValueValidator)):
                validator(value)  # an integer the column cannot hold names no row
        field.get_prep_value(value)  # type: ignore[union-attr]
    except (ValidationError, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{subject_id!r} is not a primary key of {model.__name__}") from exc
    if value is None:
        raise ValueError(f"{subject_id!r} is not a primary key of {model.__name__}")
    return value


def load_subject(content_type_id: int | None, subject_id: Any) -> models.Model | None:
    """The stored subject, read where the routers send its model, with its base manager.

    None when the run has no subject, the content type or the model no
    longer exists, the object was deleted, or ``subject_id`` is not a valid
    primary key of the model.
    """
    model = model_of(content_type_id)
    if model is None:
        return None
    try:
        pk = pk_value(model, subject_id)
    except ValueError:
        return None
    manager = model._base_manager.db_manager(router.db_for_read(model))
    try:
        return manager.get(pk=pk)  # type: ignore[no-any-return]
    except ObjectDoesNotExist:
        return None


# --- the run list's subject filter: "<content type id>:<primary key>" ------------


def filter_value(obj: models.Model) -> str:
    """The run list's ``?subject=`` value for ``obj``'s runs."""
    content_type_id, subject_id = subject_key(obj, "")
    return f"{content_type_id}:{subject_id}"


def parse_filter_value(value: str) -> tuple[int, str]:
    """``"<content type id>:<primary key>"`` as (content type id, the key as stored).

    The key is normalized as ``start()`` stores it (``"00042"`` of an integer
    key is ``"42"``). ``ValueError`` for anything else: no such content
    type, or a key that is not one of the model's.
    """
    type_part, sep, key = value.partition(":")
    digits = type_part.isascii() and type_part.isdigit() and len(type_part) <= 18
    if not sep or not digits or not key or "\x00" in key:
        raise ValueError(f"{value!r} is not <content type id>:<primary key>")
    if len(key) > MAX_SUBJECT_ID_LENGTH:
        raise ValueError(f"the primary key in {value!r} is longer than any stored")
    content_type = content_type_by_id(int(type_part))
    if content_type is None:
        raise ValueError(f"no content type has the id {type_part}")
    model = content_type.model_class()
    if model is None:  # a removed model: its runs keep the key as it was stored
        return content_type.pk, key
    return content_type.pk, str(pk_value(model, key))


# --- how the pages show a run's subject --------------------------------------------


@dataclass(frozen=True)
class SubjectShown:
    """A run's subject as the run page and the run's admin page show it.

    ``label`` is ``str(obj)`` (or, for a deleted object, its type and id);
    ``url`` its admin change page when the user may see it there, else None;
    ``deleted`` whether the object (or its model) is gone.
    """

    label: str
    type_name: str
    subject_id: str
    url: str | None
    deleted: bool
    runs_filter: str


def subject_shown(run: WorkflowRun, user: Any) -> SubjectShown | None:
    """How to show ``run``'s subject to ``user``; None when the run has no subject."""
    if run.subject_type_id is None:
        return None
    content_type = content_type_by_id(run.subject_type_id)
    model = None if content_type is None else content_type.model_class()
    if model is not None:
        type_name = str(model._meta.verbose_name)
    elif content_type is not None:
        type_name = f"{content_type.app_label}.{content_type.model}"
    else:
        type_name = f"content type {run.subject_type_id}"
    subject_id = run.subject_id or ""
    obj = run.subject
    runs_filter = f"{run.subject_type_id}:{subject_id}"
    if obj is None:
        return SubjectShown(
            label=f"{type_name} {subject_id}",
            type_name=type_name,
            subject_id=subject_id,
            url=None,
            deleted=True,
            runs_filter=runs_filter,
        )
    return SubjectShown(
        label=str(obj),
        type_name=type_name,
        subject_id=subject_id,
        url=admin_change_url(obj, user),
        deleted=False,
        runs_filter=runs_filter,
    )


def admin_change_url(obj: models.Model, user: Any) -> str | None:
    """``obj``'s change page in the admin, when it has one and ``user`` may view it there."""
    from django.contrib.admin.utils import quote

    opts = obj._meta
    may_view = any(
        user.has_perm(f"{opts.app_label}.{get_permission_codename(action, opts)}")
        for action in ("view", "change")
    )
    if not (user.is_active and user.is_staff and may_view):
        return None
    try:
        return reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[quote(obj.pk)])
    except NoReverseMatch:  # not registered in the admin (or no admin)
        return None
