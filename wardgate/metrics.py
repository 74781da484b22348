"""What the gateway counts, for Prometheus at /metrics.

The data path bumps plain counters (a dict increment, no lock, no label lookup); the exposition is
built from them when Prometheus scrapes (prometheus_client's collector interface). One gateway
process is one replica; Prometheus adds the replicas up.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# Seconds; statements through the gateway (forwarded to the answer's end) and reviews (asked to decided).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REVIEW_BUCKETS = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


class Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class Stats:
    def __init__(self) -> None:
        self.sessions = Counter[str]()  # connection -> sessions started
        self.sessions_refused = Counter[str]()  # SQLSTATE -> sign-ins or starts refused
        self.statements = Counter[str]()  # decision -> statements (allow, deny, review, approved, shadow)
        self.rules = Counter[tuple[str, str]]()  # (rule, action) -> matches
        self.masked = Counter[str]()  # column -> values masked (counted as sessions end)
        self.upstream_errors = Counter[str]()  # connection -> failed connects and lost connections
        self.latency = Histogram(LATENCY_BUCKETS)
        self.review_latency = Histogram(REVIEW_BUCKETS)


STATS = Stats()


def _labels(key: Any) -> list[str]:
    return list(key) if isinstance(key, tuple) else [key]


def _counter(name: str, doc: str, labels: list[str], counts: Counter[Any]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, n in sorted(counts.items()):
        family.add_metric(_labels(key), n)
    return family


def _gauge(name: str, doc: str, labels: list[str], counts: Counter[Any]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, n in sorted(counts.items()):
        family.add_metric(_labels(key), n)
    return family


class GatewayCollector(Collector):
    """The exposition of STATS and of the gateway's live state (sessions and upstream connections per
    connection) at scrape time."""

    def __init__(self, stats: Stats, live: Callable[[], Iterable[str]], extra: Callable[[], dict[str, Any]]) -> None:
        self.stats = stats
        self.live = live  # the connection name of each live session
        self.extra = extra  # recorder and event channel state

    def collect(self) -> Iterable[Any]:
        s = self.stats
        yield _counter("wardgate_sessions", "Native sessions started, by connection", ["connection"], s.sessions)
        yield _counter("wardgate_sessions_refused", "Sessions refused at sign-in or start, by SQLSTATE", ["code"],
                       s.sessions_refused)
        live = Counter(self.live())
        yield _gauge("wardgate_sessions_live", "Native sessions open now, by connection", ["connection"], live)
        yield _gauge("wardgate_upstream_connections", "Connections to the database held now (one per live session), "
                     "by connection", ["connection"], live)
        yield _counter("wardgate_statements", "Statements decided, by decision", ["decision"], s.statements)
        yield _counter("wardgate_rule_matches", "Rule matches, by rule and action (shadow rules too)", ["rule", "action"],
                       s.rules)
        yield _counter("wardgate_masked_values", "Values masked in results, by column", ["column"], s.masked)
        yield _counter("wardgate_upstream_errors", "Failed or lost database connections, by connection", ["connection"],
                       s.upstream_errors)
        yield HistogramMetricFamily("wardgate_statement_duration_seconds", "From forwarding a statement to the end of "
                                    "its answer, through the gateway", buckets=s.latency.buckets(), sum_value=s.latency.sum)
        yield HistogramMetricFamily("wardgate_review_decision_seconds", "From asking for a review to its decision",
                                    buckets=s.review_latency.buckets(), sum_value=s.review_latency.sum)
        extra = self.extra()
        yield GaugeMetricFamily("wardgate_recorder_up", "1 when the recorder process runs", value=int(extra["recorder"]))
        yield GaugeMetricFamily("wardgate_journal_backlog_files", "Journal files waiting for the store",
                                value=extra["backlog"])
        yield GaugeMetricFamily("wardgate_events_listening", "1 when this replica hears other replicas' changes "
                                "(PostgreSQL store)", value=int(extra["listening"]))
