"""One gRPC server process: the services of a role, health, reflection, interceptors, metrics,
TLS/auth, message limits, loading in the background and graceful shutdown.

Lifecycle: `start()` binds the port at once with every health status NOT_SERVING, then loads the
models on worker threads (requests meanwhile get UNAVAILABLE); when loading ends the statuses turn
SERVING. `stop(grace)` (SIGTERM) turns them NOT_SERVING, refuses new RPCs, lets in-flight ones finish
for up to `grace` seconds, cancels the rest, then stops the engine.

Health: "" says the process serves (liveness); each service name says it can answer (readiness). A
gateway deployed apart reports its service SERVING only while both backends are reachable and
SERVING (service/backends.py); its "" stays SERVING, so a backend outage never restarts gateways.

HTTP: `serve all` also serves the OpenAI-compatible API (service.openai_api) on --http-port, in this
event loop, calling the gateway servicer directly; `serve openai` serves only that API, on --port, in
front of a gateway reached over gRPC (its /health follows the gateway's readiness).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto.tessera.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from proto.tessera.lm.v1 import lm_pb2, lm_pb2_grpc
from proto.tessera.vision.v1 import vision_pb2, vision_pb2_grpc
from service import gateway as gateway_module
from service import lm_service, vision_service
from service.backends import (Backend, BackendReadiness, backend_credentials, open_channel, server_keepalive_options,
                              token_refusal)
from service.config import ServeConfig, host_port
from service.interceptors import BearerTokenInterceptor, ErrorsAndMetricsInterceptor
from service.metrics import ServerMetrics

log = logging.getLogger(__name__)

OVERALL = ""  # grpc.health.v1 name of the whole server


def default_lm_loader(config: ServeConfig) -> Callable[[], lm_service.LoadedLanguageModel]:
    def load() -> lm_service.LoadedLanguageModel:
        from lm.engine import EngineConfig
        from lm.runtime import DTYPES, load_language_model

        lm = load_language_model(config.model, device=config.device, dtype=DTYPES[config.dtype], progress=False,
                                 quantize=config.quantize)
        engine = lm.engine(EngineConfig(
            max_seq_len=config.max_seq_len, kv_budget_bytes=config.kv_budget_mb << 20, max_batch=config.max_batch,
            prefill_chunk=config.prefill_chunk, block_size=config.block_size,
            enable_prefix_caching=config.enable_prefix_caching, max_queue=config.max_queue,
            stop_token_ids=lm.tokenizer.special.stop_ids))
        engine.start()
        log.info("language model %s loaded from %s in %.1f s", config.model, lm.path, lm.load_seconds)
        return lm_service.LoadedLanguageModel(lm, engine)
    return load


def default_vision_loader(config: ServeConfig, *, required: bool) -> Callable[[], vision_service.LoadedVision | None]:
    def load() -> vision_service.LoadedVision | None:
        from lm.checkpoints import resolve_model
        from lm.runtime import DTYPES
        from service.pipeline import has_vision_tower
        from vision.encoder import EncoderOptions, VisionEncoder

        path = resolve_model(config.model, progress=False)
        if not has_vision_tower(path):
            if required:
                raise ValueError(f"model {config.model} ({path}) has no vision tower (no vision_config in "
                                 "config.json); the vision service needs a Gemma 3 vision-language checkpoint")
            log.warning("model %s is text-only: image requests will be refused", config.model)
            return None
        encoder = VisionEncoder.from_checkpoint(path, EncoderOptions(device=config.device, dtype=DTYPES[config.dtype]))
        log.info("vision encoder %s loaded", encoder.identity)
        return vision_service.LoadedVision(encoder)
    return load


class TesseraServer:
    def __init__(self, config: ServeConfig, *, load_lm=None, load_vision=None):
        """`load_lm` / `load_vision` replace the default loaders (tests use them to hold loading)."""
        self.config = config
        self.metrics = ServerMetrics()
        self.health = health.aio.HealthServicer()
        self.lm: lm_service.LanguageModelServicer | None = None
        self.vision: vision_service.VisionServicer | None = None
        self.gateway: gateway_module.GatewayServicer | None = None
        self._channels: list[grpc.aio.Channel] = []
        self._backends: BackendReadiness | None = None  # gateway role: follows the vision and LM services
        self._backends_task: asyncio.Task | None = None
        self._models_ready = False
        self._health_lock = asyncio.Lock()
        role = config.role
        if role in ("lm", "all"):
            self.lm = lm_service.LanguageModelServicer(
                load_lm or default_lm_loader(config), model_name=config.model,
                max_message_bytes=config.max_message_bytes, metrics=self.metrics, limits=config.prompt_limits())
        if role in ("vision", "all"):
            self.vision = vision_service.VisionServicer(
                load_vision or default_vision_loader(config, required=role == "vision"), model_name=config.model,
                max_message_bytes=config.max_message_bytes, request_limits=config.prompt_limits(), metrics=self.metrics)
        if role == "all":
            self.gateway = gateway_module.GatewayServicer(gateway_module.LocalVision(self.vision),
                                                          gateway_module.LocalLanguageModel(self.lm),
                                                          limits=config.prompt_limits())
        self.port: int | None = None
        self.metrics_port = 0
        self.loaded = asyncio.Event()
        self.load_error: BaseException | None = None
        self._server: grpc.aio.Server | None = None
        self._load_task: asyncio.Task | None = None
        self._stopped = False
        self._http = None  # service.openai_api.HttpServer
        self.http_port = 0

    @property
    def service_names(self) -> list[str]:
        names = []
        if self.vision is not None:
            names.append(vision_service.SERVICE_NAME)
        if self.lm is not None:
            names.append(lm_service.SERVICE_NAME)
        if self.gateway is not None or self.config.role == "gateway":
            names.append(gateway_module.SERVICE_NAME)
        return names

    async def start(self) -> int:
        """Bind and start serving (health NOT_SERVING until the models are loaded). Returns the port."""
        config = self.config
        token = config.bearer_token()
        if config.role == "openai":
            return await self._start_openai(token)
        interceptors = [ErrorsAndMetricsInterceptor(self.metrics, max_response_bytes=config.max_message_bytes,
                                                    max_request_fields=config.max_request_fields)]
        if token:
            interceptors.insert(0, BearerTokenInterceptor(token, self.metrics))
        message_sizes = gateway_module.channel_options(config.max_message_bytes)
        if config.role == "gateway":
            self._open_backends(token, message_sizes)
        # Keepalive pings are permitted: the gateway pings its backends to find a frozen one.
        options = message_sizes + server_keepalive_options() + [("grpc.so_reuseport", 0)]
        server = grpc.aio.server(interceptors=interceptors, options=options)
        if self.vision is not None:
            vision_pb2_grpc.add_VisionServiceServicer_to_server(self.vision, server)
        if self.lm is not None:
            lm_pb2_grpc.add_LanguageModelServiceServicer_to_server(self.lm, server)
        if self.gateway is not None:
            gateway_pb2_grpc.add_GatewayServiceServicer_to_server(self.gateway, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for name in [OVERALL, *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        full_names = [_full_name(n) for n in self.service_names]
        reflection.enable_server_reflection([*full_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        address = config.address(config.port)
        if config.tls_cert:
            client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
            credentials = grpc.ssl_server_credentials(
                [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
                root_certificates=client_ca, require_client_auth=client_ca is not None)
            self.port = server.add_secure_port(address, credentials)
        else:
            self.port = server.add_insecure_port(address)
        await server.start()
        self._server = server
        if self.gateway is not None and config.role == "all" and config.http_port:  # before any loading starts
            from service.openai_api import LocalGateway

            await self._start_http(LocalGateway(self.gateway, ready=lambda: self._models_ready), config.http_port, token)
        await self._start_metrics()
        self._load_task = asyncio.create_task(self._load())
        if self._backends is not None:
            self._backends_task = asyncio.create_task(self._backends.run())
        return self.port

    async def _start_http(self, gateway, port: int, token: str | None) -> None:
        from service.openai_api import HttpServer, HttpSettings, OpenAIFront

        config = self.config
        settings = HttpSettings(model_name=config.served_model_name or config.model, auth_token=token,
                                max_body_bytes=config.max_message_bytes, default_max_tokens=config.max_seq_len,
                                allowed_media_domains=config.media_domains, media_timeout_s=config.media_timeout_s,
                                max_images=config.max_images)
        self._http = HttpServer(OpenAIFront(gateway, settings, registry=self.metrics.registry), config.host, port,
                                grace_period=config.grace_period)
        try:
            self.http_port = await self._http.start()
        except OSError as error:
            await self._stop_started()
            raise OSError(f"the HTTP port {port}: {error}") from error

    async def _start_metrics(self) -> None:
        """The Prometheus exporter on --metrics-port (0: none). Raises OSError naming that port when it
        cannot listen there (taken: every role's default is 9090), after stopping what already started."""
        port = self.config.metrics_port
        try:
            self.metrics_port = self.metrics.serve(port, self.config.host)
        except OSError as error:
            await self._stop_started()
            raise OSError(f"the metrics port {port}: {error}") from error

    async def _stop_started(self) -> None:
        """Undo a start that failed part way (a port taken): the servers, the backends' watch and the
        channels started so far, so that the process exits without grpc complaining at interpreter exit."""
        if self._backends_task is not None:
            self._backends_task.cancel()
        await asyncio.gather(self._http.stop() if self._http is not None else asyncio.sleep(0),
                             self._server.stop(0) if self._server is not None else asyncio.sleep(0))
        for channel in self._channels:
            await channel.close()

    async def _start_openai(self, token: str | None) -> int:
        """`serve openai`: the HTTP API alone, in front of the gateway at --gateway-target."""
        from service.openai_api import RemoteGateway

        config = self.config
        options = gateway_module.channel_options(config.max_message_bytes)
        credentials = backend_credentials(config.backend_tls_ca, config.backend_tls_cert, config.backend_tls_key)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        backend = Backend("gateway", config.gateway_target, gateway_module.SERVICE_NAME)
        channel = open_channel(backend, options, credentials, keepalive_s=config.backend_keepalive_s)
        self._channels = [channel]
        self._backends = BackendReadiness([(backend, channel)], lambda ready: asyncio.sleep(0),
                                          refusal=token_refusal(metadata), metrics=self.metrics)
        self._backends_task = asyncio.create_task(self._backends.run())
        await self._start_http(RemoteGateway(channel, metadata, ready=lambda: self._backends.ready, name=str(backend)),
                               config.port, token)
        self.port = self.http_port
        await self._start_metrics()
        self._models_ready = True
        self.loaded.set()
        return self.port

    def _open_backends(self, token: str | None, options: list) -> None:
        """The gateway's channels to the vision and LM services: TLS when --backend-tls-ca is given,
        the bearer token on every call, readiness followed by `self._backends`."""
        config = self.config
        credentials = backend_credentials(config.backend_tls_ca, config.backend_tls_cert, config.backend_tls_key)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        vision = Backend("vision service", config.vision_target, vision_service.SERVICE_NAME)
        lm = Backend("LM service", config.lm_target, lm_service.SERVICE_NAME)
        vision_channel = open_channel(vision, options, credentials, keepalive_s=config.backend_keepalive_s)
        lm_channel = open_channel(lm, options, credentials, keepalive_s=config.backend_keepalive_s)
        self._channels = [vision_channel, lm_channel]
        self.gateway = gateway_module.GatewayServicer(
            gateway_module.RemoteVision(vision_channel, metadata, name=str(vision),
                                        default_timeout=config.backend_timeout),
            gateway_module.RemoteLanguageModel(lm_channel, metadata, name=str(lm),
                                               default_timeout=config.backend_timeout),
            limits=config.prompt_limits())
        self._backends = BackendReadiness([(vision, vision_channel), (lm, lm_channel)],
                                          lambda ready: self._update_health(), refusal=token_refusal(metadata),
                                          metrics=self.metrics)

    async def _load(self) -> None:
        try:
            if self.lm is not None:
                await self.lm.load()
            if self.vision is not None:
                await self.vision.load()
        except Exception as error:  # noqa: BLE001 - reported to the operator; the server cannot serve
            if isinstance(error, (OSError, ValueError)):  # the checkpoint's fault (named in the message)
                log.error("loading failed: %s", error)
            else:
                log.exception("loading failed")
            self.load_error = error
            self.loaded.set()
            return
        self._models_ready = True
        await self._update_health()
        self.loaded.set()

    async def _update_health(self) -> None:
        """Every health status from the current state: NOT_SERVING until loaded; then SERVING except a
        text-only vision service and a gateway whose backends are not all ready."""
        async with self._health_lock:  # one writer at a time, so the last state written is the latest
            for name in [OVERALL, *self.service_names]:
                serving = self._models_ready
                if name == vision_service.SERVICE_NAME and self.vision is not None and self.vision.text_only:
                    serving = False
                if name == gateway_module.SERVICE_NAME and self._backends is not None and not self._backends.ready:
                    serving = False
                # After stop() began, set() is ignored: graceful shutdown keeps NOT_SERVING for good.
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING if serving else
                                      health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new RPCs, give in-flight ones `grace` seconds, then release everything."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_period if grace is None else grace
        await self.health.enter_graceful_shutdown()
        # In-flight HTTP requests drain beside the gRPC ones (uvicorn waits up to the grace period).
        await asyncio.gather(self._http.stop() if self._http is not None else asyncio.sleep(0),
                             self._server.stop(grace) if self._server is not None else asyncio.sleep(0))
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self._backends_task is not None:
            self._backends_task.cancel()
        for channel in self._channels:
            await channel.close()
        if self.lm is not None:
            await asyncio.to_thread(self.lm.stop)
        if self.vision is not None:
            self.vision.stop()
        self.metrics.close()

    async def serve_until_signal(self) -> int:
        """Run until SIGTERM/SIGINT (graceful stop) or a loading failure. Returns an exit status."""
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop_requested.set)
        waiter = asyncio.create_task(stop_requested.wait())
        loading = asyncio.create_task(self.loaded.wait())
        await asyncio.wait([waiter, loading], return_when=asyncio.FIRST_COMPLETED)
        if self.load_error is None and not stop_requested.is_set():
            if self.service_names:
                log.info("serving %s on port %d", ", ".join(self.service_names), self.port)
            else:  # serve openai: the HTTP API alone
                log.info("serving the OpenAI-compatible HTTP API on port %d", self.port)
            await waiter
        if stop_requested.is_set():
            log.info("stopping: finishing in-flight requests (grace period %.0f s; a second signal ends them now)",
                     self.config.grace_period)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._stop_now)
        await self.stop()
        loading.cancel()
        return 1 if self.load_error is not None else 0

    def _stop_now(self) -> None:
        """A second SIGTERM/SIGINT during the drain: abort in-flight RPCs and HTTP requests instead of
        waiting out the grace period (as uvicorn and vLLM do on a second Ctrl-C)."""
        log.warning("second signal: ending in-flight requests now")
        if self._http is not None:
            self._http.force_exit()
        if self._server is not None:
            asyncio.ensure_future(self._server.stop(None))  # the most restrictive grace wins (grpc.aio)


