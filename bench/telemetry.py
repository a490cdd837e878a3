"""The cost of the OpenTelemetry instrumentation, side by side with stock SQLAlchemy in one run.

Four setups, for asyncpg and psycopg (async), every round running each once, in an order that
rotates from round to round:
- ``stock``: SQLAlchemy's ``AsyncAdaptedQueuePool``;
- ``api_only``: ``FaultTolerantQueuePool`` with no SDK configured (the global providers are the
  API's no-op proxies: what a user without an SDK gets);
- ``sdk``: ``FaultTolerantQueuePool`` with the SDK: a tracer provider sampling always on with a
  batch span processor, and a meter provider with a periodic reader (1 s) whose exporter keeps
  nothing;
- ``sdk_floor``: stock ``AsyncAdaptedQueuePool`` plus the least any instrumentation of the
  conventions' pool metrics must do: two pool event listeners that record ``wait_time`` and
  ``use_time`` straight into the same SDK's histograms (one ``Histogram.record`` each per
  checkout + checkin). Not a product: a yardstick of what the SDK alone costs here.

Measures throughput (50 tasks looping ``SELECT 1`` through a pool of 10, ops/s), the CPU time of
this process per operation during that run (µs: the event loop is saturated, so this is what the
throughput ratio reflects, without the time the machine gave to other processes), and the cost of
one ``async with engine.connect()`` with no statement (µs, best of the rounds). Ratios are taken
round by round against the ``stock`` run of the same round (a paired comparison: the machine's
drift between rounds cancels out) and summarised by their median, with the lowest and highest.
``--verbose`` prints every round's throughput. The bar: throughput of sdk ≥ 0.95 and of
api_only ≥ 0.97 of stock.

    .venv/bin/python bench/telemetry.py [--rounds 10] [--seconds 1.5]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import time
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
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from fault_tolerant_pool import FaultTolerantQueuePool
from fault_tolerant_pool.telemetry import POOL_NAME, USE_TIME, WAIT_TIME
from fault_tolerant_pool.testing import PostgresServer

sys.path.insert(0, str(Path(__file__).parent))
from throughput import engine_cycle_us, make, throughput

SETUPS = ("stock", "api_only", "sdk", "sdk_floor")


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


def _cpu_seconds() -> float:
    """CPU time of this process (every thread: the event loop, the SDK's reader and processor)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def floor_engine(url: str, meter_provider: MeterProvider) -> AsyncEngine:
    """Stock pool + two histogram records per checkout + checkin, nothing else."""
    meter = meter_provider.get_meter("bench.sdk_floor")
    wait_time = meter.create_histogram(WAIT_TIME, "s")
    use_time = meter.create_histogram(USE_TIME, "s")
    attributes = {POOL_NAME: "floor"}
    engine = make(url, AsyncAdaptedQueuePool)
    pool = engine.sync_engine.pool

    @event.listens_for(pool, "checkout")
    def checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        now = time.perf_counter()
        wait_time.record(0.0, attributes)  # the wait itself is not timed: a record is the cost
        record.info["bench.checked_out_at"] = now

    @event.listens_for(pool, "checkin")
    def checkin(dbapi_connection: Any, record: Any) -> None:
        started = record.info.pop("bench.checked_out_at", None)
        if started is not None:
            use_time.record(time.perf_counter() - started, attributes)

    return engine


Row = tuple[str, dict[str, float], dict[str, tuple[float, float, float]]]


async def measure(
    label: str, url: str, rounds: int, seconds: float, verbose: bool = False
) -> list[Row]:
    tracer_provider = TracerProvider(sampler=ALWAYS_ON)
    tracer_provider.add_span_processor(BatchSpanProcessor(DiscardSpans()))
    metric_exporter = DiscardMetrics()
    meter_provider = MeterProvider(
        metric_readers=[PeriodicExportingMetricReader(metric_exporter, 1000)]
    )
    factories: dict[str, Callable[[], AsyncEngine]] = {
        "stock": lambda: make(url, AsyncAdaptedQueuePool),
        "api_only": lambda: make(url, FaultTolerantQueuePool),
        "sdk": lambda: make(
            url,
            FaultTolerantQueuePool,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        ),
        "sdk_floor": lambda: floor_engine(url, meter_provider),
    }
    ops: dict[str, list[float]] = {name: [] for name in SETUPS}
    cycle: dict[str, list[float]] = {name: [] for name in SETUPS}
    cpu_per_op: dict[str, list[float]] = {name: [] for name in SETUPS}
    for round_ in range(rounds):
        shift = round_ % len(SETUPS)  # rotate who goes first: drift of the machine cancels out
        for name in SETUPS[shift:] + SETUPS[:shift]:
            engine = factories[name]()
            await throughput(engine, 0.3)  # warm up: open the connections
            cpu_before = _cpu_seconds()
            ops_per_s = await throughput(engine, seconds)
            cpu_per_op[name].append((_cpu_seconds() - cpu_before) / (ops_per_s * seconds) * 1e6)
            ops[name].append(ops_per_s)
            cycle[name].append(await engine_cycle_us(engine))
            await engine.dispose()
    meter_provider.shutdown()
    tracer_provider.shutdown()
    assert metric_exporter.exports > 0, "the periodic reader never exported"

    def paired(values: dict[str, list[float]]) -> dict[str, tuple[float, float, float]]:
        summary = {}
        for name in SETUPS[1:]:
            pairs = zip(values[name], values["stock"], strict=True)
            ratios = [ours / stock for ours, stock in pairs]
            summary[name] = (statistics.median(ratios), min(ratios), max(ratios))
        return summary

    if verbose:
        for name, values in ops.items():
            print(f"{label} {name} ops/s by round: {[round(value) for value in values]}")
    best_cycle = {name: min(values) for name, values in cycle.items()}
    return [
        (
            f"{label} throughput (ops/s)",
            {name: statistics.median(values) for name, values in ops.items()},
            paired(ops),
        ),
        (
            f"{label} CPU per op (µs)",
            {name: statistics.median(values) for name, values in cpu_per_op.items()},
            paired(cpu_per_op),
        ),
        (
            f"{label} engine.connect+close (µs)",
            best_cycle,
            {name: (best_cycle[name] / best_cycle["stock"],) * 3 for name in SETUPS[1:]},
        ),
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    rows: list[Row] = []
    with PostgresServer(max_connections=200) as server:
        for driver in ("asyncpg", "psycopg"):
            url = server.url(driver)
            rows += await measure(driver, url, args.rounds, args.seconds, args.verbose)
    print(f"{args.rounds} rounds; ratios: median of the rounds' ratios to stock [lowest, highest]")
    print(f"{'measure':34}" + "".join(f"{name:>11}" for name in SETUPS))
    for name, values, ratios in rows:
        print(f"{name:34}" + "".join(f"{values[setup]:11.1f}" for setup in SETUPS))
        if "connect" in name:
            added = ", ".join(
                f"{setup} {values[setup] - values['stock']:+.1f}" for setup in SETUPS[1:]
            )
            print(f"{'':34} added per checkout (µs): {added}")
        else:
            spread = "".join(
                f"{setup} {ratios[setup][0]:.3f} [{ratios[setup][1]:.3f}, {ratios[setup][2]:.3f}]  "
                for setup in SETUPS[1:]
            )
            print(f"{'':34} vs stock: {spread}")


if __name__ == "__main__":
    asyncio.run(main())
