"""TEST-BED STAND-IN FOR A KUBELET. Not part of Shoal; never deployed anywhere.

On the local test bed kwok plays the kubelet of the fake nodes: pods are scheduled and
marked Running and Ready, but nothing runs. To run Agents end to end without containers,
this process runs every Agent pod (label ``shoal.dev/agent``, bound to a node, not
terminating) as a local process, ``python -m shoal_runtime`` by default, the way a kubelet
would run the pod's ``runtime`` container:

- the environment is the container's, resolved like a kubelet does (literal values with
  ``$(VAR)`` expansion, ``fieldRef``, ``secretKeyRef``, ``configMapKeyRef``, ``envFrom``),
  plus ``PATH``/``HOME``/``LANG``, ``PYTHONPATH=<repo>/examples:<repo>``, free loopback ports in
  ``SHOAL_HEALTH_PORT``/``SHOAL_METRICS_PORT`` (every pod would otherwise bind 8080/9090),
  ``SHOAL_STANDIN_POD=<ns>/<pod>`` and ``SHOAL_STANDIN_DIR=<state dir>``;
- a missing non-optional Secret or ConfigMap key keeps the process from starting (the
  kubelet's CreateContainerConfigError); it is logged and retried;
- a deleted pod's process gets SIGTERM, then SIGKILL after the pod's grace period;
- a process that exits while its pod exists is restarted with exponential backoff,
  1 s doubling to 60 s (CrashLoopBackOff);
- at most ``SHOAL_STANDIN_MAX_PODS`` (default 32) processes run at once, since the
  operator's scale benchmark creates 1,000 Agents; other pods wait, logged once each.

Nothing is reported back to the API: kwok already owns the pods' status, and a second
writer would fight it. What runs is in ``<state dir>/standin.json`` (``ns/pod`` ->
pid, ports, restarts; rewritten atomically on change); each process's output goes to
``<state dir>/logs/pods/<ns>_<pod>.log``.

Pods are watched (relisting on expiry, 410 Gone or error) into a cache, and a loop
compares that cache with the processes every second and on every event: level-triggered,
so a missed event cannot leave a stale process for longer than one relist (30 s).

Children stay in the stand-in's process group and carry ``SHOAL_STANDIN_DIR``, so
``LocalCluster.down()`` can reach them even if the stand-in itself died: it signals the
group, then sweeps ``/proc`` for processes whose environment names its state directory.
A stand-in starting on a state directory sweeps away children of a previous one too.

Who runs which namespace: ``LocalCluster.up()`` starts one stand-in for all namespaces
(the pytest session's included). A test that needs a stand-in of its own (another
command, a cap, killing it) labels its namespace ``shoal.dev/standin=off`` and starts one
with ``--namespace``. The cluster-wide stand-in skips namespaces carrying that label: it
GETs the namespace (a consistent read) right before starting each process, so a label set
before the pods are created always wins, and it refreshes the label set every few seconds
to stop processes in namespaces labelled later. A namespace label (rather than a pod
label) lets tests keep the operator's own Deployments unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal_api import pod_contract

REPO = Path(__file__).resolve().parents[2]
AGENT_LABEL = "shoal.dev/agent"
OPT_OUT_LABEL = "shoal.dev/standin"
OPT_OUT_VALUE = "off"
STATUS_FILE = "standin.json"
MARKER_ENV = "SHOAL_STANDIN_DIR"
POD_ENV = "SHOAL_STANDIN_POD"
COMMAND_ENV = "SHOAL_STANDIN_COMMAND"
MAX_PODS_ENV = "SHOAL_STANDIN_MAX_PODS"
DEFAULT_MAX_PODS = 32
DEFAULT_GRACE = 30.0
BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
# Like the kubelet: a process that ran this long starts its backoff over.
BACKOFF_RESET_AFTER = 600.0
# How soon to retry a pod whose Secret or ConfigMap is missing.
CONFIG_RETRY = 5.0
RELIST_SECONDS = 30
OPT_OUT_REFRESH = 5.0
TICK = 1.0
PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER")
TAG = "[shoal-testbed kubelet stand-in]"


def log(msg: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"{stamp} {TAG} {msg}", file=sys.stderr, flush=True)


def default_command() -> list[str]:
    raw = os.environ.get(COMMAND_ENV)
    if not raw:
        return [sys.executable, "-m", pod_contract.RUNTIME_MODULE]
    cmd = json.loads(raw)
    if not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd):
        raise ValueError(f"{COMMAND_ENV} must be a JSON list of strings, got {raw!r}")
    return cmd


def default_max_pods() -> int:
    return int(os.environ.get(MAX_PODS_ENV) or DEFAULT_MAX_PODS)


def read_status(state_dir: Path) -> dict[str, dict[str, Any]]:
    """What a stand-in on ``state_dir`` runs now: ``ns/pod`` -> pid, ports, restarts."""
    try:
        data: dict[str, dict[str, Any]] = json.loads((state_dir / STATUS_FILE).read_text())
    except FileNotFoundError:
        return {}
    return data


def find_children(state_dir: Path) -> list[int]:
    """Live processes started by a stand-in on ``state_dir`` (found by their environment)."""
    marker = f"{MARKER_ENV}={state_dir.resolve()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def kill_children(state_dir: Path, grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, whatever a stand-in on ``state_dir`` left running."""
    pids = find_children(state_dir)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _alive(p)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _alive(pid: int) -> bool:
    # A zombie is dead for our purposes: it only waits for its parent to reap it.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class EnvError(Exception):
    """The container's environment cannot be built yet (the kubelet's
    CreateContainerConfigError): the process is not started and the pod is retried."""


