"""The cost of the OpenTelemetry instrumentation, side by side with stock SQLAlchemy in one run.

Three setups, for asyncpg and psycopg (async), alternating round by round:
- ``stock``: SQLAlchemy's ``AsyncAdaptedQueuePool``;
- ``api_only``: ``FaultTolerantQueuePool`` with no SDK configured (the global providers are the
  API's no-op proxies: what a user without an SDK gets);
- ``sdk``: ``FaultTolerantQueuePool`` with the SDK: a tracer provider sampling always on with a
  batch span processor, and a meter provider with a periodic reader (1 s) whose exporter keeps
  nothing.
Measures throughput (50 tasks looping ``SELECT 1``, ops/s, median of the rounds) and the cost of
one ``async with engine.connect()`` with no statement (µs, best of the rounds: the least disturbed
by other processes), and prints ratios to stock. The bar: throughput of sdk ≥ 0.95 and of api_only
≥ 0.97 of stock.

    .venv/bin/python bench/telemetry.py [--rounds 5] [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from fault_tolerant_pool import FaultTolerantQueuePool
from fault_tolerant_pool.testing import PostgresServer

sys.path.insert(0, str(Path(__file__).parent))
from throughput import engine_cycle_us, make, throughput


class DiscardSpans(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


class DiscardMetrics(MetricExporter):
    def __init__(self) -> None:
        super().__init__()
        self.exports = 0

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.exports += 1
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


async def measure(
    label: str, url: str, rounds: int, seconds: float
) -> list[tuple[str, float, float, float, float, float]]:
    tracer_provider = TracerProvider(sampler=ALWAYS_ON)
    tracer_provider.add_span_processor(BatchSpanProcessor(DiscardSpans()))
    metric_exporter = DiscardMetrics()
    meter_provider = MeterProvider(
        metric_readers=[PeriodicExportingMetricReader(metric_exporter, 1000)]
    )
    setups: dict[str, Callable[[], AsyncEngine]] = {
        "stock": lambda: make(url, AsyncAdaptedQueuePool),
        "api_only": lambda: make(url, FaultTolerantQueuePool),
        "sdk": lambda: make(
            url,
            FaultTolerantQueuePool,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        ),
    }
    results: dict[str, dict[str, list[float]]] = {k: {"ops": [], "cycle": []} for k in setups}
    for round_ in range(rounds):
        order = list(setups.items())
        if round_ % 2:  # alternate who goes first: drift of the machine cancels out
            order.reverse()
        for name, factory in order:
            engine = factory()
            await throughput(engine, 0.3)  # warm up: open the connections
            results[name]["ops"].append(await throughput(engine, seconds))
            results[name]["cycle"].append(await engine_cycle_us(engine))
            await engine.dispose()
    meter_provider.shutdown()
    tracer_provider.shutdown()
    assert metric_exporter.exports > 0, "the periodic reader never exported"
    ops = {k: statistics.median(v["ops"]) for k, v in results.items()}
    cycle = {k: min(v["cycle"]) for k, v in results.items()}
    return [
        (f"{label} throughput (ops/s)", ops["stock"], ops["api_only"], ops["sdk"],
         ops["api_only"] / ops["stock"], ops["sdk"] / ops["stock"]),
        (f"{label} engine.connect+close (µs)", cycle["stock"], cycle["api_only"], cycle["sdk"],
         cycle["api_only"] / cycle["stock"], cycle["sdk"] / cycle["stock"]),
    ]  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    rows: list[tuple[str, float, float, float, float, float]] = []
    with PostgresServer(max_connections=200) as server:
        for driver in ("asyncpg", "psycopg"):
            rows += await measure(driver, server.url(driver), args.rounds, args.seconds)
    print(
        f"{'measure':36} {'stock':>9} {'api_only':>9} {'sdk':>9} {'api/stock':>9} {'sdk/stock':>9}"
    )
    for name, stock, api, sdk, api_ratio, sdk_ratio in rows:
        print(f"{name:36} {stock:9.1f} {api:9.1f} {sdk:9.1f} {api_ratio:9.3f} {sdk_ratio:9.3f}")
        if "µs" in name:
            added = f"api_only {api - stock:+.1f} µs, sdk {sdk - stock:+.1f} µs"
            print(f"{'':36} added per checkout: {added}")


if __name__ == "__main__":
    asyncio.run(main())
