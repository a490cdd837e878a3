"""An OpenTelemetry SDK with an in-memory span exporter and metric reader, read back by name."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Histogram,
    InMemoryMetricReader,
    Metric,
    Sum,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON


class Otel:
    """Providers to pass as ``tracer_provider=`` / ``meter_provider=``, and what they received."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(sampler=ALWAYS_ON)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer = self.tracer_provider.get_tracer("app")

    @property
    def engine_kw(self) -> dict[str, Any]:
        return {"tracer_provider": self.tracer_provider, "meter_provider": self.meter_provider}

    # -- spans ------------------------------------------------------------------------------------

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        spans = self.exporter.get_finished_spans()
        return [s for s in spans if name is None or s.name == name]

    def clear_spans(self) -> None:
        self.exporter.clear()

    # -- metrics ----------------------------------------------------------------------------------

    def metrics(self) -> dict[str, Metric]:
        """Every metric of the last collection, by name (each collection reads the gauges anew)."""
        found: dict[str, Metric] = {}
        data = self.reader.get_metrics_data()
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    found[metric.name] = metric
        return found

    @staticmethod
    def points(metric: Metric) -> Iterator[tuple[dict[str, Any], Any]]:
        for point in metric.data.data_points:
            yield dict(point.attributes or {}), point

    def value(self, name: str, metrics: dict[str, Metric] | None = None, **attributes: Any) -> Any:
        """The value (sum) or count (histogram) of the point whose attributes include these.

        Attribute keys are given with ``__`` for ``.`` (``error__type="08001"``). 0 if absent.
        """
        metrics = self.metrics() if metrics is None else metrics
        metric = metrics.get(name)
        if metric is None:
            return 0
        wanted = {k.replace("__", "."): v for k, v in attributes.items()}
        total = 0
        for attrs, point in self.points(metric):
            if all(attrs.get(k) == v for k, v in wanted.items()):
                total += point.count if isinstance(metric.data, Histogram) else point.value
        return total

    @staticmethod
    def kind(metric: Metric) -> str:
        data = metric.data
        if isinstance(data, Histogram):
            return "histogram"
        if isinstance(data, Sum):
            return "counter" if data.is_monotonic else "updowncounter"
        return type(data).__name__.lower()

    def strings(self) -> Iterator[str]:
        """Every string in every span (name, attributes, events, status) and every metric point."""
        for span in self.spans():
            yield span.name
            yield from _strings(span.attributes)
            if span.status.description:
                yield span.status.description
            for event in span.events:
                yield event.name
                yield from _strings(event.attributes)
        for metric in self.metrics().values():
            yield metric.name
            for attrs, _ in self.points(metric):
                yield from _strings(attrs)

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def _strings(attributes: Any) -> Iterator[str]:
    for key, value in (attributes or {}).items():
        yield str(key)
        yield str(value)
