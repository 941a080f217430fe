"""Prometheus metrics of one service, served at ``/metrics`` in the text exposition format.

Each service owns its :class:`~prometheus_client.CollectorRegistry` (no process-wide default
registry: two services in one process, as in the tests, never share or clash). Counters count what
happened since this process started; the journal's own totals (which survive restarts and change
on rollback) are exported beside them as gauges read at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Live(Collector):
    """Gauges computed when scraped: journal counts per status, and the queues."""

    def __init__(self, counts: Callable[[], dict[str, int]], generation_queue: Callable[[], int]) -> None:
        self._counts, self._generation_queue = counts, generation_queue

    def collect(self) -> Iterator[Any]:
        counts = self._counts()
        journal = GaugeMetricFamily("lemoe_journal_edits", "Edits in the journal, by status", labels=["status"])
        for status, n in sorted(counts.items()):
            journal.add_metric([status], n)
        yield journal
        yield GaugeMetricFamily(
            "lemoe_edit_queue_depth",
            "Edits accepted or pending, not yet applied",
            value=counts.get("accepted", 0) + counts.get("pending", 0),
        )
        yield GaugeMetricFamily(
            "lemoe_generation_queue_depth", "Generation requests waiting for a batch", value=self._generation_queue()
        )


class ServiceMetrics:
    def __init__(self, counts: Callable[[], dict[str, int]], generation_queue: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.edits_accepted = Counter("lemoe_edits_accepted", "Edits accepted into the journal", registry=r)
        self.edits_applied = Counter("lemoe_edits_applied", "Edits applied to the model", registry=r)
        self.edits_failed = Counter("lemoe_edits_failed", "Edits whose batch failed", registry=r)
        self.batch_seconds = Histogram(
            "lemoe_batch_apply_seconds",
            "Seconds to apply one batch of edits",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.generation_seconds = Histogram(
            "lemoe_generation_seconds",
            "Seconds from a generation request's arrival to its last token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        r.register(_Live(counts, generation_queue))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
