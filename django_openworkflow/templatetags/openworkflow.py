"""Template filters for the workflow pages: ``{% load openworkflow %}``.

The functions of ``django_openworkflow.display`` (which the admin uses too),
registered as filters. All return plain strings, so the template escapes
them like any other value.
"""

from __future__ import annotations

from django import template

from ..display import error_summary, pretty_json, short_duration

register = template.Library()

register.filter(error_summary)
register.filter(pretty_json)
register.filter(short_duration)

__all__ = ["error_summary", "pretty_json", "register", "short_duration"]
