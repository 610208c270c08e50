"""Template filters for the workflow pages: ``{% load openworkflow %}``.

Both return plain strings, so the template escapes them like any other value.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from django import template

register = template.Library()


@register.filter
def pretty_json(value: Any) -> str:
    """Stored JSON indented for a ``<pre>`` block (still escaped by the template)."""
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)
    except (TypeError, ValueError):
        return repr(value)


@register.filter
def short_duration(value: timedelta | None) -> str:
    """``timedelta`` as ``"850 ms"``, ``"12.3 s"``, ``"4 min 5 s"`` or ``"2 h 3 min"``."""
    if value is None:
        return ""
    seconds = value.total_seconds()
    if seconds < 1:
        return f"{round(seconds * 1000)} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"
