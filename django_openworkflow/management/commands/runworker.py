"""``manage.py runworker``: execute workflow runs until stopped."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connections
from django.db.migrations.executor import MigrationExecutor

from ...conf import app_settings
from ...names import check_name
from ...queues import served_queues
from ...reloading import RELOAD_GRACE, is_child, run_with_reloader
from ...worker import Worker
from ..workers import positive_int as _positive_int

if TYPE_CHECKING:
    from ...metrics import MetricsServer

LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG, 3: logging.DEBUG}


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {value!r}") from None
    if not (number > 0 and number != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {value!r}")
    return number


def _port(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number, not {value!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, not {number}")
    return number


class Command(BaseCommand):
    help = (
        "Execute workflow runs: claim due runs, run their steps, renew leases. "
        "SIGTERM/SIGINT finish the runs in flight and exit; a second one exits at once."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--concurrency",
            type=_positive_int,
            default=None,
            help=f"Runs executed at once (threads). Default: OPENWORKFLOW['CONCURRENCY'] "
            f"({app_settings.CONCURRENCY}).",
        )
        parser.add_argument(
            "--lease",
            type=_positive_float,
            default=None,
            metavar="SECONDS",
            help=f"How long a claim lasts without heartbeat. Default: "
            f"OPENWORKFLOW['LEASE_SECONDS'] ({app_settings.LEASE_SECONDS:g}).",
        )
        parser.add_argument(
            "--poll-interval",
            type=_positive_float,
            default=None,
            metavar="SECONDS",
            help=f"Longest pause between two looks at the queue. Default: "
            f"OPENWORKFLOW['POLL_INTERVAL'] ({app_settings.POLL_INTERVAL:g}).",
        )
        parser.add_argument(
            "--burst", action="store_true", help="Exit once no run is due instead of waiting."
        )
        parser.add_argument(
            "--reload",
            action="store_true",
            help="Restart the worker when a Python file changes (development; as runserver does).",
        )
        parser.add_argument(
            "--reload-grace",
            type=_positive_float,
            default=RELOAD_GRACE,
            metavar="SECONDS",
            help="With --reload: how long the runs in flight may take to finish before a "
            "reload releases them (they are replayed by the new process). "
            f"Default: {RELOAD_GRACE:g}.",
        )
        parser.add_argument(
            "--worker-id",
            default=None,
            help="Name shown on claimed runs. Default: host:pid:random.",
        )
        parser.add_argument(
            "--namespace",
            default=None,
            help=f"Claim runs of this namespace. Default: OPENWORKFLOW['NAMESPACE'] "
            f"({app_settings.NAMESPACE!r}).",
        )
        parser.add_argument(
            "--queue",
            action="append",
            default=[],
            metavar="NAME",
            dest="queues",
            help="Serve only this queue of OPENWORKFLOW['QUEUES'] (repeatable). "
            "Default: every queue.",
        )
        parser.add_argument(
            "--workflows-module",
            action="append",
            default=[],
            metavar="MODULE",
            help="Also import this module for its @workflow definitions (repeatable); "
            "each installed app's workflows.py is imported anyway.",
        )
        parser.add_argument(
            "--metrics-port",
            type=_port,
            default=None,
            metavar="PORT",
            help="Serve Prometheus metrics on http://ADDR:PORT/metrics (0: a free port, "
            "logged). Needs prometheus_client: pip install django-openworkflow[metrics].",
        )
        parser.add_argument(
            "--metrics-addr",
            default=None,
            metavar="ADDR",
            help="The address --metrics-port listens on. Default: 127.0.0.1.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self._configure_logging(options["verbosity"])
        if options["reload"] and options["burst"]:
            raise CommandError("--reload and --burst cannot be combined")
        for module in options["workflows_module"]:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise CommandError(
                    f"--workflows-module {module!r} cannot be imported: {exc}"
                ) from exc
        if options["namespace"] is not None and not options["namespace"]:
            raise CommandError("--namespace must not be empty")
        if options["worker_id"] is not None:
            try:
                check_name(options["worker_id"], "--worker-id")
            except (TypeError, ValueError) as exc:
                raise CommandError(str(exc)) from None
        self._check_metrics_options(options)
        self._check_migrations(app_settings.DATABASE)
        try:
            served_queues(options["queues"])
        except ValueError as exc:
            raise CommandError(f"--queue: {exc}") from None
        served: list[MetricsServer] = []

        def make_worker() -> Worker:
            worker = Worker(
                namespace=options["namespace"],
                concurrency=options["concurrency"],
                lease_seconds=options["lease"],
                poll_interval=options["poll_interval"],
                burst=options["burst"],
                worker_id=options["worker_id"],
                queues=options["queues"] or None,
            )
            # With --reload, in the process that runs the worker (each restart its own).
            if (metrics := self._serve_metrics(worker, options)) is not None:
                served.append(metrics)
            return worker

        if options["reload"]:
            if not settings.DEBUG and not is_child():
                logging.getLogger("django_openworkflow").warning(
                    "runworker --reload with DEBUG=False: the reloader is for development; "
                    "in production run the worker without it and restart it on deploy"
                )
            run_with_reloader(make_worker, grace=options["reload_grace"])
            return
        worker = make_worker()
        worker.install_signal_handlers()
        try:
            worker.run()
        finally:
            for metrics in served:
                metrics.stop()

    def _check_metrics_options(self, options: dict[str, Any]) -> None:
        if options["metrics_port"] is None:
            if options["metrics_addr"] is not None:
                raise CommandError("--metrics-addr needs --metrics-port")
            return
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise CommandError(
                "--metrics-port needs prometheus_client: pip install django-openworkflow[metrics]"
            ) from None

    def _serve_metrics(self, worker: Worker, options: dict[str, Any]) -> MetricsServer | None:
        """``/metrics`` on a daemon thread, the worker's metrics installed (``metrics.py``)."""
        port = options["metrics_port"]
        if port is None:
            return None
        from ...metrics import WorkerMetrics, serve

        addr = options["metrics_addr"] or "127.0.0.1"
        try:
            return serve(WorkerMetrics.for_worker(worker), addr, port)
        except OSError as exc:
            raise CommandError(
                f"--metrics-port {port}: cannot listen on {addr}:{port}: {exc.strerror or exc}"
            ) from None

    def _check_migrations(self, using: str) -> None:
        """Refuse to start on a database without this app's tables (``migrate`` not run)."""
        try:
            executor = MigrationExecutor(connections[using])
            plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
        except DatabaseError as exc:  # the database is away: the loop retries until it is back
            logging.getLogger("django_openworkflow").warning(
                "cannot check migrations database=%s error=%s", using, exc
            )
            return
        missing = [m.name for m, _ in plan if m.app_label == "django_openworkflow"]
        if missing:
            migrate = "manage.py migrate" + ("" if using == "default" else f" --database {using}")
            raise CommandError(
                f"the database {using!r} lacks {len(missing)} "
                f"migration{'s' if len(missing) > 1 else ''} of django_openworkflow "
                f"({', '.join(missing)}): run '{migrate}' first"
            )

    def _configure_logging(self, verbosity: int) -> None:
        """The level from ``--verbosity``; a console handler only where LOGGING set none.

        A handler on ``django_openworkflow`` or on an ancestor (the root logger,
        say, with ``JSONFormatter``) is the project's choice and is kept.
        """
        logger = logging.getLogger("django_openworkflow")
        logger.setLevel(LEVELS.get(verbosity, logging.DEBUG))
        if not logger.hasHandlers():
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
            )
            logger.addHandler(handler)
            logger.propagate = False