_EXPAND = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion: earlier variables only, ``$$`` escapes,
    unknown references stay as written."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _EXPAND.sub(sub, value)


_FIELD_MAP = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_ref(pod: dict[str, Any], path: str) -> str:
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        # The process listens on loopback, whatever address kwok made up for the pod.
        "status.podIP": "127.0.0.1",
        "status.podIPs": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
    }
    if path in simple:
        return str(simple[path])
    m = _FIELD_MAP.match(path)
    if m:
        return str(meta.get(m.group(1), {}).get(m.group(2), ""))
    raise EnvError(f"fieldRef {path!r} is not supported by the stand-in")


def pod_key(pod: dict[str, Any]) -> str:
    meta = pod["metadata"]
    return f"{meta['namespace']}/{meta['name']}"


def runtime_container(pod: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod.get("spec", {}).get("containers", [])
    for c in containers:
        if c.get("name") == "runtime":
            return c
    return containers[0] if containers else {}


def spec_grace(pod: dict[str, Any]) -> float:
    meta_grace = pod.get("metadata", {}).get("deletionGracePeriodSeconds")
    # 0 is kwok force-deleting a pod it saw terminating, not the grace the deleter asked for.
    if meta_grace:
        return float(meta_grace)
    value = pod.get("spec", {}).get("terminationGracePeriodSeconds")
    return DEFAULT_GRACE if value is None else float(value)


def wanted(pod: dict[str, Any]) -> bool:
    """A kubelet would run it: bound to a node, not terminating, not finished."""
    return (
        bool(pod.get("spec", {}).get("nodeName"))
        and not pod.get("metadata", {}).get("deletionTimestamp")
        and pod.get("status", {}).get("phase") not in ("Succeeded", "Failed")
    )


@dataclass
class Slot:
    """One pod's process and its restart bookkeeping."""

    key: str
    uid: str
    health_port: int
    metrics_port: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    not_before: float = 0.0
    waiting_reason: str = ""
    grace: float = DEFAULT_GRACE
    term_deadline: float | None = None
    killed: bool = False


class KubeletStandIn:
    """Runs the Agent pods of one cluster (or one namespace) as local processes."""

    def __init__(
        self,
        kubeconfig: Path,
        state_dir: Path,
        namespace: str | None = None,
        command: list[str] | None = None,
        max_pods: int | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.dir = state_dir.resolve()
        self.namespace = namespace
        self.command = command or default_command()
        self.max_pods = default_max_pods() if max_pods is None else max_pods
        self.status_file = self.dir / STATUS_FILE
        self.pod_logs = self.dir / "logs" / "pods"
        self.pods: dict[str, dict[str, Any]] = {}
        self.last_grace: dict[str, float] = {}
        self.slots: dict[str, Slot] = {}
        self.opted_out: set[str] = set()
        self.logged_opt_out: set[str] = set()
        self.logged_capped: set[str] = set()
        self.listed = False
        self.api: Any = None
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._last_status = ""

    # -- API -------------------------------------------------------------------------

    async def _get(self, path: str, query: Iterable[tuple[str, str]] = ()) -> dict[str, Any] | None:
        """A GET as raw JSON; None on 404."""
        resp = await self.api.call_api(
            path,
            "GET",
            query_params=list(query),
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=30,
        )
        try:
            body = await resp.read()
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise RuntimeError(f"GET {path}: HTTP {resp.status}: {body[:300]!r}")
            data: dict[str, Any] = json.loads(body)
            return data
        finally:
            resp.release()

    def _pods_path(self) -> str:
        if self.namespace:
            return f"/api/v1/namespaces/{self.namespace}/pods"
        return "/api/v1/pods"

    async def _relist(self) -> str:
        data = await self._get(self._pods_path(), [("labelSelector", AGENT_LABEL)])
        if data is None:
            raise RuntimeError(f"listing pods: {self._pods_path()} not found")
        pods = {}
        for pod in data.get("items", []):
            key = pod_key(pod)
            pods[key] = pod
            self.last_grace[key] = spec_grace(pod)
        self.pods = pods
        if not self.listed:
            log(f"listed {len(pods)} pod(s) labelled {AGENT_LABEL}")
        self.listed = True
        self._wake.set()
        rv: str = data["metadata"]["resourceVersion"]
        return rv

    async def _watch(self, rv: str) -> None:
        """Applies watch events from ``rv`` on until the server ends the watch (after
        RELIST_SECONDS) or ``rv`` is too old (410 Gone); the caller relists either way."""
        query = [
            ("labelSelector", AGENT_LABEL),
            ("watch", "true"),
            ("resourceVersion", rv),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(RELIST_SECONDS)),
        ]
        # Imported here, as in run(): cluster.py imports this module for its sweeping
        # helpers and should not pay for a Kubernetes client.
        import aiohttp

        resp = await self.api.call_api(
            self._pods_path(),
            "GET",
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(sock_read=RELIST_SECONDS + 30),
        )
        try:
            if resp.status == 410:
                return
            if resp.status != 200:
                raise RuntimeError(f"watch: HTTP {resp.status}: {(await resp.read())[:300]!r}")
            buf = b""
            # Lines can exceed aiohttp's readline limit (pods carry the Agent spec in env).
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    obj = event.get("object", {})
                    if event.get("type") == "ERROR":
                        if obj.get("code") == 410:
                            return
                        raise RuntimeError(f"watch error: {obj.get('message')}")
                    self._apply_event(event["type"], obj)
        finally:
            resp.release()

    def _apply_event(self, kind: str, pod: dict[str, Any]) -> None:
        if kind == "BOOKMARK":
            return
        key = pod_key(pod)
        if kind == "DELETED":
            self.pods.pop(key, None)
        else:
            self.pods[key] = pod
            self.last_grace[key] = spec_grace(pod)
        self._wake.set()

    async def _watch_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                # A relist after every watch (30 s at most, sooner on 410 Gone) is the
                # level-triggered safety net: whatever a watch missed, a list shows.
                await self._watch(await self._relist())
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = min(30.0, 0.5 * 2**failures)
                log(f"pod watch failed ({exc!r}); relisting in {delay:.0f}s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)

    async def _refresh_opt_outs(self) -> None:
        if self.namespace:
            return
        data = await self._get("/api/v1/namespaces", [("labelSelector", self._opt_out())])
        if data is not None:
            self.opted_out = {ns["metadata"]["name"] for ns in data.get("items", [])}

    @staticmethod
    def _opt_out() -> str:
        return f"{OPT_OUT_LABEL}={OPT_OUT_VALUE}"

    async def _namespace_opted_out(self, namespace: str) -> bool:
        """A consistent read right before a start: a label set before the pod was
        created is always seen, however stale the periodic list of opted-out namespaces."""
        if self.namespace:
            return False
        ns = await self._get(f"/api/v1/namespaces/{namespace}")
        labels = (ns or {}).get("metadata", {}).get("labels", {})
        off = ns is None or labels.get(OPT_OUT_LABEL) == OPT_OUT_VALUE
        if off:
            self.opted_out.add(namespace)
        else:
            self.opted_out.discard(namespace)
        return off

    async def _source(
        self, kind: str, namespace: str, name: str, optional: bool
    ) -> dict[str, str] | None:
        """A Secret's (decoded) or ConfigMap's data; None if it may be missing and is."""
        plural = "secrets" if kind == "Secret" else "configmaps"
        obj = await self._get(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
        if obj is None:
            if optional:
                return None
            raise EnvError(f"{kind} {namespace}/{name} not found")
        data: dict[str, str] = obj.get("data") or {}
        if kind == "Secret":
            # surrogateescape: a non-UTF-8 secret reaches the process byte for byte.
            return {
                k: base64.b64decode(v).decode("utf-8", "surrogateescape") for k, v in data.items()
            }
        return dict(data)

    async def _key_ref(self, kind: str, namespace: str, ref: dict[str, Any]) -> str | None:
        optional = bool(ref.get("optional", False))
        data = await self._source(kind, namespace, ref.get("name", ""), optional)
        if data is None:
            return None
        key = ref["key"]
        if key not in data:
            if optional:
                return None
            raise EnvError(f"{kind} {namespace}/{ref.get('name')} has no key {key!r}")
        return data[key]

    async def container_env(self, pod: dict[str, Any]) -> dict[str, str]:
        """The runtime container's environment as a kubelet would build it."""
        namespace = pod["metadata"]["namespace"]
        container = runtime_container(pod)
        env: dict[str, str] = {}
        for src in container.get("envFrom", []):
            prefix = src.get("prefix", "")
            for kind, ref_key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                ref = src.get(ref_key)
                if ref is None:
                    continue
                data = await self._source(
                    kind, namespace, ref.get("name", ""), bool(ref.get("optional"))
                )
                env.update({prefix + k: v for k, v in (data or {}).items()})
        for var in container.get("env", []):
            name = var["name"]
            source = var.get("valueFrom")
            value: str | None
            if source is None:
                value = expand(var.get("value", ""), env)
            elif "fieldRef" in source:
                value = field_ref(pod, source["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in source:
                value = await self._key_ref("Secret", namespace, source["secretKeyRef"])
            elif "configMapKeyRef" in source:
                value = await self._key_ref("ConfigMap", namespace, source["configMapKeyRef"])
            else:
                # resourceFieldRef needs quantity arithmetic; nothing of Shoal's uses it.
                log(f"{pod_key(pod)}: env {name}: {sorted(source)} unsupported, left unset")
                value = None
            if value is not None:
                env[name] = value
        return env

    # -- processes -------------------------------------------------------------------

    def _ports_in_use(self) -> set[int]:
        return {p for s in self.slots.values() for p in (s.health_port, s.metrics_port)}

    def _free_port(self, *also_taken: int) -> int:
        taken = self._ports_in_use() | set(also_taken)
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port: int = s.getsockname()[1]
            if port not in taken:
                return port

    def _process_env(self, slot: Slot, container_env: dict[str, str]) -> dict[str, str]:
        env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
        # The image holds the examples; the repository root lets tests load handlers
        # from tests/ (test-bed only).
        env["PYTHONPATH"] = os.pathsep.join((str(REPO / "examples"), str(REPO)))
        env["PYTHONUNBUFFERED"] = "1"
        env.update(container_env)
        # Ours win over the pod's: they are what makes many pods fit on one loopback.
        env[pod_contract.HEALTH_PORT_ENV] = str(slot.health_port)
        env[pod_contract.METRICS_PORT_ENV] = str(slot.metrics_port)
        env[POD_ENV] = slot.key
        env[MARKER_ENV] = str(self.dir)
        return env

    def _log_path(self, key: str) -> Path:
        return self.pod_logs / (key.replace("/", "_") + ".log")

    def _spawn(self, slot: Slot, env: dict[str, str]) -> None:
        path = self._log_path(slot.key)
        with path.open("ab") as out:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            out.write(f"--- {TAG} {stamp}: starting {self.command!r}\n".encode())
            out.flush()
            # Not a new session: the children share the stand-in's process group, so
            # signalling the group (LocalCluster.down) reaches them too.
            slot.proc = subprocess.Popen(
                self.command,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        slot.started = time.monotonic()
        slot.term_deadline = None
        slot.killed = False
        slot.waiting_reason = ""

    async def _start(self, slot: Slot, pod: dict[str, Any], now: float) -> bool:
        try:
            container_env = await self.container_env(pod)
        except EnvError as exc:
            reason = str(exc)
            if reason != slot.waiting_reason:
                log(f"{slot.key}: not started: {reason}; retrying every {CONFIG_RETRY:.0f}s")
            slot.waiting_reason = reason
            slot.not_before = now + CONFIG_RETRY
            return False
        try:
            self._spawn(slot, self._process_env(slot, container_env))
        except OSError as exc:
            log(f"{slot.key}: cannot start {self.command!r}: {exc}")
            self._schedule_restart(slot, now)
            return False
        assert slot.proc is not None
        log(
            f"{slot.key}: started pid {slot.proc.pid} (health :{slot.health_port}, "
            f"metrics :{slot.metrics_port}, restarts {slot.restarts}); "
            f"output in {self._log_path(slot.key)}"
        )
        return True

    def _schedule_restart(self, slot: Slot, now: float) -> float:
        if slot.started and now - slot.started >= BACKOFF_RESET_AFTER:
            slot.restarts = 0
        delay = min(BACKOFF_MAX, BACKOFF_MIN * 2.0**slot.restarts)
        slot.restarts += 1
        slot.not_before = now + delay
        return delay

    def _terminate(self, slot: Slot, now: float, why: str) -> None:
        assert slot.proc is not None
        if slot.term_deadline is None:
            slot.grace = self.last_grace.get(slot.key, slot.grace)
            slot.term_deadline = now + slot.grace
            log(f"{slot.key}: {why}; SIGTERM to pid {slot.proc.pid} (grace {slot.grace:.0f}s)")
            with contextlib.suppress(ProcessLookupError):
                slot.proc.send_signal(signal.SIGTERM)
        elif now >= slot.term_deadline and not slot.killed:
            log(f"{slot.key}: pid {slot.proc.pid} still running after {slot.grace:.0f}s; SIGKILL")
            slot.killed = True
            with contextlib.suppress(ProcessLookupError):
                slot.proc.kill()

    def _reap(self, slot: Slot, pod: dict[str, Any] | None, now: float) -> None:
        """Notices an exited process; schedules its restart if its pod still wants it."""
        if slot.proc is None:
            return
        code = slot.proc.poll()
        if code is None:
            return
        ran = now - slot.started
        pid = slot.proc.pid
        slot.proc = None
        if slot.term_deadline is not None:
            log(f"{slot.key}: pid {pid} stopped (exit code {code})")
            slot.term_deadline = None
            return
        if pod is not None:
            delay = self._schedule_restart(slot, now)
            log(
                f"{slot.key}: pid {pid} exited with code {code} after {ran:.1f}s while its "
                f"pod exists; restarting in {delay:.0f}s (back-off, restart {slot.restarts})"
            )

    async def reconcile(self) -> None:
        now = time.monotonic()
        desired = {
            key: pod
            for key, pod in self.pods.items()
            if wanted(pod) and key.split("/", 1)[0] not in self.opted_out
        }
        for key, slot in list(self.slots.items()):
            pod = desired.get(key)
            if pod is not None and pod["metadata"].get("uid") != slot.uid:
                pod = None  # same name, new pod: the old process goes first
            self._reap(slot, pod, now)
            if slot.proc is not None and pod is None:
                self._terminate(slot, now, self._why_stop(slot))
            elif slot.proc is None and pod is None:
                del self.slots[key]
        await self._start_wanted(desired, now)
        self.logged_capped &= desired.keys()
        for key in self.last_grace.keys() - self.pods.keys() - self.slots.keys():
            del self.last_grace[key]
        self._log_opt_outs()
        self._write_status()

    async def _start_wanted(self, desired: dict[str, dict[str, Any]], now: float) -> None:
        """Starts the pods that have no process, oldest first, up to the cap."""
        running = sum(1 for s in self.slots.values() if s.proc is not None)
        order = sorted(
            desired.items(), key=lambda kv: (kv[1]["metadata"].get("creationTimestamp", ""), kv[0])
        )
        for key, pod in order:
            known = self.slots.get(key)
            if known is not None and (known.proc is not None or now < known.not_before):
                continue
            if running >= self.max_pods:
                if key not in self.logged_capped:
                    log(
                        f"{key}: not run: {running} processes already "
                        f"({MAX_PODS_ENV}={self.max_pods}); it starts when one stops"
                    )
                    self.logged_capped.add(key)
                continue
            if await self._namespace_opted_out(key.split("/", 1)[0]):
                continue
            slot = known
            if slot is None:
                health = self._free_port()
                # Stable across restarts, so a test can keep probing the same pod.
                slot = Slot(key, pod["metadata"].get("uid", ""), health, self._free_port(health))
                self.slots[key] = slot
            self.logged_capped.discard(key)
            if await self._start(slot, pod, now):
                running += 1

    def _why_stop(self, slot: Slot) -> str:
        pod = self.pods.get(slot.key)
        if pod is None:
            return "pod deleted"
        if pod["metadata"].get("deletionTimestamp"):
            return "pod terminating"
        if slot.key.split("/", 1)[0] in self.opted_out:
            return f"namespace labelled {self._opt_out()}"
        if pod["metadata"].get("uid") != slot.uid:
            return "pod replaced by one of the same name"
        return f"pod {pod.get('status', {}).get('phase')}"

    def _log_opt_outs(self) -> None:
        for key in self.pods:
            ns = key.split("/", 1)[0]
            if ns in self.opted_out and ns not in self.logged_opt_out:
                log(f"namespace {ns} is labelled {self._opt_out()}: leaving its pods alone")
                self.logged_opt_out.add(ns)

    def _write_status(self) -> None:
        status = {
            key: {
                "pid": s.proc.pid,
                "uid": s.uid,
                "health_port": s.health_port,
                "metrics_port": s.metrics_port,
                "restarts": s.restarts,
                "terminating": s.term_deadline is not None,
                "log": str(self._log_path(key)),
            }
            for key, s in sorted(self.slots.items())
            if s.proc is not None
        }
        text = json.dumps(status, indent=2, sort_keys=True)
        if text == self._last_status:
            return
        tmp = self.status_file.with_suffix(".json.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.status_file)
        self._last_status = text

    # -- lifecycle -------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        next_opt_out = 0.0
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK)
            self._wake.clear()
            if not self.listed:
                continue
            try:
                if time.monotonic() >= next_opt_out:
                    await self._refresh_opt_outs()
                    next_opt_out = time.monotonic() + OPT_OUT_REFRESH
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log(f"reconcile failed ({exc!r}); trying again")

    async def _shutdown(self) -> None:
        now = time.monotonic()
        for slot in self.slots.values():
            self._reap(slot, None, now)
            if slot.proc is not None:
                self._terminate(slot, now, "stand-in stopping")
        while any(s.proc is not None for s in self.slots.values()):
            now = time.monotonic()
            for slot in self.slots.values():
                self._reap(slot, None, now)
                if slot.proc is not None:
                    self._terminate(slot, now, "stand-in stopping")
            self._write_status()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.2)
            self._wake.clear()
        self.slots.clear()
        self._write_status()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        from kubernetes_asyncio import config

        self.pod_logs.mkdir(parents=True, exist_ok=True)
        left = kill_children(self.dir)
        if left:
            log(f"stopped {len(left)} process(es) a previous stand-in left: {left}")
        scope = f"namespace {self.namespace}" if self.namespace else "all namespaces"
        log(
            f"TEST-BED STAND-IN FOR A KUBELET (not part of Shoal): running pods labelled "
            f"{AGENT_LABEL} in {scope} as local processes {self.command!r}, at most "
            f"{self.max_pods}; state in {self.dir}"
        )
        # Passed explicitly: kubernetes_asyncio read KUBECONFIG when it was imported.
        self.api = await config.new_client_from_config(config_file=str(self.kubeconfig))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        # A child's exit wakes the loop at once instead of at the next tick.
        loop.add_signal_handler(signal.SIGCHLD, self._wake.set)
        watcher = asyncio.create_task(self._watch_loop())
        reconciler = asyncio.create_task(self._reconcile_loop())
        try:
            await self._stopping.wait()
        finally:
            for task in (watcher, reconciler):
                task.cancel()
            for task in (watcher, reconciler):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            log("stopping: SIGTERM to every process, SIGKILL after its pod's grace period")
            await self._shutdown()
            await self.api.close()
            log("stopped")


def main(
    kubeconfig: Path,
    state_dir: Path,
    namespace: str | None = None,
    max_pods: int | None = None,
) -> int:
    standin = KubeletStandIn(kubeconfig, state_dir, namespace=namespace, max_pods=max_pods)
    asyncio.run(standin.run())
    return 0


__all__ = [
    "AGENT_LABEL",
    "MARKER_ENV",
    "OPT_OUT_LABEL",
    "OPT_OUT_VALUE",
    "STATUS_FILE",
    "KubeletStandIn",
    "find_children",
    "kill_children",
    "read_status",
]
