"""Prometheus metrics for the rendezvous server and for a peer (docs/api.md), via prometheus_client.

Server (:class:`ServerMetrics`, exported by ``serve --metrics HOST:PORT``): a Collector reads
what the server already keeps (peers online, registrations, coordinations, frames, the relay
hub's bytes, STUN and demux counts) at scrape time; the events those counters cannot carry
arrive through ``SignalServer.observers``: a session's outcome by winning step and NAT-pair
class, its time to connect, every relay fallback by cause, refusals by reason and TLS
handshakes that never completed. A session's outcome is counted once, from its initiator's
RESULT, on the node that initiator is registered with: across Redis nodes each node exports
its own, and the cluster's total is the sum.

Peer (:class:`PeerMetrics`, exported by the HTTP API's ``/metrics``): the connections this
peer made or accepted, by route and winning step, their time to connect, relay fallbacks by
cause, failed connects, and the bytes the API moved.

Every label value comes from a closed set (peers send free text; a scrape must stay small).
Each instance has its own CollectorRegistry, so several servers can live in one process.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from .nat.profile import NatProfile
from .report import RELAY_CAUSES, ConnectionReport
from .strategy.steps import StepKind

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CONNECT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
STEPS = frozenset(str(k) for k in StepKind)
NAT_TYPES = frozenset({"open", "full-cone", "restricted-cone", "port-restricted", "symmetric"})
OUTCOMES = frozenset({"direct", "relay", "failed"})
MAX_PENDING_SESSIONS = 10_000      # coordinations waiting for their initiator's RESULT


def _one_of(value: object, allowed: Iterable[str], other: str = "other") -> str:
    return value if isinstance(value, str) and value in allowed else other


def nat_type_of(profiles: object) -> str:
    """The TCP profile's classic NAT name from a peer's announced profiles, or "unknown"."""
    if not isinstance(profiles, list):
        return "unknown"
    for p in profiles:
        if isinstance(p, dict) and p.get("transport", "tcp") == "tcp":
            try:
                return _one_of(NatProfile.from_dict(p).nat_type, NAT_TYPES, "unknown")
            except (ValueError, TypeError):
                return "unknown"
    return "unknown"


def nat_pair(a: str, b: str) -> str:
    """The unordered NAT-pair class, e.g. ``port-restricted+symmetric``."""
    return "+".join(sorted((a, b)))


def _seconds(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and 0 <= value <= 3600 else None


class _ServerState(Collector):
    """What the server, its relay hub, STUN server and port demux already count, read at
    scrape time (no second bookkeeping of the same numbers)."""

    def __init__(self, server: Any, relay_hub: Any, stun: Any, demux: dict[str, int] | None) -> None:
        self.server, self.relay_hub, self.stun, self.demux = server, relay_hub, stun, demux

    def collect(self) -> Iterator[Metric]:
        srv = self.server
        m = dict(srv.metrics)
        info = GaugeMetricFamily("pyholepunch_server_node", "This server node (value 1)",
                                 labels=["node"])
        info.add_metric([srv.node_id], 1)
        yield info
        yield GaugeMetricFamily("pyholepunch_server_peers_online",
                                "Peers registered and connected to this node", value=len(srv.peers))
        yield GaugeMetricFamily("pyholepunch_server_connections",
                                "Signaling connections to this node, registered or not",
                                value=len(srv.connections))
        yield CounterMetricFamily("pyholepunch_server_registrations",
                                  "Registrations completed on this node", value=m["registrations"])
        yield CounterMetricFamily("pyholepunch_server_coordinations",
                                  "Punch coordinations (CONNECT answered with PUNCH to both peers)",
                                  value=m["punches"])
        frames = CounterMetricFamily("pyholepunch_server_frames", "Signaling frames",
                                     labels=["direction"])
        frames.add_metric(["in"], m["frames_in"])
        frames.add_metric(["out"], m["frames_out"])
        yield frames
        results = CounterMetricFamily("pyholepunch_server_results",
                                      "RESULT frames by outcome (one from each peer of a session)",
                                      labels=["outcome"])
        for outcome, key in (("direct", "successes"), ("relay", "relayed"), ("failed", "failures")):
            results.add_metric([outcome], m[key])
        yield results
        yield CounterMetricFamily("pyholepunch_server_relay_grants",
                                  "Built-in relay sessions granted", value=m["relays"])
        yield CounterMetricFamily("pyholepunch_server_turn_offers",
                                  "TURN relayed addresses passed between peers", value=m["turn_offers"])
        yield from self._relay()
        if self.demux is not None:
            demux = CounterMetricFamily("pyholepunch_server_accepted",
                                        "TCP connections on the server port by first bytes",
                                        labels=["kind"])
            for kind, n in dict(self.demux).items():
                demux.add_metric([kind], n)
            yield demux
        stats = getattr(self.stun, "stats", None)
        if isinstance(stats, dict):
            stun = CounterMetricFamily("pyholepunch_server_stun", "STUN server events",
                                       labels=["event"])
            for event, n in dict(stats).items():
                if isinstance(n, int):
                    stun.add_metric([str(event)], n)
            yield stun

    def _relay(self) -> Iterator[Metric]:
        hub = self.relay_hub
        if hub is None:
            return
        rm = hub.metrics
        yield CounterMetricFamily("pyholepunch_server_relayed_bytes",
                                  "Bytes the built-in relay carried (both directions)",
                                  value=rm.bytes_relayed)
        yield GaugeMetricFamily("pyholepunch_server_relays_active", "Relays pumping now",
                                value=rm.active_relays)
        yield CounterMetricFamily("pyholepunch_server_relays", "Relays paired and started",
                                  value=rm.relays_total)
        refused = CounterMetricFamily("pyholepunch_server_relay_refusals",
                                      "Relay connections refused, by reason", labels=["reason"])
        for reason, n in dict(rm.refused).items():
            refused.add_metric([reason], n)
        yield refused


class ServerMetrics:
    """The metrics of one rendezvous server node; ``exposition()`` is the scrape body."""

    def __init__(self, server: Any, *, relay_hub: Any = None, stun: Any = None,
                 demux: dict[str, int] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.outcomes = Counter("pyholepunch_server_punch_outcomes",
                                "Sessions by route, winning step and NAT-pair class (from the "
                                "initiator's RESULT)", ["route", "step", "nat_pair"], registry=r)
        self.connect_time = Histogram("pyholepunch_server_time_to_connect_seconds",
                                      "From connect() to TLS established, as the initiator reported",
                                      ["route"], buckets=CONNECT_BUCKETS, registry=r)
        self.fallbacks = Counter("pyholepunch_server_relay_fallbacks",
                                 "Sessions that fell back to a relay, by cause", ["reason"], registry=r)
        self.refusals = Counter("pyholepunch_server_refusals",
                                "Requests or connections refused, by reason", ["reason"], registry=r)
        self.tls_failures = Counter("pyholepunch_server_tls_handshake_failures",
                                    "Signaling connections whose TLS handshake never completed",
                                    registry=r)
        r.register(_ServerState(server, relay_hub, stun, demux))
        self._pairs: OrderedDict[str, str] = OrderedDict()   # session -> NAT-pair class
        self._lock = threading.Lock()       # the scrape thread reads while the loop writes
        self._http: Any = None
        server.observers.append(self.observe)

    def observe(self, event: str, fields: dict[str, Any]) -> None:
        with self._lock:
            if event == "coordination":
                a, b = (nat_type_of(p) for p in fields.get("profiles", ((), ())))
                self._pairs[str(fields.get("session"))] = nat_pair(a, b)
                while len(self._pairs) > MAX_PENDING_SESSIONS:
                    self._pairs.popitem(last=False)
            elif event == "result" and fields.get("initiator"):
                self._outcome(fields)
            elif event == "refused":
                self.refusals.labels(str(fields.get("reason", "other"))[:40]).inc()
            elif event == "tls_failed":
                self.tls_failures.inc()

    def _outcome(self, fields: dict[str, Any]) -> None:
        stats = fields.get("stats") if isinstance(fields.get("stats"), dict) else {}
        assert isinstance(stats, dict)
        route = _one_of(fields.get("outcome"), OUTCOMES)
        step = stats.get("step")
        step = "none" if route == "failed" or step is None else _one_of(step, STEPS)
        pair = self._pairs.pop(str(fields.get("session")), "unknown+unknown")
        self.outcomes.labels(route, step, pair).inc()
        took = _seconds(stats.get("time"))
        if route != "failed" and took is not None:
            self.connect_time.labels(route).observe(took)
        if route == "relay":
            self.fallbacks.labels(_one_of(stats.get("relay_cause"), RELAY_CAUSES)).inc()

    def exposition(self) -> bytes:
        with self._lock:
            return generate_latest(self.registry)

    # -- the HTTP endpoint of `serve --metrics` -------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on host:port (a prometheus_client thread); returns the port."""
        self._http, _thread = start_http_server(port, host, registry=_Locked(self))
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _Locked(CollectorRegistry):
    """The registry, read under the metrics lock (the HTTP thread vs the event loop)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        super().__init__(auto_describe=False)
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        with self._metrics._lock:
            collected = list(self._metrics.registry.collect())
        yield from collected


class PeerMetrics:
    """One peer's metrics, fed with its connection reports (the HTTP API does so)."""

    def __init__(self, open_connections: Callable[[], int] = lambda: 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Counter("pyholepunch_peer_connections",
                                   "Connections established, by direction, route and winning step",
                                   ["direction", "route", "step"], registry=r)
        self.failures = Counter("pyholepunch_peer_connect_failures",
                                "connect() calls that ended without a connection", registry=r)
        self.connect_time = Histogram("pyholepunch_peer_time_to_connect_seconds",
                                      "From connect()/accept() to TLS established", ["route"],
                                      buckets=CONNECT_BUCKETS, registry=r)
        self.fallbacks = Counter("pyholepunch_peer_relay_fallbacks",
                                 "Connections that fell back to a relay, by cause", ["reason"],
                                 registry=r)
        self.bytes = Counter("pyholepunch_peer_api_bytes", "Bytes moved through the HTTP API",
                             ["direction"], registry=r)
        self.requests = Counter("pyholepunch_peer_api_requests", "HTTP API requests by status",
                                ["status"], registry=r)
        r.register(_Gauge("pyholepunch_peer_open_connections",
                          "Connections the HTTP API holds open", open_connections))

    def connected(self, report: ConnectionReport) -> None:
        d = report.to_dict()
        route = _one_of(d["route"], OUTCOMES)
        direction = "out" if report.role == "initiator" else "in"
        step = d["winning_step"]
        self.connections.labels(direction, route, "none" if step is None else _one_of(step, STEPS)).inc()
        took = _seconds(d["total_time"])
        if took is not None:
            self.connect_time.labels(route).observe(took)
        if route == "relay":
            self.fallbacks.labels(_one_of(d.get("relay_cause"), RELAY_CAUSES)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Gauge(Collector):
    def __init__(self, name: str, doc: str, read: Callable[[], int]) -> None:
        self.name, self.doc, self.read = name, doc, read

    def collect(self) -> Iterator[Metric]:
        value = 0
        with contextlib.suppress(Exception):
            value = self.read()
        yield GaugeMetricFamily(self.name, self.doc, value=value)


__all__ = ["CONTENT_TYPE", "PeerMetrics", "ServerMetrics", "nat_pair", "nat_type_of"]
