"""The operator's JetStream administration: streams, buckets, per-Agent consumers (one per
priority band; the Agent's queue is their sum, see :func:`combined`), and
reading and watching the runtimes' shared state (circuit breaker, usage, pod stats).

Requests go to the JetStream API subjects with the builders' wire-form configs, so what
is compared is exactly what the server stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from shoal_api import nats_layout as nl
from shoal_api.runtime_state import CircuitRecord, PodStats, StateModel, UsageRecord
from shoal_operator.builders import jetstream

log = logging.getLogger(__name__)

API = "$JS.API"
CONSUMER_NOT_FOUND = 10014
STREAM_NOT_FOUND = 10059
# Exactly ``<ns>.<agent>``: the Agent's own record, not the limiter windows or cache
# entries below it, which change far more often and mean nothing to the status.
AGENT_KEYS = "*.*"
WATCH_BACKOFF = (1.0, 30.0)

R = TypeVar("R", bound=StateModel)
AgentCallback = Callable[[str, str, bool], None]


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
        self._buckets: dict[str, KeyValue] = {}
        # Set (and replaced) on every reconnect; each watch waits on the one current when
        # it started, so all of them see the same reconnect.
        self._reconnected = asyncio.Event()
        # (bucket, key) -> revision already reported malformed: one warning, not one per
        # reconcile.
        self._malformed: dict[tuple[str, str], int] = {}

    @classmethod
    async def connect(cls, url: str) -> JetStreamAdmin:
        admin: JetStreamAdmin | None = None

        async def reconnected() -> None:
            if admin is not None:
                admin.reconnected()

        nc = await nats.connect(
            url,
            name="shoal-operator",
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=5,
            reconnected_cb=reconnected,
        )
        admin = cls(nc)
        return admin

    def reconnected(self) -> None:
        """Restarts the watches: what was written while disconnected is replayed."""
        event, self._reconnected = self._reconnected, asyncio.Event()
        event.set()

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
                await self.js.create_key_value(
                    bucket=bucket, history=1, ttl=nl.BUCKET_TTL_SECONDS.get(bucket)
                )
                log.info("created KV bucket %s", bucket)

    async def ensure_consumers(self, desired: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Creates or updates an Agent's band consumers, one after the other in the given
        order (see ``builders.jetstream.consumers``); returns their :func:`combined` info."""
        return combined([await self.ensure_consumer(d) for d in desired])

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
            config = {**info["config"], **desired}
            if "filter_subjects" in desired:
                # The server refuses both; a consumer from before bands has the single one.
                config.pop("filter_subject", None)
            info = await self._request(
                f"CONSUMER.CREATE.{nl.TASKS_STREAM}.{name}",
                {"stream_name": nl.TASKS_STREAM, "config": config, "action": "update"},
            )
            log.info("updated consumer %s (%s)", name, ", ".join(changed))
        return info

    async def consumer_info(self, namespace: str, agent: str) -> dict[str, Any] | None:
        """The :func:`combined` info of the Agent's band consumers (those that exist);
        None when it has none."""

        async def one(name: str) -> dict[str, Any] | None:
            try:
                info: dict[str, Any] = await self._request(
                    f"CONSUMER.INFO.{nl.TASKS_STREAM}.{name}"
                )
            except JetStreamError as exc:
                if exc.code == CONSUMER_NOT_FOUND:
                    return None
                raise
            return info

        infos = await asyncio.gather(*map(one, nl.consumer_names(namespace, agent)))
        found = [i for i in infos if i is not None]
        return combined(found) if found else None

    async def remove_agent(self, namespace: str, agent: str) -> None:
        """Deletes the Agent's consumers, queued tasks and KV entries."""
        for name in nl.consumer_names(namespace, agent):
            try:
                await self._request(f"CONSUMER.DELETE.{nl.TASKS_STREAM}.{name}")
            except JetStreamError as exc:
                if exc.code != CONSUMER_NOT_FOUND:
                    raise
        await self._request(
            f"STREAM.PURGE.{nl.TASKS_STREAM}", {"filter": nl.agent_task_filter(namespace, agent)}
        )
        key = nl.agent_key(namespace, agent)
        for bucket in (nl.CIRCUIT_BUCKET, nl.USAGE_BUCKET, nl.CACHE_BUCKET, nl.STATS_BUCKET):
            # Purge the exact key and everything below it (cache entries).
            for subject in (f"$KV.{bucket}.{key}", f"$KV.{bucket}.{key}.>"):
                await self._request(f"STREAM.PURGE.KV_{bucket}", {"filter": subject})
        log.info("removed JetStream resources of %s/%s", namespace, agent)

    # -- the runtimes' shared state ----------------------------------------------------

    async def _bucket(self, bucket: str) -> KeyValue:
        kv = self._buckets.get(bucket)
        if kv is None:
            # Looking the bucket up is a request; the handle stays valid (it is a name).
            kv = self._buckets[bucket] = await self.js.key_value(bucket)
        return kv

    async def _record(self, bucket: str, namespace: str, agent: str, model: type[R]) -> R | None:
        return await self._entry(bucket, nl.agent_key(namespace, agent), model)

    async def _entry(self, bucket: str, key: str, model: type[R]) -> R | None:
        try:
            entry = await (await self._bucket(bucket)).get(key)
        except KeyNotFoundError:  # also a deleted or purged key
            return None
        try:
            return model.model_validate_json(entry.value or b"")
        except ValidationError as exc:
            # A runtime of another version, or a hand edit: the status keeps what it had.
            revision = entry.revision or 0
            if self._malformed.get((bucket, key)) != revision:
                self._malformed[(bucket, key)] = revision
                problems = "; ".join(e["msg"] for e in exc.errors())
                log.warning("ignoring malformed %s record %s: %s", bucket, key, problems)
            return None

    async def circuit_record(self, namespace: str, agent: str) -> CircuitRecord | None:
        """The Agent's circuit breaker record; None when missing or malformed."""
        return await self._record(nl.CIRCUIT_BUCKET, namespace, agent, CircuitRecord)

    async def usage_record(self, namespace: str, agent: str) -> UsageRecord | None:
        """The Agent's usage record; None when missing or malformed."""
        return await self._record(nl.USAGE_BUCKET, namespace, agent, UsageRecord)

    async def pod_stats(self, namespace: str, agent: str) -> list[PodStats]:
        """The live figures of the Agent's runtime pods, by pod name. A pod that stopped
        reporting is gone after the bucket's TTL (30 s)."""
        prefix = f"$KV.{nl.STATS_BUCKET}."
        # The stream knows which keys exist below the Agent: one request, then one direct
        # get per pod, instead of a watch (an ephemeral consumer) per call.
        info = await self._request(
            f"STREAM.INFO.KV_{nl.STATS_BUCKET}",
            {"subjects_filter": prefix + nl.stats_key(namespace, agent, "*")},
        )
        subjects = sorted((info.get("state") or {}).get("subjects") or {})
        records = await asyncio.gather(
            *(self._entry(nl.STATS_BUCKET, s.removeprefix(prefix), PodStats) for s in subjects)
        )
        return [r for r in records if r is not None]

    async def watch_agents(self, bucket: str, on_update: AgentCallback) -> None:
        """Calls ``on_update(namespace, agent, replay)`` for every write of an Agent's key
        in ``bucket``: first once per existing key (``replay``), then as writes happen.

        Runs until cancelled. A watch that fails is restarted with backoff; a reconnect
        restarts it too, and its replay covers whatever was written while disconnected.
        """
        delay = WATCH_BACKOFF[0]
        while True:
            reconnected = self._reconnected
            watcher: KeyValue.KeyWatcher | None = None
            try:
                kv = await self._bucket(bucket)
                # What is stored before the watch starts is the replay. (nats-py's own
                # end-of-initial-values marker can come before a value already in flight.)
                replayed = (await kv.status()).stream_info.state.last_seq
                # Keys only: the reconcile reads the value itself.
                watcher = await kv.watch(AGENT_KEYS, meta_only=True)
                delay = WATCH_BACKOFF[0]
                await _follow(watcher, on_update, reconnected, replayed)
                log.info("KV watch of %s restarting after a reconnect", bucket)
            except Exception as exc:
                log.warning("KV watch of %s failed (%s); restarting in %.0fs", bucket, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, WATCH_BACKOFF[1])
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py