def _full_name(service_name: str) -> str:
    descriptors = {
        vision_service.SERVICE_NAME: vision_pb2.DESCRIPTOR.services_by_name["VisionService"],
        lm_service.SERVICE_NAME: lm_pb2.DESCRIPTOR.services_by_name["LanguageModelService"],
        gateway_module.SERVICE_NAME: gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"],
    }
    return descriptors[service_name].full_name


class ServerThread:
    """A TesseraServer on an event loop of its own thread (tests, benchmarks, in-process use)."""

    def __init__(self, server: TesseraServer):
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tessera-server", daemon=True)

    def start(self, wait_loaded: bool = True, timeout: float = 600) -> "ServerThread":
        self._thread.start()
        self.call(self.server.start())
        if wait_loaded:
            self.call(self.server.loaded.wait(), timeout)
            if self.server.load_error is not None:
                self.stop()
                raise RuntimeError(f"loading failed: {self.server.load_error}") from self.server.load_error
        return self

    def call(self, coroutine, timeout: float | None = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def target(self) -> str:
        """Where a client on this machine reaches the gRPC port: the bound host, or the loopback address
        of a wildcard's family."""
        config = self.server.config
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(config.host, config.host)
        return host_port(host, self.server.port)

    def stop(self, grace: float = 0.0) -> None:
        if self.loop.is_running():
            self.call(self.server.stop(grace), timeout=grace + 60)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)
