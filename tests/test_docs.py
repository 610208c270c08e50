"""docs/settings.md keeps up with the code: every key of ``conf.DEFAULTS`` is in its table
with the same default, and its checks table lists exactly the check ids of the package."""

from __future__ import annotations

import ast
import re

import pytest

from django_openworkflow.conf import DEFAULTS
from tests.conftest import ROOT

SETTINGS = (ROOT / "docs" / "settings.md").read_text()
PACKAGE = ROOT / "django_openworkflow"
CHECK_ID = r"django_openworkflow\.[EW]\d{3}"


def documented_defaults() -> dict[str, str]:
    """``| `KEY` | `default` | meaning |`` rows of the settings table."""
    return dict(re.findall(r"^\| `([A-Z_]+)` \| `([^`]+)` \|", SETTINGS, re.M))


def documented_check_ids() -> set[str]:
    return set(re.findall(rf"^\| `({CHECK_ID})` \|", SETTINGS, re.M))


def check_ids_in_the_code() -> set[str]:
    return {
        check_id
        for path in PACKAGE.rglob("*.py")
        for check_id in re.findall(CHECK_ID, path.read_text())
    }


@pytest.mark.parametrize("key", sorted(DEFAULTS))
def test_every_setting_is_documented_with_its_default(key):
    documented = documented_defaults()
    assert key in documented, f"docs/settings.md has no row for OPENWORKFLOW[{key!r}]"
    assert ast.literal_eval(documented[key]) == DEFAULTS[key]


def test_the_checks_table_lists_exactly_the_check_ids_of_the_code():
    in_the_code = check_ids_in_the_code()
    assert "django_openworkflow.E001" in in_the_code  # the search finds them at all
    assert documented_check_ids() == in_the_code
