"""The README and the docs/ pages: their set-up snippets work in a new project (issue 10: a
new user's trial), and every relative link leads to a file and heading that exist (issue 11;
``mkdocs build --strict`` checks the links inside docs/, but not the README's)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest
from django.test import override_settings
from django.urls import reverse

from tests.conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]


def section(page: Path, title: str) -> str:
    """The text of the ``## title`` section of a page, up to the next ``## ``."""
    text = page.read_text()
    assert f"\n## {title}\n" in text, f"{page.relative_to(ROOT)} has no section {title!r}"
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_urls_snippet_imports_what_it_uses():
    install = section(README, "Install")
    assert "from django.urls import include, path\n" in install
    assert 'path("workflows/", include("django_openworkflow.urls")),' in install


@pytest.mark.django_db
def test_the_login_url_the_readme_gives_leads_anonymous_users_to_a_login_page(client):
    [login_url] = re.findall(r'^LOGIN_URL = "([^"]+)"$', section(README, "Install"), re.M)
    with override_settings(LOGIN_URL=login_url):
        response = client.get(reverse("django_openworkflow:run-list"), follow=True)
    assert response.redirect_chain == [("/admin/login/?next=/workflows/", 302)]
    assert response.status_code == 200


def test_the_docs_say_where_signal_receivers_live():
    signals = section(DOCS / "api.md", "Django signals")
    assert "# shop/signals.py\n" in signals
    assert "from . import signals  # noqa: F401  (connects the receivers)" in signals


# Links ------------------------------------------------------------------------------------

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text without its fenced code blocks (links and headings there are code)."""
    return FENCE.sub("", text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def mkdocs_slug(heading: str) -> str:
    """The anchor mkdocs (Python-Markdown's toc) gives a heading."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    """Anchors that work on GitHub and on the mkdocs site alike."""
    headings = re.findall(r"^#{1,6} (.+?)\s*$", prose(page.read_text()), re.M)
    return {github_slug(h) for h in headings} & {mkdocs_slug(h) for h in headings}


def relative_links(page: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(prose(page.read_text()))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


def test_the_readme_links_every_docs_page():
    linked = {target.split("#")[0] for target in relative_links(README)}
    missing = [page.name for page in sorted(DOCS.glob("*.md")) if f"docs/{page.name}" not in linked]
    assert missing == []


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {file.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    assert broken_links(page) == []


def test_the_link_check_finds_broken_links(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## Step names: `name:1`\n")
    page.write_text(
        "# Page\n\n[ok](other.md#step-names-name1) [gone](missing.md) "
        "[no heading](other.md#nothing) ![image](missing.png) <https://example.com> "
        "[web](https://example.com/x.md) [here](#page) [not here](#other)\n\n"
        "```md\n[in code](not-checked.md)\n```\n"
    )
    assert broken_links(page) == [
        f"missing.md: no file {tmp_path / 'missing.md'}",
        "other.md#nothing: no heading with the anchor #nothing in other.md",
        f"missing.png: no file {tmp_path / 'missing.png'}",
        "#other: no heading with the anchor #other in page.md",
    ]
