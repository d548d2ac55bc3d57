"""The external metrics API without a cluster: quantities, selectors, the arrival rate,
the per-Agent cache, the HTTP routes (aiohttp's test server, and a real HTTPS server on
loopback), the APIService builders and the MetricsAvailable condition."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509

from shoal_api.base import status_patch
from shoal_api.runtime_state import PodStats
from shoal_api.scaling import ScalingPolicySpec, ScalingPolicyStatus
from shoal_operator.builders import apiservice as reg
from shoal_operator.builders.common import Owner
from shoal_operator.reconcilers import scaling as scaling_rec
from shoal_operator.scaling.metrics_api_server import (
    MetricsApiConfig,
    MetricsApiServer,
    SelectorError,
    agent_from_selector,
    make_app,
    quantity,
)
from shoal_operator.scaling.queue_metrics import (
    AgentNotFound,
    ArrivalRate,
    MetricsSource,
    MetricsUnavailable,
    QueueMetrics,
    QueueSample,
)
from shoal_operator.scaling.tls import self_signed_pem

NS = "team-a"
BASE = "/apis/external.metrics.k8s.io/v1beta1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def consumer(pending: int, in_flight: int = 0, delivered: int = 0) -> dict[str, Any]:
    return {
        "num_pending": pending,
        "num_ack_pending": in_flight,
        "delivered": {"consumer_seq": delivered, "stream_seq": 999},
    }


class FakeSource:
    """JetStream as the metrics see it; counts the reads."""

    def __init__(self) -> None:
        self.consumers: dict[tuple[str, str], dict[str, Any]] = {}
        self.stats: dict[tuple[str, str], list[PodStats]] = {}
        self.reads = 0
        self.stat_reads = 0
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def consumer_info(self, namespace: str, agent: str) -> dict[str, Any] | None:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return self.consumers.get((namespace, agent))

    async def pod_stats(self, namespace: str, agent: str) -> list[PodStats]:
        self.stat_reads += 1
        return list(self.stats.get((namespace, agent), []))


def metrics_with(
    source: FakeSource | None, clock: Clock | None = None
) -> tuple[QueueMetrics, Clock]:
    clock = clock or Clock()

    def get() -> MetricsSource | None:
        return source

    return QueueMetrics(get, clock=clock), clock


# -- values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "0"),
        (12, "12"),
        (12.0, "12"),
        (1.5, "1500m"),
        (1234.5, "1234500m"),
        (0.25, "250m"),
        (0.0006, "1m"),
        (0.0004, "0"),
        (2.9999999, "3"),
        (10_000_000, "10000000"),
        (float("nan"), "0"),
        (float("inf"), "0"),
    ],
)
def test_quantity(value: float, expected: str) -> None:
    assert quantity(value) == expected


@pytest.mark.parametrize(
    "selector",
    [
        "shoal.dev/agent=triage",
        "shoal.dev/agent==triage",
        " shoal.dev/agent = triage ",
        "shoal.dev/agent in (triage)",
        "shoal.dev/agent in(triage)",
        "shoal.dev/agent in ( triage )",
    ],
)
def test_selector_names_the_agent(selector: str) -> None:
    assert agent_from_selector(selector) == "triage"


@pytest.mark.parametrize(
    "selector",
    [
        "",
        "   ",
        "app=triage",
        "shoal.dev/agent",
        "shoal.dev/agent!=triage",
        "shoal.dev/agent notin (triage)",
        "shoal.dev/agent in (a,b)",
        "shoal.dev/agent in ()",
        "shoal.dev/agent=triage,tier=gold",
        "shoal.dev/agent=Triage",
        "shoal.dev/agent=tri.age",
        "shoal.dev/agent=>",
    ],
)
def test_selector_refuses_anything_else(selector: str) -> None:
    with pytest.raises(SelectorError):
        agent_from_selector(selector)


def test_arrival_rate_from_samples() -> None:
    rate = ArrivalRate(window=30)
    assert rate.observe(0.0, 100) == 0.0  # one sample: no rate yet
    assert rate.observe(2.0, 110) == pytest.approx(5.0)
    assert rate.observe(4.0, 130) == pytest.approx(7.5)  # (130 - 100) / 4
    assert rate.observe(4.0, 130) == pytest.approx(7.5)  # same instant: unchanged


def test_arrival_rate_forgets_samples_outside_the_window() -> None:
    rate = ArrivalRate(window=10)
    rate.observe(0.0, 0)
    rate.observe(5.0, 1000)  # a burst, long ago
    rate.observe(20.0, 1010)
    # The newest sample before the window (t=5) is the base: 10 tasks in 15 s.
    assert rate.rate() == pytest.approx(10 / 15)
    rate.observe(21.0, 1012)
    rate.observe(31.0, 1022)
    assert rate.rate() == pytest.approx((1022 - 1012) / (31 - 21))


def test_arrival_rate_restarts_with_the_consumer() -> None:
    rate = ArrivalRate()
    rate.observe(0.0, 500)
    rate.observe(1.0, 510)
    assert rate.observe(2.0, 3) == 0.0  # recreated consumer: counters started over
    assert rate.observe(3.0, 7) == pytest.approx(4.0)


def test_arrival_rate_keeps_few_samples() -> None:
    rate = ArrivalRate(window=1e9, max_samples=4)
    for t in range(10):
        rate.observe(float(t), t * 3)
    assert rate.rate() == pytest.approx(3.0)
    assert len(rate._samples) == 4


def test_queue_sample_counts_arrivals() -> None:
    sample = QueueSample.from_info(consumer(pending=7, in_flight=2, delivered=40))
    assert (sample.pending, sample.in_flight, sample.arrived) == (7, 2, 47)
    assert QueueSample.from_info({}) == QueueSample(0, 0, 0)


# -- QueueMetrics ------------------------------------------------------------------------


def test_lag_is_read_on_demand_and_cached_briefly() -> None:
    src = FakeSource()
    src.consumers[(NS, "triage")] = consumer(5, 2, 10)
    metrics, clock = metrics_with(src)

    async def scenario() -> None:
        assert await metrics.lag(NS, "triage") == (5, 2)
        src.consumers[(NS, "triage")] = consumer(9, 1, 12)
        clock.now += 0.3
        assert await metrics.lag(NS, "triage") == (5, 2)  # within max_age: cached
        assert src.reads == 1
        clock.now += 0.3
        assert await metrics.lag(NS, "triage") == (9, 1)
        assert await metrics.value("shoal_queue_lag", NS, "triage") == 10.0
        assert src.reads == 2

    asyncio.run(scenario())


def test_concurrent_requests_share_one_read() -> None:
    src = FakeSource()
    src.consumers[(NS, "triage")] = consumer(3)
    src.gate = asyncio.Event()
    metrics, _ = metrics_with(src)

    async def scenario() -> None:
        readers = [asyncio.create_task(metrics.lag(NS, "triage")) for _ in range(20)]
        for _ in range(5):  # the readers start, then the one read they wait for
            await asyncio.sleep(0)
        assert src.reads == 1
        readers[0].cancel()  # one caller gives up: the others still get the value
        assert src.gate is not None
        src.gate.set()
        results = await asyncio.gather(*readers[1:])
        assert results == [(3, 0)] * 19
        assert src.reads == 1

    asyncio.run(scenario())


def test_arrival_rate_through_queue_metrics() -> None:
    src = FakeSource()
    metrics, clock = metrics_with(src)

    async def scenario() -> None:
        src.consumers[(NS, "a")] = consumer(pending=10, delivered=0)
        assert await metrics.arrival_rate(NS, "a") == 0.0  # first request
        clock.now += 2
        # 4 delivered, 16 more pending: 20 more arrived in 2 s.
        src.consumers[(NS, "a")] = consumer(pending=26, in_flight=4, delivered=4)
        assert await metrics.arrival_rate(NS, "a") == pytest.approx(10.0)
        assert await metrics.value("shoal_arrival_rate", NS, "a") == pytest.approx(10.0)
        # Other Agents have histories of their own.
        src.consumers[(NS, "b")] = consumer(pending=1000)
        assert await metrics.arrival_rate(NS, "b") == 0.0

    asyncio.run(scenario())


def test_latency_is_the_slowest_pod() -> None:
    src = FakeSource()
    src.consumers[(NS, "a")] = consumer(0)
    metrics, clock = metrics_with(src)

    async def scenario() -> None:
        assert await metrics.latency_p95_ms(NS, "a") == 0.0  # no pod reported
        src.stats[(NS, "a")] = [
            PodStats(pod="a-1", p95_ms=120.5, in_flight=3),
            PodStats(pod="a-2", p95_ms=1834.25),
        ]
        clock.now += 1
        assert await metrics.value("shoal_latency_p95_ms", NS, "a") == 1834.25
        assert [s.pod for s in await metrics.pod_stats(NS, "a")] == ["a-1", "a-2"]
        assert src.stat_reads == 2

    asyncio.run(scenario())


def test_missing_consumer_and_missing_nats() -> None:
    src = FakeSource()
    metrics, _ = metrics_with(src)
    disconnected, _ = metrics_with(None)
    src.fail = None

    async def scenario() -> None:
        with pytest.raises(AgentNotFound, match="no JetStream consumer"):
            await metrics.value("shoal_latency_p95_ms", NS, "ghost")
        with pytest.raises(MetricsUnavailable, match="not connected"):
            await disconnected.lag(NS, "a")
        src.fail = TimeoutError("nats: timeout")
        with pytest.raises(MetricsUnavailable, match="TimeoutError"):
            await metrics.lag(NS, "other")

    asyncio.run(scenario())


def test_old_agents_are_forgotten() -> None:
    src = FakeSource()
    src.consumers[(NS, "old")] = consumer(1)
    src.consumers[(NS, "new")] = consumer(1)
    metrics, clock = metrics_with(src)

    async def scenario() -> None:
        await metrics.lag(NS, "old")
        clock.now += QueueMetrics.PRUNE_AFTER + 1
        await metrics.lag(NS, "new")
        assert set(metrics._agents) == {(NS, "new")}

    asyncio.run(scenario())


# -- HTTP ------------------------------------------------------------------------------


def with_client(
    metrics: QueueMetrics,
    body: Callable[[TestClient[web.Request, web.Application]], Awaitable[None]],
) -> None:
    async def scenario() -> None:
        async with TestClient(TestServer(make_app(metrics, wall_clock=lambda: 0.0))) as client:
            await body(client)

    asyncio.run(scenario())


def test_discovery_lists_the_three_metrics() -> None:
    metrics, _ = metrics_with(FakeSource())

    async def body(client: TestClient[web.Request, web.Application]) -> None:
        resp = await client.get(BASE)
        assert resp.status == 200
        doc = await resp.json()
        assert doc["kind"] == "APIResourceList"
        assert doc["groupVersion"] == "external.metrics.k8s.io/v1beta1"
        assert [r["name"] for r in doc["resources"]] == [
            "shoal_queue_lag",
            "shoal_latency_p95_ms",
            "shoal_arrival_rate",
        ]
        for r in doc["resources"]:
            assert (r["namespaced"], r["kind"], r["verbs"]) == (
                True,
                "ExternalMetricValueList",
                ["get"],
            )

    with_client(metrics, body)


def test_metric_values_as_the_hpa_reads_them() -> None:
    src = FakeSource()
    src.consumers[(NS, "triage")] = consumer(10, 2)
    src.stats[(NS, "triage")] = [PodStats(pod="p", p95_ms=1500.5)]
    metrics, _ = metrics_with(src)

    async def body(client: TestClient[web.Request, web.Application]) -> None:
        resp = await client.get(
            f"{BASE}/namespaces/{NS}/shoal_queue_lag",
            params={"labelSelector": "shoal.dev/agent=triage"},
        )
        assert resp.status == 200
        doc = await resp.json()
        assert doc == {
            "kind": "ExternalMetricValueList",
            "apiVersion": "external.metrics.k8s.io/v1beta1",
            "metadata": {},
            "items": [
                {
                    "metricName": "shoal_queue_lag",
                    "metricLabels": {"shoal.dev/agent": "triage"},
                    "timestamp": "1970-01-01T00:00:00Z",
                    "value": "12",
                }
            ],
        }
        resp = await client.get(
            f"{BASE}/namespaces/{NS}/shoal_latency_p95_ms?labelSelector=shoal.dev%2Fagent+in+%28triage%29"
        )
        assert (await resp.json())["items"][0]["value"] == "1500500m"
        resp = await client.get(
            f"{BASE}/namespaces/{NS}/shoal_arrival_rate",
            params={"labelSelector": "shoal.dev/agent=triage"},
        )
        assert (await resp.json())["items"][0]["value"] == "0"

    with_client(metrics, body)


def test_errors_are_status_objects() -> None:
    src = FakeSource()
    src.consumers[(NS, "triage")] = consumer(1)
    metrics, _ = metrics_with(src)
    disconnected, _ = metrics_with(None)

    async def status_of(
        client: TestClient[web.Request, web.Application], path: str, code: int
    ) -> dict[str, Any]:
        resp = await client.get(path)
        assert resp.status == code, await resp.text()
        doc: dict[str, Any] = await resp.json()
        assert (doc["kind"], doc["apiVersion"], doc["status"], doc["code"]) == (
            "Status",
            "v1",
            "Failure",
            code,
        )
        return doc

    async def body(client: TestClient[web.Request, web.Application]) -> None:
        sel = "?labelSelector=shoal.dev%2Fagent%3Dtriage"
        doc = await status_of(client, f"{BASE}/namespaces/{NS}/shoal_queue_lag", 400)
        assert doc["reason"] == "BadRequest"
        assert "shoal.dev/agent=NAME" in doc["message"]
        doc = await status_of(
            client, f"{BASE}/namespaces/{NS}/shoal_queue_lag?labelSelector=app%3Dx", 400
        )
        assert "'app=x'" in doc["message"]
        doc = await status_of(client, f"{BASE}/namespaces/{NS}/cpu_usage{sel}", 404)
        assert (doc["reason"], "cpu_usage" in doc["message"]) == ("NotFound", True)
        doc = await status_of(
            client,
            f"{BASE}/namespaces/{NS}/shoal_queue_lag?labelSelector=shoal.dev%2Fagent%3Dghost",
            404,
        )
        assert "ghost" in doc["message"]
        doc = await status_of(client, f"{BASE}/namespaces/a.b/shoal_queue_lag{sel}", 400)
        assert "namespace" in doc["message"]
        await status_of(client, "/openapi/v3", 404)
        await status_of(client, "/apis", 404)
        resp = await client.post(BASE)
        assert resp.status == 405

    with_client(metrics, body)

    async def unavailable(client: TestClient[web.Request, web.Application]) -> None:
        doc = await status_of(
            client, f"{BASE}/namespaces/{NS}/shoal_queue_lag?labelSelector=shoal.dev/agent=a", 503
        )
        assert doc["reason"] == "ServiceUnavailable"

    with_client(disconnected, unavailable)


def test_health_and_openapi() -> None:
    metrics, _ = metrics_with(None)

    async def body(client: TestClient[web.Request, web.Application]) -> None:
        for path in ("/healthz", "/livez", "/readyz"):
            resp = await client.get(path)
            assert (resp.status, await resp.text()) == (200, "ok")
        resp = await client.get("/openapi/v2")
        assert resp.status == 200
        doc = await resp.json()
        assert doc["swagger"] == "2.0"
        assert doc["info"]["title"]
        assert doc["info"]["version"]
        assert doc["paths"] == {}
        etag = resp.headers["ETag"]
        resp = await client.get("/openapi/v2", headers={"If-None-Match": etag})
        assert resp.status == 304

    with_client(metrics, body)


def test_https_server_on_loopback(tmp_path: Path) -> None:
    src = FakeSource()
    src.consumers[(NS, "triage")] = consumer(4, 1)
    metrics, _ = metrics_with(src)

    async def scenario(config: MetricsApiConfig) -> x509.Certificate:
        server = MetricsApiServer(metrics, config, "127.0.0.1", ["localhost", "127.0.0.1"])
        port = await server.start()
        try:
            assert port > 0
            url = f"https://127.0.0.1:{port}"
            async with httpx.AsyncClient(verify=False) as client:
                resp = await client.get(
                    f"{url}{BASE}/namespaces/{NS}/shoal_queue_lag",
                    params={"labelSelector": "shoal.dev/agent=triage"},
                )
                assert resp.status_code == 200
                assert resp.json()["items"][0]["value"] == "5"
            pem = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", port))
            return x509.load_pem_x509_certificate(pem.encode())
        finally:
            await server.stop()

    # Self-signed at start-up.
    cert = asyncio.run(scenario(MetricsApiConfig(port=0)))
    assert cert.issuer == cert.subject
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)

    # Or from files.
    pem = self_signed_pem(["given.example"])
    cert_pem, key_pem = pem.split(b"-----BEGIN PRIVATE KEY-----")
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    (tmp_path / "tls.key").write_bytes(b"-----BEGIN PRIVATE KEY-----" + key_pem)
    config = MetricsApiConfig(port=0, cert=str(tmp_path / "tls.crt"), key=str(tmp_path / "tls.key"))
    cert = asyncio.run(scenario(config))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["given.example"]


def test_config_from_env() -> None:
    assert MetricsApiConfig.from_env({}) == MetricsApiConfig(port=6443, register="none")
    assert MetricsApiConfig.from_env({"SHOAL_METRICS_API_PORT": "0"}).port is None
    assert MetricsApiConfig.from_env({"SHOAL_METRICS_API_PORT": "auto"}).port == 0
    cfg = MetricsApiConfig.from_env(
        {
            "SHOAL_METRICS_API_PORT": "8443",
            "SHOAL_REGISTER_APISERVICE": "local",
            "SHOAL_METRICS_API_CERT": "/c",
            "SHOAL_METRICS_API_KEY": "/k",
            "SHOAL_METRICS_API_SERVICE": "r1-operator-metrics-api",
        }
    )
    assert (cfg.port, cfg.register, cfg.cert, cfg.key, cfg.service) == (
        8443,
        "local",
        "/c",
        "/k",
        "r1-operator-metrics-api",
    )
    for bad in (
        {"SHOAL_METRICS_API_PORT": "70000"},
        {"SHOAL_METRICS_API_PORT": "https"},
        {"SHOAL_REGISTER_APISERVICE": "cluster"},
        {"SHOAL_METRICS_API_CERT": "/c"},
    ):
        with pytest.raises(ValueError):  # noqa: PT011  (each names its variable)
            MetricsApiConfig.from_env(bad)


# -- registration: builders and the condition ----------------------------------------


def test_local_registration_objects() -> None:
    svc = reg.local_service("shoal", 45717)
    assert svc["spec"] == {
        "type": "ExternalName",
        "externalName": "localhost",
        "ports": [{"name": "https", "port": 45717, "protocol": "TCP"}],
    }
    assert svc["metadata"]["namespace"] == "shoal"
    api = reg.apiservice("shoal", "shoal-metrics-api", 45717)
    assert api["metadata"]["name"] == "v1beta1.external.metrics.k8s.io"
    assert api["metadata"]["labels"]["app.kubernetes.io/part-of"] == "shoal"
    assert api["spec"] == {
        "group": "external.metrics.k8s.io",
        "version": "v1beta1",
        "service": {"namespace": "shoal", "name": "shoal-metrics-api", "port": 45717},
        "insecureSkipTLSVerify": True,
        "groupPriorityMinimum": 100,
        "versionPriority": 100,
    }


def observed_apiservice(
    namespace: str, name: str, available: str | None = "True", labels: dict[str, str] | None = None
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {"name": reg.APISERVICE_NAME, "labels": labels or {}},
        "spec": {"service": {"namespace": namespace, "name": name, "port": 443}},
    }
    if available is not None:
        obj["status"] = {
            "conditions": [{"type": "Available", "status": available, "message": "boom"}]
        }
    return obj


def test_whose_apiservice_it_is() -> None:
    ours = reg.provider(
        observed_apiservice("shoal", "shoal-metrics-api"), "shoal", "shoal-metrics-api"
    )
    assert (ours.status, ours.reason) == ("True", "Served")
    keda = reg.provider(
        observed_apiservice("keda", "keda-operator-metrics-apiserver"), "shoal", "shoal-metrics-api"
    )
    assert (keda.status, keda.reason, keda.foreign) == (
        "False",
        "ExternalMetricsProviderConflict",
        True,
    )
    assert "keda/keda-operator-metrics-apiserver" in keda.message
    # Marked as Shoal's (a chart install, a stale local registration): not a conflict.
    stale = reg.provider(
        observed_apiservice("t-old", "shoal-metrics-api", labels=dict(reg.PART_OF)),
        "shoal",
        "shoal-metrics-api",
    )
    assert stale.status == "True"
    unavailable = reg.provider(
        observed_apiservice("shoal", "shoal-metrics-api", "False"), "shoal", "shoal-metrics-api"
    )
    assert (unavailable.status, unavailable.reason) == ("False", "APIServiceUnavailable")
    assert "boom" in unavailable.message
    unchecked = reg.provider(
        observed_apiservice("shoal", "shoal-metrics-api", None), "shoal", "shoal-metrics-api"
    )
    assert unchecked.reason == "APIServiceUnavailable"
    missing = reg.provider(None, "shoal", "shoal-metrics-api")
    assert (missing.status, missing.reason) == ("False", "APIServiceMissing")
    local = reg.provider(
        {"metadata": {"name": reg.APISERVICE_NAME}, "spec": {}}, "shoal", "shoal-metrics-api"
    )
    assert local.foreign
    assert "the API server itself" in local.message


def policy_conditions(metrics: reg.MetricsProvider | None) -> dict[str, dict[str, Any]]:
    owner = Owner("ScalingPolicy", NS, "triage", "uid")
    spec = ScalingPolicySpec.model_validate({"targetRef": {"name": "triage"}, "maxReplicas": 3})
    observed = scaling_rec.PolicyObserved(frozenset({"triage"}), "triage", None, metrics=metrics)
    plan = scaling_rec.plan(owner, spec, observed)
    status, _ = scaling_rec.status(1, owner, observed, plan, [], ScalingPolicyStatus(), "t0")
    return {c["type"]: c for c in status_patch(status)["status"]["conditions"]}


def test_policies_say_who_serves_the_metrics() -> None:
    assert "MetricsAvailable" not in policy_conditions(None)
    conflict = reg.provider(observed_apiservice("keda", "keda-api"), "shoal", "shoal-metrics-api")
    cond = policy_conditions(conflict)["MetricsAvailable"]
    assert (cond["status"], cond["reason"]) == ("False", "ExternalMetricsProviderConflict")
    assert "keda/keda-api" in cond["message"]
    served = reg.provider(
        observed_apiservice("shoal", "shoal-metrics-api"), "shoal", "shoal-metrics-api"
    )
    conds = policy_conditions(served)
    assert conds["MetricsAvailable"]["status"] == "True"
    # Metrics do not decide Ready: the HPA exists either way.
    assert conds["Ready"]["reason"] == policy_conditions(conflict)["Ready"]["reason"]


def test_rfc3339_timestamp_shape() -> None:
    from shoal_api.timestamps import rfc3339

    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rfc3339(1_700_000_000.5))
    assert json.dumps(rfc3339(0)) == '"1970-01-01T00:00:00Z"'
