"""The operator's JetStream administration: streams, buckets, per-Agent consumers.

Requests go to the JetStream API subjects with the builders' wire-form configs, so what
is compared is exactly what the server stores.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import nats
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from shoal_api import nats_layout as nl
from shoal_operator.builders import jetstream

log = logging.getLogger(__name__)

API = "$JS.API"
CONSUMER_NOT_FOUND = 10014
STREAM_NOT_FOUND = 10059


class JetStreamError(RuntimeError):
    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"JetStream error {code}: {description}")
        self.code = code


def differs(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Keys whose desired value the server does not have (server-side defaults ignored)."""
    return sorted(k for k, v in desired.items() if actual.get(k) != v)


class JetStreamAdmin:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js = nc.jetstream()

    @classmethod
    async def connect(cls, url: str) -> JetStreamAdmin:
        nc = await nats.connect(
            url,
            name="shoal-operator",
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=5,
        )
        return cls(nc)

    async def close(self) -> None:
        await self.nc.drain()

    async def _request(self, subject: str, body: Mapping[str, Any] | None = None) -> Any:
        payload = json.dumps(body).encode() if body is not None else b""
        msg = await self.nc.request(f"{API}.{subject}", payload, timeout=5)
        reply = json.loads(msg.data)
        if "error" in reply:
            err = reply["error"]
            raise JetStreamError(int(err.get("err_code", 0)), err.get("description", ""))
        return reply

    async def ensure_streams(self) -> None:
        for cfg in jetstream.streams():
            try:
                info = await self._request(f"STREAM.INFO.{cfg['name']}")
            except JetStreamError as exc:
                if exc.code != STREAM_NOT_FOUND:
                    raise
                await self._request(f"STREAM.CREATE.{cfg['name']}", cfg)
                log.info("created stream %s", cfg["name"])
                continue
            if changed := differs(cfg, info["config"]):
                await self._request(f"STREAM.UPDATE.{cfg['name']}", {**info["config"], **cfg})
                log.info("updated stream %s (%s)", cfg["name"], ", ".join(changed))

    async def ensure_buckets(self) -> None:
        for bucket in nl.BUCKETS:
            try:
                await self.js.key_value(bucket)
            except (NotFoundError, nats.js.errors.BucketNotFoundError):
                await self.js.create_key_value(bucket=bucket, history=1)
                log.info("created KV bucket %s", bucket)

    async def ensure_consumer(self, desired: Mapping[str, Any]) -> dict[str, Any]:
        """Creates or updates the consumer; returns its info (with queue counts)."""
        name = desired["durable_name"]
        try:
            info: dict[str, Any] = await self._request(f"CONSUMER.INFO.{nl.TASKS_STREAM}.{name}")
        except JetStreamError as exc:
            if exc.code != CONSUMER_NOT_FOUND:
                raise
            info = await self._request(
                f"CONSUMER.CREATE.{nl.TASKS_STREAM}.{name}",
                {"stream_name": nl.TASKS_STREAM, "config": dict(desired), "action": "create"},
            )
            log.info("created consumer %s", name)
            return info
        if changed := differs(desired, info["config"]):
            info = await self._request(
                f"CONSUMER.CREATE.{nl.TASKS_STREAM}.{name}",
                {
                    "stream_name": nl.TASKS_STREAM,
                    "config": {**info["config"], **desired},
                    "action": "update",
                },
            )
            log.info("updated consumer %s (%s)", name, ", ".join(changed))
        return info

    async def consumer_info(self, namespace: str, agent: str) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = await self._request(
                f"CONSUMER.INFO.{nl.TASKS_STREAM}.{nl.consumer_name(namespace, agent)}"
            )
        except JetStreamError as exc:
            if exc.code == CONSUMER_NOT_FOUND:
                return None
            raise
        return info

    async def remove_agent(self, namespace: str, agent: str) -> None:
        """Deletes the Agent's consumer, queued tasks and KV entries."""
        name = nl.consumer_name(namespace, agent)
        try:
            await self._request(f"CONSUMER.DELETE.{nl.TASKS_STREAM}.{name}")
        except JetStreamError as exc:
            if exc.code != CONSUMER_NOT_FOUND:
                raise
        await self._request(
            f"STREAM.PURGE.{nl.TASKS_STREAM}", {"filter": nl.agent_task_filter(namespace, agent)}
        )
        key = nl.agent_key(namespace, agent)
        for bucket in (nl.CIRCUIT_BUCKET, nl.USAGE_BUCKET, nl.CACHE_BUCKET):
            # Purge the exact key and everything below it (cache entries).
            for subject in (f"$KV.{bucket}.{key}", f"$KV.{bucket}.{key}.>"):
                await self._request(f"STREAM.PURGE.KV_{bucket}", {"filter": subject})
        log.info("removed JetStream resources of %s/%s", namespace, agent)


def queue_counts(info: Mapping[str, Any]) -> tuple[int, int]:
    """(pending, in flight) of a consumer."""
    return int(info.get("num_pending", 0)), int(info.get("num_ack_pending", 0))