async def _follow(
    watcher: KeyValue.KeyWatcher,
    on_update: AgentCallback,
    reconnected: asyncio.Event,
    replayed: int,
) -> None:
    """Passes the watcher's keys on until a reconnect; raises if the watch ends."""

    async def read() -> None:
        async for entry in watcher:
            if entry is None:  # nats-py's end-of-initial-values marker
                continue
            namespace, _, agent = entry.key.partition(".")
            on_update(namespace, agent, (entry.revision or 0) <= replayed)
        raise ConnectionError("the watch was stopped")

    reader = asyncio.create_task(read())
    waiter = asyncio.create_task(reconnected.wait())
    try:
        await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (reader, waiter):
            task.cancel()
        await asyncio.gather(reader, waiter, return_exceptions=True)
    failure = reader.exception() if reader.done() and not reader.cancelled() else None
    if failure is not None:
        raise failure


# What adds up across an Agent's band consumers to its one queue.
_SUMMED = ("num_pending", "num_ack_pending", "num_redelivered", "num_waiting")


def combined(infos: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """An Agent's band consumers' infos as one consumer info: the queue counts and the
    delivered sequence (a count of deliveries) summed, the rest from the first. Queue
    lag, arrival rate and the Agent status all read the whole queue this way."""
    if not infos:
        raise ValueError("no consumer infos to combine")
    total = dict(infos[0])
    for key in _SUMMED:
        total[key] = sum(int(i.get(key, 0)) for i in infos)
    total["delivered"] = {
        **(infos[0].get("delivered") or {}),
        "consumer_seq": sum(int((i.get("delivered") or {}).get("consumer_seq", 0)) for i in infos),
    }
    return total


def queue_counts(info: Mapping[str, Any]) -> tuple[int, int]:
    """(pending, in flight) of a consumer, or of an Agent's :func:`combined` consumers."""
    return int(info.get("num_pending", 0)), int(info.get("num_ack_pending", 0))


class JetStreamLink:
    """The operator's JetStream connection, made in the background: the operator runs
    (and reports NATS unavailable) until it exists, and keeps retrying to make it."""

    def __init__(self) -> None:
        self.admin: JetStreamAdmin | None = None
        self.ready = asyncio.Event()

    def get(self) -> JetStreamAdmin | None:
        return self.admin

    async def connected(self) -> JetStreamAdmin:
        await self.ready.wait()
        assert self.admin is not None
        return self.admin

    async def connect(self, url: str) -> None:
        """Connects and declares streams and buckets, retrying until it works."""
        delay = 1.0
        while True:
            try:
                admin = await JetStreamAdmin.connect(url)
                await admin.ensure_streams()
                await admin.ensure_buckets()
            except Exception as exc:
                log.warning("NATS at %s not usable yet (%s); retrying in %.0fs", url, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30)
                continue
            self.admin = admin
            self.ready.set()
            log.info("connected to NATS at %s", url)
            return
