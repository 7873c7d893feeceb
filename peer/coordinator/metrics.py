"""The coordinator's Prometheus metrics: the families built from its status document at each scrape.

``StatusCollector`` reads one fresh status document (the dict the dashboard
serves as ``/api/status``, docs/membership.md) per scrape and turns it into
run-, peer- and round-level metric families. A value that is missing, null
or not finite is left out rather than exported as NaN. Serving them over
HTTP is ``peer/coordinator/dashboard.py``'s job.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from peer.coordinator.runstate import PEER_STATES

StatusFn = Callable[[], dict]

ROUND_STATUSES = ("committed", "aborted")


def _number(value: Any) -> float | None:
    """A finite float from a status field, or None when it is missing, null, non-numeric or non-finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class StatusCollector(Collector):
    """Prometheus collector that turns the status document into metric families at scrape time."""

    def __init__(self, status_fn: StatusFn) -> None:
        self._status_fn = status_fn

    def describe(self) -> list[Metric]:
        """Nothing up front: the registry must not call status_fn at registration time."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield the run-, peer- and round-level metric families of one fresh status document."""
        status = self._status_fn()
        yield from self._run_metrics(status)
        yield from self._peer_metrics(status.get("peers") or [])
        yield from self._round_metrics(status.get("rounds") or [])

    @staticmethod
    def _run_metrics(status: dict) -> Iterator[Metric]:
        coordinator = status.get("coordinator") or {}
        summary = status.get("summary") or {}

        info = InfoMetricFamily("loconet_run", "The run this coordinator serves.")
        info.add_metric(
            [],
            {
                "run_id": str(status.get("run_id", "")),
                "coordinator_address": str(coordinator.get("address", "")),
                "version": str(coordinator.get("version", "")),
                "quorum_policy": str(status.get("quorum_policy", "")),
            },
        )
        yield info

        for name, doc, value in (
            ("loconet_epoch", "Current membership epoch.", status.get("epoch")),
            ("loconet_last_committed_round", "Id of the last committed round.", status.get("last_committed_round")),
            ("loconet_min_peers", "Minimum number of peers a round needs.", status.get("min_peers")),
            ("loconet_peers_alive", "Peers the coordinator considers alive.", summary.get("peers_alive")),
            (
                "loconet_coordinator_uptime_seconds", "Seconds since the coordinator started.",
                coordinator.get("uptime_s"),
            ),
            (
                "loconet_coordinator_start_time_seconds", "Unix time the coordinator started.",
                coordinator.get("started_at"),
            ),
        ):
            number = _number(value)
            if number is not None:
                yield GaugeMetricFamily(name, doc, value=number)

        # Every state is always exported (0 when empty) so that queries and alerts
        # see a series drop to zero instead of disappearing.
        counts = dict.fromkeys(PEER_STATES, 0)
        for peer in status.get("peers") or []:
            state = str(peer.get("state", "unknown"))
            counts[state] = counts.get(state, 0) + 1
        peers = GaugeMetricFamily("loconet_peers", "Peers known to the coordinator, by state.", labels=["state"])
        for state, count in counts.items():
            peers.add_metric([state], count)
        yield peers

        rounds = CounterMetricFamily("loconet_rounds", "Rounds finished, by outcome.", labels=["status"])
        for round_status in ROUND_STATUSES:
            number = _number(summary.get(f"rounds_{round_status}"))
            if number is not None:
                rounds.add_metric([round_status], number)
        yield rounds

        # What callers were refused (docs/security.md): by reason, and for their rate, by method.
        for name, doc, label, counts in (
            ("loconet_coordinator_refusals", "Calls the coordinator refused: forged identity, absurd claims, a full "
             "run, an address held by another key.", "reason", status.get("refusals") or {}),
            ("loconet_coordinator_rate_limited", "Calls refused for their client's rate, by method.", "method",
             status.get("rate_limited") or {}),
        ):
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, count in sorted(counts.items()):
                number = _number(count)
                if number is not None:
                    family.add_metric([str(key)[:64]], number)
            yield family

        for name, doc, value in (
            ("loconet_bytes_sent", "Bytes sent by all peers of the run.", summary.get("bytes_sent")),
            ("loconet_bytes_received", "Bytes received by all peers of the run.", summary.get("bytes_received")),
            (
                "loconet_peers_forgotten",
                "Records of gone peers the coordinator dropped to stay small (peer/coordinator/forgetting.py).",
                summary.get("peers_forgotten"),
            ),
        ):
            number = _number(value)
            if number is not None:
                yield CounterMetricFamily(name, doc, value=number)

    @staticmethod
    def _peer_metrics(peers: list[dict]) -> Iterator[Metric]:
        info = InfoMetricFamily("loconet_peer", "Who each peer is and its state.", labels=["peer"])
        families: dict[str, tuple[type, str, str]] = {
            # status field -> (family type, metric name, help)
            "loss": (GaugeMetricFamily, "loconet_peer_loss", "Last training loss a peer reported."),
            "eval_loss": (GaugeMetricFamily, "loconet_peer_eval_loss", "Loss of a peer's last evaluation."),
            "epsilon": (GaugeMetricFamily, "loconet_peer_privacy_epsilon",
                        "Differential privacy: the epsilon the run has spent, as a peer reports it."),
            "spread": (GaugeMetricFamily, "loconet_peer_spread",
                       "NoLoCo: distance of a replica's outer weights from the replicas' mean at its last evaluation."),
            "steps_per_s": (GaugeMetricFamily, "loconet_peer_steps_per_second", "Training speed of a peer."),
            "step": (GaugeMetricFamily, "loconet_peer_step", "Local training step of a peer."),
            "last_round": (GaugeMetricFamily, "loconet_peer_last_round", "Last round a peer took part in."),
            "last_heartbeat_s_ago": (
                GaugeMetricFamily,
                "loconet_peer_last_heartbeat_age_seconds",
                "Seconds since the coordinator last heard from a peer.",
            ),
            "samples": (CounterMetricFamily, "loconet_peer_samples", "Training samples a peer has processed."),
            "bytes_sent": (CounterMetricFamily, "loconet_peer_bytes_sent", "Bytes a peer has sent."),
            "bytes_received": (CounterMetricFamily, "loconet_peer_bytes_received", "Bytes a peer has received."),
        }
        built = {field: kind(name, doc, labels=["peer"]) for field, (kind, name, doc) in families.items()}
        refusals = CounterMetricFamily(
            "loconet_peer_refusals", "Calls a peer refused or cut off, by kind (caps, silent streams, rounds not "
            "open, no valid credential, refused or stalled state fetches).", labels=["peer", "kind"],
        )
        for peer in peers:
            peer_id = str(peer.get("peer_id", ""))
            info.add_metric(
                [peer_id],
                {
                    "address": str(peer.get("address", "")),
                    "name": str(peer.get("name", "")),
                    "state": str(peer.get("state", "")),
                    "activity": str(peer.get("activity", "")),
                },
            )
            for field, family in built.items():
                # Unknown values (null / NaN) are left out rather than exported as NaN.
                number = _number(peer.get(field))
                if number is not None:
                    family.add_metric([peer_id], number)
            for kind, count in sorted((peer.get("refusals") or {}).items()):
                number = _number(count)
                if number is not None:
                    refusals.add_metric([peer_id, str(kind)], number)
        yield info
        yield from built.values()
        yield refusals

    @staticmethod
    def _round_metrics(rounds: list[dict]) -> Iterator[Metric]:
        # One gauge for the most recent finished round keeps cardinality fixed;
        # a label per round id would create a new series every round.
        finished = next((r for r in rounds if r.get("status") in ROUND_STATUSES), None)
        if finished is None:
            return
        for name, doc, value in (
            ("loconet_last_round_id", "Id of the most recent finished round.", finished.get("round_id")),
            (
                "loconet_last_round_duration_seconds",
                "Wall time of the most recent finished round.",
                finished.get("duration_s"),
            ),
            ("loconet_last_round_bytes", "Bytes moved by the most recent finished round.", finished.get("bytes")),
            (
                "loconet_last_round_members",
                "Members of the most recent finished round.",
                len(finished.get("members") or []),
            ),
        ):
            number = _number(value)
            if number is not None:
                yield GaugeMetricFamily(name, doc, value=number)
