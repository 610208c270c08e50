"""The test suite on each supported Django, each on its Python: ``nox`` runs both lanes.

- ``tests(django5.2)``: Django 5.2 on Python 3.11 (what ``make test-sqlite`` and
  ``make test-postgres`` run in the project's ``.venv``);
- ``tests(django6)``: the newest Django 6.x on Python 3.13, with deprecation
  warnings as errors (``make test-django6`` runs it on SQLite).

Arguments after ``--`` go to pytest (``nox -s "tests(django6)" -- -x -k resume``);
the environment passes through, so ``DATABASE_URL=postgres://... nox`` runs the
lanes on PostgreSQL. ``nox -R`` reuses a lane's virtualenv without reinstalling.

Each Python is looked for on ``PATH`` first, then among pyenv's versions
(``pyenv root``/versions/3.13*/bin), which need not be on ``PATH``;
``PYTHON_DJANGO6=/path/to/python3.13`` names the Django 6.x lane's (``make
test-django6`` passes the one it found).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nox

nox.needs_version = ">=2024.4.15"
nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"


def pyenv_root() -> Path:
    if os.environ.get("PYENV_ROOT"):
        return Path(os.environ["PYENV_ROOT"])
    try:
        done = subprocess.run(["pyenv", "root"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return Path.home() / ".pyenv"
    return Path(done.stdout.strip())


def interpreter(version: str) -> str:
    """``version`` when ``pythonX.Y`` is on PATH (not a pyenv shim), else pyenv's newest of it.

    A pyenv shim on PATH runs only the versions pyenv has activated, so it does
    not count. Nothing found: ``version`` itself, which nox reports as missing.
    """
    root = pyenv_root()
    on_path = shutil.which(f"python{version}")
    if on_path and Path(on_path).parent != root / "shims":
        return version
    found = sorted(
        root.glob(f"versions/{version}.*/bin/python{version}"),
        key=lambda p: [int(part) for part in p.parent.parent.name.split(".") if part.isdigit()],
    )
    return str(found[-1]) if found else version


# (Python, Django requirement, extra interpreter options) for each lane.
LANES = [
    nox.param(interpreter("3.11"), "Django>=5.2,<5.3", [], id="django5.2"),
    nox.param(
        os.environ.get("PYTHON_DJANGO6") or interpreter("3.13"),
        "Django>=6,<7",
        ["-W", "error::DeprecationWarning"],
        id="django6",
    ),
]


@nox.session
@nox.parametrize(("python", "django", "python_options"), LANES)
def tests(session: nox.Session, django: str, python_options: list[str]) -> None:
    """pytest on one Django lane (``DATABASE_URL`` picks the database, as for ``make test``)."""
    session.install("-e", ".[dev]", django)
    session.run("python", "-m", "django", "--version")
    session.run("python", *python_options, "-m", "pytest", *session.posargs)
