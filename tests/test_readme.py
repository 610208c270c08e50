"""The README's set-up snippets work in a new project (issue 10: a new user's trial)."""

from __future__ import annotations

import re

import pytest
from django.test import override_settings
from django.urls import reverse

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_urls_snippet_imports_what_it_uses():
    install = section("Install")
    assert "from django.urls import include, path\n" in install
    assert 'path("workflows/", include("django_openworkflow.urls")),' in install


@pytest.mark.django_db
def test_the_login_url_the_readme_gives_leads_anonymous_users_to_a_login_page(client):
    [login_url] = re.findall(r'^LOGIN_URL = "([^"]+)"$', section("Install"), re.M)
    with override_settings(LOGIN_URL=login_url):
        response = client.get(reverse("django_openworkflow:run-list"), follow=True)
    assert response.redirect_chain == [("/admin/login/?next=/workflows/", 302)]
    assert response.status_code == 200


def test_the_readme_says_where_signal_receivers_live():
    signals = section("Django signals")
    assert "# shop/signals.py\n" in signals
    assert "from . import signals  # noqa: F401  (connects the receivers)" in signals
