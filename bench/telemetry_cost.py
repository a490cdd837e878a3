"""Where a measured checkout's telemetry time goes: this project's code, or the SDK's.

No database: the pool's telemetry hooks (``checkout_started``, ``checked_out``, ``checked_in``)
run in a loop on a stand-in connection record, with the OpenTelemetry SDK installed globally
(a meter provider with an in-memory reader, a tracer provider), as a pool calls them for one
checkout + checkin. Two variants alternate round by round in one process:

- ``with SDK``: everything, the histogram values handed to the SDK's ``Histogram.record``;
- ``project only``: the same, but the queued values are dropped instead of recorded.

``project only`` is this project's own cost per checkout + checkin; the difference is the SDK's
(two ``Histogram.record`` calls). Best of the rounds, µs. For the figures before a change, run
it against an older tree: ``git archive <commit> fault_tolerant_pool | tar -x -C /tmp/old`` and
``PYTHONPATH=/tmp/old .venv/bin/python bench/telemetry_cost.py``.

    .venv/bin/python bench/telemetry_cost.py [--rounds 15] [--cycles 20000]
"""

from __future__ import annotations

import argparse
import timeit
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

import fault_tolerant_pool
from fault_tolerant_pool.endpoint import Endpoint
from fault_tolerant_pool.telemetry import PoolTelemetry


class _Record:
    """Stands in for the pool's connection record (the telemetry uses its notes; an older tree,
    its ``__dict__``)."""

    def __init__(self) -> None:
        try:
            from fault_tolerant_pool.notes import ConnectionNotes
        except ImportError:  # a tree from before the notes
            return
        self.notes = ConnectionNotes()


class _Proxied:
    def __init__(self) -> None:
        self._connection_record = _Record()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cycles", type=int, default=20000)
    args = parser.parse_args()
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    trace.set_tracer_provider(TracerProvider())
    telemetry = PoolTelemetry(endpoint=Endpoint(address="db", port=5432, namespace="app"))
    assert telemetry.active()
    connection = _Proxied()
    record = connection._connection_record

    def cycle() -> None:
        telemetry.checked_out(telemetry.checkout_started(False), connection)
        telemetry.checked_in(record)

    deferred: Any = telemetry._instruments.deferred
    queue_type = type(deferred)
    record_all = queue_type.flush

    def drop(self: Any) -> None:
        self._values.clear()

    full: list[float] = []
    own: list[float] = []
    for _ in range(args.rounds):
        for flush, results in ((record_all, full), (drop, own)):
            queue_type.flush = flush
            results.append(timeit.timeit(cycle, number=args.cycles) / args.cycles * 1e6)
    queue_type.flush = record_all
    best_full, best_own = min(full), min(own)
    print(f"fault_tolerant_pool from {fault_tolerant_pool.__file__}")
    print("per checkout + checkin, best of", args.rounds, "rounds (µs)")
    print(f"  with SDK       {best_full:6.2f}")
    print(f"  project only   {best_own:6.2f}")
    print(f"  SDK (records)  {best_full - best_own:6.2f}")


if __name__ == "__main__":
    main()
