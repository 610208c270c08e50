"""Load tests you run against your own database: workflows and audits, not the engine.

- ``chaos``: the workflow of ``manage.py chaos_workflows`` (kill workers,
  restart the database) and the audit that counts lost and doubled work.
- ``bench``: the workflows of ``manage.py bench_workflows`` (throughput and
  latency, in the format of the peer benchmark).
- ``soak`` and ``growth``: the workflow mix of ``manage.py soak_workflows``
  (many runs through long-lived workers) and the samples of its workers,
  whose growth it judges.

The core never imports this package: ``django_openworkflow``'s app, engine,
worker, admin, pages and its other commands run without it (a test walks the
package to prove it). Only the commands above import it, and their
``runworker`` processes import it with ``--workflows-module``. Its workflows
are not autodiscovered, so they never reach a project's registry otherwise.

Workflow names and namespaces (``django_openworkflow.chaos.*``,
``django_openworkflow.bench.*``, ``openworkflow-chaos``,
``openworkflow-bench``) are those from before this package existed; the
benchmark comparison and stored runs refer to them. The soak's are
``django_openworkflow.soak.*`` and ``openworkflow-soak``.
"""
