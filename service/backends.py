"""The gateway's connections to the vision and LM services (`tessera serve gateway`): TLS and the
bearer token on that hop, and readiness that follows the backends' own health.

Each backend is one channel to its target (a headless Kubernetes Service resolves to every replica).
The channel balances calls round robin over the replicas whose `grpc.health.v1` status for the
backend's service name is SERVING (gRPC's client-side health checking), so a replica that is loading,
draining or dead gets no calls, and the channel is READY exactly while at least one replica is
reachable and serving. `BackendReadiness` follows those channel states, and on each connection
checks that the backend accepts the gateway's token (health checks carry none): the gateway reports
its own service NOT_SERVING while any backend is not ready, and SERVING again once they all are.
"""

from __future__ import annotations

import asyncio
import json
import logging
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
                 credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    """A channel to `backend`: `options` (message sizes) plus round robin over its healthy replicas."""
    service_config = {"loadBalancingConfig": [{"round_robin": {}}],
                      "healthCheckConfig": {"serviceName": backend.health_name}}
    options = list(options) + [("grpc.service_config", json.dumps(service_config)),
                               ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
                               ("grpc.client_idle_timeout_ms", _NEVER_IDLE_MS)]
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
    `tessera_backend_ready{backend}` gauge when `metrics` is given."""

    def __init__(self, channels: list[tuple[Backend, grpc.aio.Channel]],
                 on_change: Callable[[bool], Awaitable[None]], *,
                 refusal: Callable[[Backend, grpc.aio.Channel], Awaitable[str | None]] | None = None, metrics=None):
        self._channels = channels
        self._on_change = on_change
        self._refusal = refusal
        self._metrics = metrics
        self._up = {backend: False for backend, _ in channels}
        self._reported: bool | None = None

    @property
    def ready(self) -> bool:
        return all(self._up.values())

    async def _refused(self, backend: Backend, channel: grpc.aio.Channel) -> str | None:
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
        await self._on_change(False)
        self._reported = False
        await asyncio.gather(*(self._follow(backend, channel) for backend, channel in self._channels))

    async def _follow(self, backend: Backend, channel: grpc.aio.Channel) -> None:
        state = channel.get_state(try_to_connect=True)
        while True:
            connected = state == grpc.ChannelConnectivity.READY
            refused = await self._refused(backend, channel) if connected else None
            up = connected and refused is None
            if up != self._up[backend]:
                self._up[backend] = up
                if self._metrics is not None:
                    self._metrics.backend_ready.labels(backend.label).set(1 if up else 0)
                if up:
                    log.info("%s is ready", backend)
                elif refused is not None:
                    log.warning("%s refuses the gateway: %s", backend, refused)
                else:
                    log.warning("%s is not ready (%s): %s", backend, state.name.lower(), await _why(backend, channel))
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


async def _why(backend: Backend, channel: grpc.aio.Channel) -> str:
    """What a call to the backend would fail with now (for the log line of a backend going down)."""
    try:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=backend.health_name), timeout=2)
    except grpc.aio.AioRpcError as error:
        return f"{error.code().name}: {error.details()}"
    return f"its health is {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}"
