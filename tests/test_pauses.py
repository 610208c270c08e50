"""Pause points: a test holds an engine thread at a named place, then lets it go."""

import threading

import pytest

from django_openworkflow.pauses import PAUSE_POINTS, pause_point
from django_openworkflow.testing import pause_at


def test_pause_at_holds_the_first_matching_thread_until_released():
    order = []

    def engine(run_id):
        pause_point("step.before-fence", run_id=run_id)
        order.append(run_id)

    with pause_at("step.before-fence", when=lambda c: c["run_id"] == "b") as pause:
        engine("a")  # does not match: passes straight through
        held = threading.Thread(target=engine, args=("b",))
        held.start()
        assert pause.wait() == {"run_id": "b"}
        engine("c")  # matches, but only the first matching thread is held
        assert order == ["a", "c"]
        pause.release()
        held.join(5)
        assert not held.is_alive()
    assert order == ["a", "c", "b"]


def test_leaving_the_block_releases_the_thread_and_removes_the_hook():
    done = threading.Event()

    def engine():
        pause_point("step.after-commit")
        done.set()

    with pause_at("step.after-commit") as pause:
        thread = threading.Thread(target=engine)
        thread.start()
        pause.wait()
        assert not done.is_set()
    thread.join(5)
    assert not thread.is_alive()
    assert done.is_set()
    pause_point("step.after-commit")  # no hook left: nothing blocks


def test_unknown_pause_point_names_are_refused():
    with (
        pytest.raises(ValueError, match=r"unknown pause point 'step\.befor-fence'"),
        pause_at("step.befor-fence"),
    ):
        pass


def test_wait_fails_when_no_thread_comes():
    with pause_at("claim.after-commit") as pause, pytest.raises(AssertionError, match="no thread"):
        pause.wait(timeout=0.01)


def test_every_listed_point_is_called_by_the_engine():
    import pathlib
    import re

    package = pathlib.Path(__file__).resolve().parent.parent / "django_openworkflow"
    source = "".join(p.read_text() for p in package.rglob("*.py") if p.name != "pauses.py")
    called = set(re.findall(r'pause_point\(\s*"([^"]+)"', source))
    assert sorted(set(PAUSE_POINTS) - called) == []
