"""The database clock, as every query of the package reads it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import connections
from django.db.models.functions import Now as DjangoNow
from django.db.models.sql import Query


class Now(DjangoNow):
    """Django's ``Now()``, with six digits of seconds' fraction on SQLite.

    SQLite keeps datetimes as text. Django's ``Now()`` there has milliseconds
    (``'12:00:05.374'``) while the datetimes Django stores, and ``Now() +
    interval``, have microseconds (``'12:00:05.374000'``). Compared as text the
    second is later, so a run made due at ``Now()`` would not be due until the
    next millisecond. Here both have six digits.
    """

    def as_sqlite(self, compiler: Any, connection: Any, **extra_context: Any) -> Any:
        return self.as_sql(
            compiler,
            connection,
            template="STRFTIME('%%%%Y-%%%%m-%%%%d %%%%H:%%%%M:%%%%f000', 'NOW')",
            **extra_context,
        )


def database_now(using: str) -> datetime:
    """The database clock now (one ``SELECT`` of ``Now()``, no table read)."""
    connection = connections[using]
    query = Query(None)
    expression = Now().resolve_expression(query)
    sql, params = query.get_compiler(connection=connection).compile(expression)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {sql}", params)
        value = cursor.fetchone()[0]
    converters = connection.ops.get_db_converters(expression)
    for convert in [*converters, *expression.get_db_converters(connection)]:
        value = convert(value, expression, connection)
    return value  # type: ignore[no-any-return]
