"""WorkflowRouter: the app's models on OPENWORKFLOW["DATABASE"], read on each call."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.test import override_settings

from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowRunEvent
from django_openworkflow.routers import WorkflowRouter
from tests.testapp.models import Ledger

router = WorkflowRouter()
ON_WORKFLOWS = override_settings(OPENWORKFLOW={"DATABASE": "workflows"})


def test_the_apps_models_go_to_the_alias_of_the_moment():
    assert router.db_for_read(WorkflowRun) == "default"
    with ON_WORKFLOWS:
        for model in (WorkflowRun, StepAttempt, WorkflowRunEvent):
            assert router.db_for_read(model) == "workflows"
            assert router.db_for_write(model) == "workflows"


def test_other_models_are_left_to_the_other_routers():
    with ON_WORKFLOWS:
        assert router.db_for_read(Ledger) is None
        assert router.db_for_write(get_user_model()) is None
        assert router.allow_relation(Ledger(), get_user_model()()) is None
        assert router.allow_migrate("workflows", "auth") is None


def test_a_user_reached_from_an_event_is_read_where_users_live():
    # Django's default would be the event's own database ("workflows").
    event = WorkflowRunEvent()
    event._state.db = "workflows"
    with ON_WORKFLOWS:
        assert router.db_for_read(get_user_model(), instance=event) == "default"
        assert router.db_for_write(get_user_model(), instance=event) == "default"


def test_relations_with_the_apps_models_are_allowed():
    event, user = WorkflowRunEvent(), get_user_model()()
    with ON_WORKFLOWS:
        assert router.allow_relation(event, user) is True
        assert router.allow_relation(user, event) is True
        assert router.allow_relation(WorkflowRun(), StepAttempt()) is True


def test_the_apps_migrations_run_on_the_alias_only():
    with ON_WORKFLOWS:
        assert router.allow_migrate("workflows", "django_openworkflow", "workflowrun") is True
        assert router.allow_migrate("default", "django_openworkflow", "workflowrun") is False
    assert router.allow_migrate("default", "django_openworkflow") is True
