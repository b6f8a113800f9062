"""The gateway's connections to the vision and LM services (`tessera serve gateway`): TLS and the
bearer token on that hop, and readiness that follows the backends' own health.

Each backend is one channel to its target (a headless Kubernetes Service resolves to every replica).
The channel balances calls round robin over the replicas whose `grpc.health.v1` status for the
backend's service name is SERVING (gRPC's client-side health checking), so a replica that is loading,
draining or dead gets no calls, and the channel is READY exactly while at least one replica is
reachable and serving. `BackendReadiness` follows those channel states, and on each connection
checks that the backend accepts the gateway's token (health checks carry none): the gateway reports
its own service NOT_SERVING while any backend is not ready, and SERVING again once they all are.

A backend that stops answering without closing its connections (a frozen process, a dropped network
path) is found by HTTP/2 keepalive pings: a ping unanswered for `keepalive_s` closes the connection, so
readiness falls and the calls on it fail UNAVAILABLE within about twice `keepalive_s` (the servers
permit pings that often: `server_keepalive_options`). Nothing is silent: a backend refusing the
gateway's token is logged at once, one that has not become ready `NOT_READY_WARN_AFTER_S` after start
(or after going down) is logged with the reason, and again every `NOT_READY_REPEAT_S` while it stays so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

# Reconnect at least this often (ms) while a backend is down, so the gateway notices its return
# within seconds (gRPC's default backoff grows to 120 s).
MAX_RECONNECT_BACKOFF_MS = 5000
# A channel without calls would go IDLE after 30 min and drop its connections (and with them the
# readiness the gateway reports): keep backend channels connected.
_NEVER_IDLE_MS = 2**31 - 1
# While a connected backend refuses the gateway's token, ask again this often (seconds).
ACCESS_RECHECK_S = 5.0
# A backend not ready this long after start (or after going down) is logged with the reason, and
# again this often while it stays so (seconds): a misconfigured gateway says so within seconds.
NOT_READY_WARN_AFTER_S = 10.0
NOT_READY_REPEAT_S = 60.0
# Servers accept keepalive pings this often (ms), also on connections without calls. A client pinging
# more often is cut off as abusive, so clients keep a margin: the gateway's --backend-keepalive-s is at
# least MIN_KEEPALIVE_S.
MIN_PING_INTERVAL_MS = 500
MIN_KEEPALIVE_S = 1.0


def server_keepalive_options() -> list[tuple[str, int]]:
    """Server options that let clients (the gateway) ping every MIN_PING_INTERVAL_MS or more, also
    while no call is open."""
    return [("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
            ("grpc.keepalive_permit_without_calls", 1)]


@dataclass(frozen=True)
class Backend:
    label: str  # how errors and logs name it: "vision service", "LM service"
    target: str  # gRPC target, e.g. dns:///tessera-lm:50052 or 127.0.0.1:50052
    health_name: str  # its grpc.health.v1 service name

    def __str__(self) -> str:
        return f"{self.label} at {self.target}"


def backend_credentials(ca_file: str | None, cert_file: str | None = None,
                        key_file: str | None = None) -> grpc.ChannelCredentials | None:
    """TLS credentials for the backend hop: the CA bundle (PEM) that signed the backends' certificates,
    plus an optional client certificate chain and key (PEM) for backends that require one. None
    (plaintext) without a CA bundle. Raises OSError when a file cannot be read."""
    if not ca_file:
        return None
    cert = Path(cert_file).read_bytes() if cert_file else None
    key = Path(key_file).read_bytes() if key_file else None
    return grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes(), private_key=key,
                                        certificate_chain=cert)


def open_channel(backend: Backend, options: list[tuple[str, int]],
                 credentials: grpc.ChannelCredentials | None, *, keepalive_s: float = 5.0) -> grpc.aio.Channel:
    """A channel to `backend`: `options` (message sizes) plus round robin over its healthy replicas,
    and keepalive: a ping every `keepalive_s` seconds on each connection, which is closed when a ping
    is not answered within `keepalive_s`; a connection attempt is given 2 × `keepalive_s` (at least
    5 s) before it counts as failed."""
    if not keepalive_s >= MIN_KEEPALIVE_S:
        raise ValueError(f"keepalive_s must be at least {MIN_KEEPALIVE_S:g} s (servers refuse more frequent pings), "
                         f"got {keepalive_s}")
    service_config = {"loadBalancingConfig": [{"round_robin": {}}],
                      "healthCheckConfig": {"serviceName": backend.health_name}}
    keepalive_ms = int(keepalive_s * 1000)
    options = list(options) + [("grpc.service_config", json.dumps(service_config)),
                               ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
                               ("grpc.client_idle_timeout_ms", _NEVER_IDLE_MS),
                               ("grpc.keepalive_time_ms", keepalive_ms),
                               ("grpc.keepalive_timeout_ms", keepalive_ms),
                               ("grpc.http2.ping_timeout_ms", keepalive_ms),
                               ("grpc.keepalive_permit_without_calls", 1),
                               ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle connection
                               # gRPC's default gives a connection attempt 20 s: calls queued meanwhile
                               # (a frozen backend accepts TCP but never answers) would wait that long.
                               ("grpc.min_reconnect_backoff_ms", max(2 * keepalive_ms, 5000))]
    if credentials is None:
        return grpc.aio.insecure_channel(backend.target, options=options)
    return grpc.aio.secure_channel(backend.target, credentials, options=options)


def token_refusal(metadata: tuple) -> Callable[[Backend, grpc.aio.Channel], Awaitable[str | None]]:
    """An access check for BackendReadiness: the backend's GetInfo with the gateway's `metadata`
    (bearer token); the reason if the backend refuses it, else None (any other outcome, e.g. still
    loading, is the health check's business)."""
    async def refusal(backend: Backend, channel: grpc.aio.Channel) -> str | None:
        get_info = channel.unary_unary(f"/{backend.health_name}/GetInfo")  # raw bytes: b"" is an empty request
        try:
            await get_info(b"", metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return (f"{error.code().name}: {error.details()} (the gateway sends its own --auth-token, "
                        "TESSERA_AUTH_TOKEN or --auth-token-file: give it the backends' token)")
        return None
    return refusal


class BackendReadiness:
    """Follows the connectivity of each backend's channel; awaits `on_change(ready)` whenever whether
    every backend is ready changes (first with False, before any state is known). A backend is ready
    while its channel is READY and `refusal(backend, channel)` (an authenticated call) returns None;
    it returns the reason when the backend refuses the gateway's credentials. Sets the
    `tessera_backend_ready{backend}` gauge when `metrics` is given.

    Logs a warning naming the backend and the reason: at once when it refuses the gateway's
    credentials (again whenever the reason changes) or goes from ready to not ready; and when it has
    not been ready for `warn_after_s` seconds since start or since it went down, then every `repeat_s`
    seconds while it stays so (defaults NOT_READY_WARN_AFTER_S, NOT_READY_REPEAT_S)."""

    def __init__(self, channels: list[tuple[Backend, grpc.aio.Channel]],
                 on_change: Callable[[bool], Awaitable[None]], *,
                 refusal: Callable[[Backend, grpc.aio.Channel], Awaitable[str | None]] | None = None, metrics=None,
                 warn_after_s: float | None = None, repeat_s: float | None = None):
        self._channels = channels
        self._on_change = on_change
        self._refusal = refusal
        self._metrics = metrics
        self._warn_after_s = NOT_READY_WARN_AFTER_S if warn_after_s is None else warn_after_s
        self._repeat_s = NOT_READY_REPEAT_S if repeat_s is None else repeat_s
        self._up = {backend: False for backend, _ in channels}
        self._reported: bool | None = None
        now = time.monotonic()
        self._down_since = {backend: now for backend in self._up}  # while not up: since when
        self._next_warning = {backend: now + self._warn_after_s for backend in self._up}
        self._refused = {backend: None for backend in self._up}  # the latest refusal reason, if refused

    @property
    def ready(self) -> bool:
        return all(self._up.values())

    async def _refused_reason(self, backend: Backend, channel: grpc.aio.Channel) -> str | None:
        if self._refusal is None:
            return None
        try:
            return await self._refusal(backend, channel)
        except Exception:  # noqa: BLE001 - a failing check must not stop the readiness watch
            log.exception("checking the gateway's access to %s failed", backend)
            return None

    async def run(self) -> None:
        """Until cancelled."""
        if self._metrics is not None:
            for backend in self._up:
                self._metrics.backend_ready.labels(backend.label).set(0)
        now = time.monotonic()
        for backend in self._up:
            self._down_since[backend] = now
            self._next_warning[backend] = now + self._warn_after_s
        await self._on_change(False)
        self._reported = False
        await asyncio.gather(*(self._follow(backend, channel) for backend, channel in self._channels),
                             *(self._remind(backend, channel) for backend, channel in self._channels))

    async def _follow(self, backend: Backend, channel: grpc.aio.Channel) -> None:
        state = channel.get_state(try_to_connect=True)
        while True:
            connected = state == grpc.ChannelConnectivity.READY
            refused = await self._refused_reason(backend, channel) if connected else None
            up = connected and refused is None
            now = time.monotonic()
            if refused is not None and refused != self._refused[backend]:
                log.warning("%s refuses this server's credentials: %s", backend, refused)
                self._next_warning[backend] = now + self._repeat_s
            self._refused[backend] = refused
            if up != self._up[backend]:
                self._up[backend] = up
                if self._metrics is not None:
                    self._metrics.backend_ready.labels(backend.label).set(1 if up else 0)
                if up:
                    log.info("%s is ready", backend)
                else:
                    self._down_since[backend] = now
                    if refused is None:
                        log.warning("%s is not ready (%s): %s", backend, state.name.lower(),
                                    (await _why(backend, channel))[0])
                        self._next_warning[backend] = now + self._repeat_s
                if self.ready != self._reported:
                    self._reported = self.ready
                    await self._on_change(self.ready)
            if refused is None:
                await channel.wait_for_state_change(state)
            else:  # connected but refused: the credentials may change on the backend's side; ask again
                try:
                    await asyncio.wait_for(channel.wait_for_state_change(state), ACCESS_RECHECK_S)
                except asyncio.TimeoutError:
                    pass
            state = channel.get_state(try_to_connect=True)  # IDLE (connection lost): reconnect now

    async def _remind(self, backend: Backend, channel: grpc.aio.Channel) -> None:
        """While `backend` is not ready: a warning with the reason when one is due (see the class)."""
        tick = min(1.0, self._warn_after_s, self._repeat_s)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if self._up[backend] or now < self._next_warning[backend]:
                continue
            self._next_warning[backend] = now + self._repeat_s
            state = channel.get_state().name.lower()
            reason, unreachable = (self._refused[backend], False) if self._refused[backend] else \
                await _why(backend, channel)
            if self._up[backend]:  # it became ready while we asked
                continue
            log.warning("%s has not been ready for %.0f s (%s): %s%s", backend, now - self._down_since[backend],
                        state, reason, _HINT if unreachable else "")


# What to check when a backend never becomes ready; the gRPC reason alone rarely says it.
_HINT = (" (check that the target address is right and the service runs there, and that the gateway's TLS "
         "settings match the backend's: --backend-tls-ca for a backend serving TLS, none for plaintext)")


async def _why(backend: Backend, channel: grpc.aio.Channel, timeout: float = 2.0) -> tuple[str, bool]:
    """What a call to the backend would fail with now, for the log lines of a backend not ready, and
    whether it is a failure to connect at all (rather than a backend that answers "not serving")."""
    try:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=backend.health_name), timeout=timeout)
    except grpc.aio.AioRpcError as error:
        details = error.details() or ""
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return (f"no answer to a health check within {timeout:g} s (the backend may be frozen or overloaded, "
                    "or the connection is still being made)"), False
        if "backend unhealthy" in details:  # gRPC's client-side health check: it answered, not SERVING
            return (f"it is reachable but its health for {backend.health_name} is not SERVING (still loading its "
                    "model, shutting down, or a vision service on a text-only model)"), False
        return f"{error.code().name}: {details}", True
    if response.status == health_pb2.HealthCheckResponse.SERVING:  # back while this was asked: no contradiction
        return "it answers SERVING again (the connection is being re-made)", False
    return f"its health is {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}", False
