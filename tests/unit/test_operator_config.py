"""The operator's configuration: every flag and environment variable reaches the one
frozen value the composition root hands down, and what it turns on is built."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import pytest

from shoal_operator import config
from shoal_operator.app import assemble
from shoal_operator.cache import Indexes
from shoal_operator.clients.kube import Kube
from shoal_operator.scaling import MetricsApiConfig


def test_defaults() -> None:
    cfg = config.parse([], {})
    assert cfg == config.OperatorConfig()
    assert cfg.namespaces == ()
    assert cfg.nats_url == cfg.runtime_nats_url == "nats://nats:4222"
    assert cfg.runtime_image == config.DEFAULT_RUNTIME_IMAGE
    assert cfg.liveness == "http://0.0.0.0:8080/healthz"
    assert cfg.metrics_api == MetricsApiConfig(port=6443, register="none")
    assert (cfg.own_namespace, cfg.leader_election, cfg.leads_alone) == (None, True, True)
    assert (cfg.workers, cfg.drift_interval, cfg.heartbeat_interval) == (32, 60.0, 10.0)
    assert (cfg.metrics_port, cfg.verbose) == (9090, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.workers = 1  # type: ignore[misc]


def test_every_flag_is_honoured(tmp_path: Any) -> None:
    cfg = config.parse(
        [
            "-n",
            "a",
            "--namespace",
            "b",
            "--nats-url",
            "nats://op:4222",
            "--runtime-nats-url",
            "nats://pods:4222",
            "--runtime-image",
            "runtime:2",
            "--liveness",
            "http://127.0.0.1:1/healthz",
            "--standalone",
            "--metrics-api-port",
            "auto",
            "--metrics-api-cert",
            "/c.pem",
            "--metrics-api-key",
            "/k.pem",
            "--register-apiservice",
            "local",
            "--verbose",
        ],
        {"SHOAL_OPERATOR_NAMESPACE": "shoal"},
    )
    assert cfg.namespaces == ("a", "b")
    assert cfg.nats_url == "nats://op:4222"
    assert cfg.runtime_nats_url == "nats://pods:4222"
    assert cfg.runtime_image == "runtime:2"
    assert cfg.liveness == "http://127.0.0.1:1/healthz"
    assert cfg.metrics_api == MetricsApiConfig(
        port=0, cert="/c.pem", key="/k.pem", register="local"
    )
    assert cfg.verbose
    assert cfg.own_namespace == "shoal"
    assert not cfg.leader_election
    assert cfg.leads_alone


def test_every_environment_variable_is_honoured() -> None:
    env = {
        "SHOAL_NATS_URL": "nats://env:4222",
        "SHOAL_RUNTIME_IMAGE": "runtime:env",
        "SHOAL_OPERATOR_NAMESPACE": "shoal",
        "SHOAL_LEADER_ELECTION": "false",
        "SHOAL_HEARTBEAT_INTERVAL": "3",
        "SHOAL_WORKERS": "4",
        "SHOAL_DRIFT_INTERVAL": "7.5",
        "SHOAL_OPERATOR_METRICS_PORT": "0",
        "SHOAL_METRICS_MAX_AGE": "30",
        "SHOAL_METRICS_API_PORT": "0",
        "SHOAL_METRICS_API_SERVICE": "my-metrics",
        "SHOAL_REGISTER_APISERVICE": "local",
        "POD_NAME": "shoal-0",
    }
    cfg = config.parse([], env)
    assert cfg.nats_url == cfg.runtime_nats_url == "nats://env:4222"
    assert cfg.runtime_image == "runtime:env"
    assert (cfg.own_namespace, cfg.leader_election) == ("shoal", False)
    assert (cfg.heartbeat_interval, cfg.workers, cfg.drift_interval) == (3.0, 4, 7.5)
    assert (cfg.metrics_port, cfg.metrics_max_age) == (0, 30.0)
    assert cfg.metrics_api == MetricsApiConfig(port=None, register="local", service="my-metrics")
    assert cfg.instance == "shoal-0"
    # kopf run reads the same variables (kopf parses its own command line there).
    assert config.from_env(env) == cfg
    assert config.parse(
        [], {**env, "SHOAL_RUNTIME_NATS_URL": "nats://pods:1"}
    ).runtime_nats_url == ("nats://pods:1")


def test_flags_win_over_the_environment() -> None:
    env = {"SHOAL_NATS_URL": "nats://env:4222", "SHOAL_METRICS_API_PORT": "7000"}
    cfg = config.parse(["--nats-url", "nats://flag:4222", "--metrics-api-port", "7001"], env)
    assert cfg.nats_url == "nats://flag:4222"
    assert cfg.metrics_api is not None
    assert cfg.metrics_api.port == 7001
    assert config.parse([], env).metrics_api == MetricsApiConfig(port=7000)


@pytest.mark.parametrize(
    "argv",
    [
        ["--metrics-api-cert", "/c.pem"],
        ["--metrics-api-port", "https"],
        ["--metrics-api-port", "70000"],
        ["--register-apiservice", "remote"],
    ],
)
def test_bad_flags_exit(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        config.parse(argv, {})


def test_nonsense_metrics_api_settings_turn_it_off_not_the_operator() -> None:
    cfg = config.parse([], {"SHOAL_REGISTER_APISERVICE": "remote"})
    assert cfg.metrics_api is None
    assert cfg.metrics_api_error is not None
    assert "local or none" in cfg.metrics_api_error


class Index:
    def get(self, key: Any, default: Any = None) -> Any:
        return default

    def __iter__(self) -> Any:
        return iter(())


def parts(cfg: config.OperatorConfig) -> Any:
    return assemble(cfg, cast(Kube, object()), Indexes(*(Index() for _ in range(9))))


def test_standalone_runs_without_leader_election() -> None:
    env = {"SHOAL_OPERATOR_NAMESPACE": "shoal"}
    coordinated = parts(config.parse([], env))
    assert coordinated.charge.leader is not None
    assert coordinated.relay.leader is coordinated.charge.leader
    assert coordinated.heartbeat is not None
    alone = parts(config.parse(["--standalone"], env))
    assert alone.charge.leader is None
    assert alone.relay.leader is None
    assert alone.charge.leading()
    # Still a heartbeat: --standalone is about other replicas, not liveness.
    assert alone.heartbeat is not None
    assert parts(config.parse([], {})).charge.leader is None


def test_the_runtime_defaults_come_from_the_configuration() -> None:
    cfg = config.parse(
        ["--runtime-image", "runtime:3", "--runtime-nats-url", "nats://pods:4222"], {}
    )
    running = parts(cfg)
    runtime = running.controller.agents.runtime
    assert (runtime.image, runtime.nats_url) == ("runtime:3", "nats://pods:4222")
    assert (running.controller.workers, running.controller.drift_interval) == (32, 60.0)
