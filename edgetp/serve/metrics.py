"""The server's Prometheus metrics (``GET /metrics``): :class:`ServerMetrics`.

Each server has its own registry (several servers may run in one process, as in the tests).
Most figures are read when the metrics are scraped, from the state the server keeps anyway:
the queue (length, capacity, the running sequence, requests by outcome, token counts), the
nodes (expected, joined), the open HTTP connections, and the time spent in each kind of span
(:mod:`edgetp.core.metrics`) on every node. Rank 0's spans come from this process's recorder;
the workers' are collected from them by the generation thread after a completed request, at
most every :data:`NODE_STATS_EVERY_S` (between two requests, so no step waits for it).
Histograms of the time to the first token and of the time per generated token are observed
when a request completes; HTTP answers are counted by status as they are sent.

The metric names and what they mean are listed in docs/api.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgetp.core.metrics import RECORDER, Span
from edgetp.net.transport import ClusterError

if TYPE_CHECKING:
    from edgetp.runtime.engine import GenerationResult
    from edgetp.runtime.master import Master
    from edgetp.serve.generation import GenerationQueue
    from edgetp.serve.jobs import Job

log = logging.getLogger("edgetp.serve.metrics")

NODE_STATS_EVERY_S = 5.0  # the workers' spans are collected at most this often
NODE_STATS_TIMEOUT_S = 2.0  # a worker that does not send its spans in this is skipped this time
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class NodeTimes:
    """(rank, span kind) -> spans and seconds, summed over the spans collected from workers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[tuple[int, str], tuple[int, float]] = {}

    def add(self, rank: int, spans: list[Span]) -> None:
        with self._lock:
            for span in spans:
                count, seconds = self._totals.get((rank, span.kind), (0, 0.0))
                self._totals[rank, span.kind] = (count + 1, seconds + span.duration_s)

    def totals(self) -> dict[tuple[int, str], tuple[int, float]]:
        """This process's spans as rank 0's, with the workers' collected so far."""
        with self._lock:
            out = dict(self._totals)
        out.update({(0, kind): total for kind, total in RECORDER.totals().items()})
        return out


class ServerMetrics:
    """The metrics of one server around ``master`` and its ``queue`` (set by the server).

    ``connections`` counts the open HTTP connections. :meth:`finished` is the queue's
    :class:`~edgetp.serve.generation.GenerationObserver`; :meth:`count_response` counts an
    answer by status.
    """

    def __init__(self, master: Master, connections: Callable[[], int]) -> None:
        self.master = master
        self.queue: GenerationQueue | None = None
        self.connections = connections
        self.nodes = NodeTimes()
        self.collect_every_s = NODE_STATS_EVERY_S
        self._collected_at = 0.0
        disable_created_metrics()  # no *_created series: this process's only metrics
        self.registry = CollectorRegistry()
        self.ttft = Histogram("edgetp_time_to_first_token_seconds",
                              "From the start of a generation to its first token (prefill)",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.token_time = Histogram("edgetp_time_per_output_token_seconds",
                                    "Time per generated token after the first (a decode step)",
                                    buckets=TOKEN_BUCKETS, registry=self.registry)
        self.responses = Counter("edgetp_http_responses", "HTTP answers by status code",
                                 ["status"], registry=self.registry)
        self.registry.register(_StateCollector(self))

    def render(self) -> bytes:
        """The metrics in Prometheus's text format."""
        return generate_latest(self.registry)

    def count_response(self, status: int) -> None:
        self.responses.labels(status=str(status)).inc()

    def finished(self, job: Job, result: GenerationResult) -> None:
        self.ttft.observe(result.ttft_ms / 1000)
        for ms in result.decode_ms:
            self.token_time.observe(ms / 1000)

    def answered(self) -> None:
        if time.monotonic() - self._collected_at >= self.collect_every_s:
            self.collect_node_spans()

    def collect_node_spans(self) -> None:
        """Add the workers' spans since the last collection (none from a local master)."""
        self._collected_at = time.monotonic()
        if self.master.n_ranks == 1 or self.master.missing_ranks():
            return
        try:
            collected = self.master.collect_stats(NODE_STATS_TIMEOUT_S)
        except ClusterError as exc:
            log.info("the workers' spans were not collected this time: %s", exc)
            return
        for rank, (_facts, spans) in collected.items():
            self.nodes.add(rank, spans)


class _StateCollector(Collector):
    """The figures read at scrape time."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._queue_metrics()
        master = self.metrics.master
        yield gauge("edgetp_nodes_expected", "Nodes of the cluster, the master included",
                    master.n_ranks)
        yield gauge("edgetp_nodes_joined", "Nodes joined (the master included)",
                    master.n_ranks - len(master.missing_ranks()))
        yield gauge("edgetp_http_connections", "HTTP connections open",
                    self.metrics.connections())
        yield from self._span_metrics()

    def _queue_metrics(self) -> Iterator[Metric]:
        queue = self.metrics.queue
        if queue is None:
            return
        queued, busy, outcomes = queue.snapshot()
        with queue.lock:
            tokens = dict(queue.tokens)
        yield gauge("edgetp_queue_length", "Requests waiting for their turn", queued)
        yield gauge("edgetp_queue_capacity", "Requests that may wait (--queue-size)",
                    queue.capacity)
        yield gauge("edgetp_active_sequences", "Sequences being generated (decoding together)",
                    busy)
        yield gauge("edgetp_kv_slots", "KV cache slots (sequences every node holds at once: "
                    "--max-batch, at most the workers' --kv-slots)", queue.slots())
        yield gauge("edgetp_kv_slots_in_use", "KV cache slots holding a sequence", busy)
        requests = CounterMetricFamily("edgetp_requests", "Completion requests by outcome "
                                       "(accepted, rejected, unavailable, completed, cancelled, "
                                       "skipped, failed, shutdown)", labels=["outcome"])
        for outcome, count in sorted(outcomes.items()):
            requests.add_metric([outcome], count)
        yield requests
        yield CounterMetricFamily("edgetp_prompt_tokens", "Prompt tokens of the generations "
                                  "that ran", value=tokens.get("prompt", 0))
        yield CounterMetricFamily("edgetp_generated_tokens", "Tokens generated (rate() of it: "
                                  "tokens/s)", value=tokens.get("generated", 0))

    def _span_metrics(self) -> Iterator[Metric]:
        seconds = CounterMetricFamily(
            "edgetp_node_span_seconds", "Time in each kind of span, by node (step: a whole "
            "step on the master; layer, allreduce, read_wait, read, head, embed, sample)",
            labels=["rank", "kind"])
        counts = CounterMetricFamily("edgetp_node_spans", "Spans recorded, by node and kind",
                                     labels=["rank", "kind"])
        for (rank, kind), (count, total) in sorted(self.metrics.nodes.totals().items()):
            seconds.add_metric([str(rank), kind], total)
            counts.add_metric([str(rank), kind], count)
        yield seconds
        yield counts


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
