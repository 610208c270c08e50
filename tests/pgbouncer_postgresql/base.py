"""Django's PostgreSQL backend, for test databases made and dropped through PgBouncer.

A pooler keeps server connections to the test database open after the tests
closed theirs, so a plain ``DROP DATABASE`` fails ("is being accessed by other
users"). This backend drops with ``WITH (FORCE)`` (PostgreSQL 13+), which ends
those server sessions (PgBouncer opens new ones when it needs them), and drops a
leftover test database before creating it. Everything else is Django's. The name
ends in ``postgresql`` so that the suite's ``ON_POSTGRES`` holds.
"""

from __future__ import annotations

from django.db.backends.postgresql import base, creation


class DatabaseCreation(creation.DatabaseCreation):
    def _execute_create_test_db(self, cursor, parameters, keepdb=False):
        if not keepdb:
            cursor.execute(f"DROP DATABASE IF EXISTS {parameters['dbname']} WITH (FORCE)")
        super()._execute_create_test_db(cursor, parameters, keepdb)

    def _destroy_test_db(self, test_database_name, verbosity):
        self.connection.close_pool()
        with self._nodb_cursor() as cursor:
            name = self.connection.ops.quote_name(test_database_name)
            cursor.execute(f"DROP DATABASE {name} WITH (FORCE)")


class DatabaseWrapper(base.DatabaseWrapper):
    creation_class = DatabaseCreation
