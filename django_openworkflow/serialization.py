"""JSON-only values: inputs, step results and outputs are checked, never converted."""

from __future__ import annotations

import json
import math
import traceback
from typing import Any

from .names import MAX_NAME_LENGTH, text_problem

# PostgreSQL's jsonb keeps numbers as numeric and writes 1e+16 back as 10000000000000000,
# an int: floats this large are refused everywhere, so none comes back converted.
LARGEST_FLOAT = 1e16


def json_problem(value: Any, path: str = "$") -> str | None:
    """Describe why ``value`` is not a plain JSON value, or return None if it is.

    Only ``None``, ``bool``, ``int``, finite ``float``, ``str``, ``list`` and
    ``dict`` with ``str`` keys pass: tuples, sets, dates, Decimals and the like
    would be converted (or lost) by a JSON round trip, so they are refused.
    So are strings with U+0000 (PostgreSQL cannot store them), values nested
    too deeply (or containing themselves) and integers too long to write out.
    """
    try:
        problem = _json_problem(value, path)
    except RecursionError:
        return f"{path} is nested too deeply for JSON (or contains itself)"
    if problem is None and isinstance(value, (list, dict)):
        limit = _max_json_depth()
        depth = json_depth(value) if limit else 0
        if limit and depth > limit:
            return (
                f"{path} is nested {depth} deep; MySQL and MariaDB store JSON nested at most "
                f"{limit} deep"
            )
    return problem


def json_depth(value: Any) -> int:
    """How deep lists and dicts nest in ``value``: 0 for a scalar, 1 for ``[]`` or ``[1]``."""
    if not isinstance(value, (list, dict)):
        return 0
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, (list, dict)))
    return deepest


def _max_json_depth() -> int | None:
    """How deep the engine's database stores JSON, where it has a limit (its store says)."""
    from .store import get_store

    return get_store().max_json_depth


def _json_problem(value: Any, path: str) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        problem = text_problem(value)
        return f"{path} {problem}" if problem else None
    if isinstance(value, int):
        if value.bit_length() > 3000:  # only huge ints can fail to become JSON text
            try:
                int.__repr__(value)
            except ValueError:  # more digits than sys.get_int_max_str_digits()
                return f"{path} is an integer with more digits than JSON text can hold here"
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return f"{path} is {value!r}, which JSON cannot hold"
        if abs(value) >= LARGEST_FLOAT:
            return (
                f"{path} is the float {value!r}: PostgreSQL gives floats of 1e16 and more back "
                "as integers; store it as an int or a string"
            )
        return None
    # Exactly list and dict: a subclass (Counter, defaultdict, OrderedDict) would come
    # back from the database as the plain type, behaving otherwise on replay.
    if type(value) is list:
        for index, item in enumerate(value):
            problem = _json_problem(item, f"{path}[{index}]")
            if problem:
                return problem
        return None
    if type(value) is dict:
        for key, item in value.items():
            if not isinstance(key, str):
                kind = type(key).__name__
                return f"{path} has the key {key!r} of type {kind}; JSON keys are strings"
            if key_problem := text_problem(key):
                return f"{path} has the key {key!r}, which {key_problem}"
            problem = _json_problem(item, f"{path}[{key!r}]")
            if problem:
                return problem
        return None
    return f"{path} is a {type(value).__module__}.{type(value).__qualname__} ({value!r:.80})"


def to_json(value: Any) -> str:
    """The JSON text a checked value is stored as."""
    return json.dumps(value, separators=(",", ":"))


def size_problem(value: Any, text: str | None = None) -> str | None:
    """Why ``value`` (as JSON ``text``) is too large to store, or None.

    The limit is ``OPENWORKFLOW["MAX_PAYLOAD_BYTES"]``.
    """
    from .conf import app_settings

    limit = app_settings.MAX_PAYLOAD_BYTES
    if not limit or value is None or isinstance(value, (bool, int, float)):
        return None
    size = len((to_json(value) if text is None else text).encode())
    if size <= limit:
        return None
    return f"it is {size:,} bytes of JSON, more than OPENWORKFLOW['MAX_PAYLOAD_BYTES'] ({limit:,})"


def ensure_json(value: Any, what: str) -> None:
    """Raise ``TypeError`` (not JSON) or ``ValueError`` (too large) naming ``what``."""
    problem = json_problem(value)
    if problem:
        raise TypeError(f"{what} is not a JSON value: {problem}")
    too_large = size_problem(value)
    if too_large:
        raise ValueError(f"{what} is too large: {too_large}")


MAX_ERROR_MESSAGE = 4_000  # characters of an error's message that are stored
MAX_ERROR_TRACEBACK = 50_000  # characters of its traceback (the end is kept: the raise site)


def storable_text(text: str, limit: int, *, keep_end: bool = False) -> str:
    """``text`` made storable: NUL and lone surrogates escaped, cut at ``limit`` characters.

    Error text comes from user code (an exception's message, a traceback with
    its source lines) and is never refused: it is made storable instead.
    """
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        cut = f"… [{len(text) - limit:,} characters cut]"
        text = cut + text[-limit:] if keep_end else text[:limit] + cut
    return text


def describe_exception(exc: BaseException) -> dict[str, Any]:
    """The stored form of an error: type, message and traceback, always storable.

    Never raises: an exception whose ``__str__`` raises is described by its type.
    """
    kind = type(exc).__name__
    try:
        message = str(exc)
    except Exception as broken:
        message = f"<str() of the {kind} failed: {type(broken).__name__}>"
    try:
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception as broken:
        trace = f"<the traceback of the {kind} could not be formatted: {type(broken).__name__}>"
    error = {
        "type": storable_text(kind, MAX_NAME_LENGTH),
        "message": storable_text(message, MAX_ERROR_MESSAGE),
        "traceback": storable_text(trace, MAX_ERROR_TRACEBACK, keep_end=True),
    }
    module = getattr(type(exc), "__module__", None)
    if isinstance(module, str) and module != "builtins":  # the class's dotted path
        path = f"{module}.{type(exc).__qualname__}"
        error["path"] = storable_text(path, MAX_NAME_LENGTH)
    return error
