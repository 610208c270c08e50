"""The test settings, plus an OpenTelemetry SDK writing spans to a file (JSON lines).

For ``runworker`` processes of tests/test_tracing.py: ``OPENWORKFLOW_TEST_SPANS``
names the file. A project configures its provider the same way, once per
process, before the worker runs (here: when the settings are imported).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from tests.settings import *  # noqa: F403


class JsonLinesExporter(SpanExporter):
    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [
            json.dumps(
                {
                    "name": span.name,
                    "trace_id": f"{span.context.trace_id:032x}",
                    "span_id": f"{span.context.span_id:016x}",
                    "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                    "attributes": dict(span.attributes or {}),
                }
            )
            for span in spans
        ]
        with self.lock, open(self.path, "a") as file:
            file.writelines(line + "\n" for line in lines)
        return SpanExportResult.SUCCESS


_provider = TracerProvider()
_provider.add_span_processor(
    SimpleSpanProcessor(JsonLinesExporter(os.environ["OPENWORKFLOW_TEST_SPANS"]))
)
trace.set_tracer_provider(_provider)
