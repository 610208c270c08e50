import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from django_openworkflow.models import WorkflowRun
from tests.testapp.workflows import three_steps


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--concurrency", "0"], "argument --concurrency: must be at least 1, not 0"),
        (["--concurrency", "many"], "argument --concurrency: must be a whole number, not 'many'"),
        (["--lease", "-3"], "argument --lease: must be a positive number of seconds, not '-3'"),
        (["--lease", "soon"], "argument --lease: must be a number of seconds, not 'soon'"),
        (["--poll-interval", "0"], "argument --poll-interval: must be a positive number"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_runworker_refuses_bad_options(args, message):
    with pytest.raises(CommandError) as info:
        call_command("runworker", *args)
    assert str(info.value).startswith(f"Error: {message}")


def test_runworker_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        call_command("runworker", "--help")
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "Default: OPENWORKFLOW['CONCURRENCY'] (10)" in out
    assert "OPENWORKFLOW['LEASE_SECONDS'] (30)" in out
    assert "--burst" in out


@pytest.mark.django_db(transaction=True)
def test_runworker_burst_executes_due_runs_and_returns():
    run = three_steps.start({"i": 1})
    call_command("runworker", "--burst", "--concurrency", "2", verbosity=0)
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.COMPLETED
