"""`tessera serve` configuration: flags, each also read from TESSERA_<FLAG> (the flag wins), defaults
per role. See the contract in the README / deployment manifests: names and defaults are shared."""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Mapping

from lm.commands import QUANTIZATION_SCHEMES

ROLES = ("vision", "lm", "gateway", "all", "openai")
DEFAULT_PORTS = {"vision": 50051, "lm": 50052, "gateway": 50050, "all": 50050, "openai": 8000}
MAX_MESSAGE_MB = 2047  # gRPC's message size limits are 32-bit signed byte counts
_SECRETS = ("auth_token",)
_HELP = {
    "auth_token": "bearer token clients must send; visible to every local user in `ps`: prefer "
                  "TESSERA_AUTH_TOKEN or --auth-token-file",
    "auth_token_file": "read the bearer token from the first line of this file (e.g. a mounted Secret)",
    "tls_cert": "PEM certificate chain: serve TLS (with --tls-key)",
    "tls_client_ca": "PEM CA bundle: require client certificates signed by it (mutual TLS)",
    "backend_tls_ca": "gateway: PEM CA bundle of the vision/LM services' certificates; dials them over TLS",
    "backend_tls_cert": "gateway: PEM client certificate for the vision/LM services (with --backend-tls-key)",
    "backend_timeout": "gateway: deadline in seconds of each call to the vision/LM services when the client "
                       "sets none",
    "port": "gRPC port (openai: its HTTP port); 0 = the role's default: 50050 all and gateway, 50051 vision, "
            "50052 lm, 8000 openai",
    "http_port": "all: port of the OpenAI-compatible HTTP API (0 = off); `serve openai` serves it on --port",
    "gateway_target": "openai: the gateway it calls (host:port), with --backend-tls-* and the bearer token",
    "served_model_name": "all, openai: the model's name in the HTTP API (/v1/models, the requests' `model`); "
                         "default: --model",
    "allowed_media_domains": "all, openai: fetch http(s) image URLs from these hosts (comma-separated; a name "
                             "also allows its subdomains); only public addresses, no redirects; default: none "
                             "(base64 data: URLs only)",
    "backend_keepalive_s": "gateway: seconds between keepalive pings on each backend connection; one unanswered "
                           "as long closes it, so a frozen backend is found within about twice this",
}


_GRPC_SCHEMES = re.compile(r"^(dns|ipv4|ipv6|unix|unix-abstract|vsock|xds|google-c2p):", re.IGNORECASE)  # resolvers


def target_problem(target: str) -> str | None:
    """What is wrong with a gRPC target given as host:port ([v6]:port for an IPv6 literal), or None. A
    target with one of gRPC's name schemes (dns:, ipv4:, ipv6:, unix:, ...) is left to gRPC."""
    if _GRPC_SCHEMES.match(target):
        return None
    bracketed = re.fullmatch(r"\[([^\]]*)\]:(.*)", target)
    if target.startswith("[") and not bracketed:
        return "expected [IPv6]:PORT, e.g. [::1]:50051"
    host, _, port = (bracketed.group(1), ":", bracketed.group(2)) if bracketed else target.rpartition(":")
    if ":" in host and not bracketed:
        return "an IPv6 address goes in brackets: [::1]:50051"
    if not host or any(c.isspace() or c in "[]/" for c in host):
        return "expected HOST:PORT, e.g. localhost:50051"
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return "expected HOST:PORT with a port from 1 to 65535, e.g. localhost:50051"
    return None


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
        return True
    except ValueError:
        return False


def host_port(host: str, port: int) -> str:
    """`host:port` with an IPv6 literal host in brackets, as gRPC addresses and URLs write it: [::]:50051."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class ServeConfig:
    role: str  # vision | lm | gateway | all
    model: str = "gemma3-270m"  # model id, .gguf file or checkpoint directory (vision, lm, all)
    host: str = "0.0.0.0"  # bind address: a name, IPv4 or IPv6 literal (::, or [::])
    port: int = 0  # gRPC port (openai: HTTP port); 0 here = the role's default (see DEFAULT_PORTS)
    http_port: int = 8000  # all: OpenAI-compatible HTTP API port (service.openai_api); 0 = off
    gateway_target: str = "localhost:50050"  # openai only: the gateway it calls
    served_model_name: str | None = None  # all, openai: the model's name in the HTTP API; None = `model`
    allowed_media_domains: str | None = None  # all, openai: comma-separated hosts image URLs may come from; None: none
    media_timeout_s: float = 10.0  # all, openai: seconds to fetch one image URL
    metrics_port: int = 9090  # Prometheus HTTP port; 0 = off
    vision_target: str = "localhost:50051"  # gateway only
    lm_target: str = "localhost:50052"  # gateway only
    device: str = "cpu"
    dtype: str = "float32"
    quantize: str | None = None  # lm, all: weight quantisation (lm/quantize.py: int8, int8-dynamic, int4; CPU)
    max_batch: int = 8  # engine: requests running at once (max_num_seqs)
    max_seq_len: int = 4096  # engine context per request
    kv_budget_mb: int = 1024  # engine KV cache budget
    prefill_chunk: int = 512  # engine: prompt tokens per step, besides one token per decoding request
    block_size: int = 16  # engine: tokens per KV cache block
    enable_prefix_caching: bool = True  # engine: reuse KV blocks of identical prefixes (tokens and images)
    max_queue: int = 64  # waiting requests before RESOURCE_EXHAUSTED
    max_message_mb: int = 64  # gRPC max send/receive message size
    # Request limits (vision: images and tiles; lm, gateway, all), checked before any tokenizing, decoding
    # or encoding:
    max_prompt_bytes: int = 1 << 20  # UTF-8 bytes of a request's text (prompt, message texts, stop strings)
    max_images: int = 8  # images per request
    max_tiles: int = 32  # image tiles (originals + Pan & Scan crops) per request
    max_messages: int = 1024  # chat messages per request (lm, all)
    max_content_parts: int = 64  # content parts (text or image) per chat message (lm, all)
    max_stop_strings: int = 16  # stop strings per request
    max_stop_bytes: int = 1024  # UTF-8 bytes per stop string (all stop strings also count in max_prompt_bytes)
    allow_special_tokens: bool = False  # chat text may write control tokens ("<end_of_turn>") as such
    grace_period: float = 30.0  # seconds to finish in-flight requests on SIGTERM
    tls_cert: str | None = None  # PEM certificate chain; with tls_key: TLS on
    tls_key: str | None = None  # PEM private key
    tls_client_ca: str | None = None  # PEM CA bundle; set: clients must show a certificate it signed (mutual TLS)
    auth_token: str | None = None  # bearer token required in `authorization` metadata (and sent to backends)
    auth_token_file: str | None = None  # file whose first line is the token: keeps it out of `ps` and the env
    backend_tls_ca: str | None = None  # gateway only: PEM CA bundle that signed the vision/LM certificates; TLS on
    backend_tls_cert: str | None = None  # gateway only: PEM client certificate chain, for backends that ask for one
    backend_tls_key: str | None = None  # gateway only: its PEM private key
    backend_timeout: float = 600.0  # gateway only: deadline (s) of a backend call whose client set none
    backend_keepalive_s: float = 5.0  # gateway only: keepalive ping interval (s); one unanswered as long: closed

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key (or neither)")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (client certificates) needs TLS: give --tls-cert and --tls-key too")
        if self.auth_token and self.auth_token_file:
            raise ValueError("give the bearer token once: --auth-token-file or --auth-token/TESSERA_AUTH_TOKEN, "
                             "not both")
        if (self.backend_tls_cert is None) != (self.backend_tls_key is None):
            raise ValueError("a client certificate for the backends needs both --backend-tls-cert and "
                             "--backend-tls-key (or neither)")
        if self.backend_tls_cert and not self.backend_tls_ca:
            raise ValueError("--backend-tls-cert needs --backend-tls-ca (the CA bundle that signed the backends' "
                             "certificates), which turns TLS on for the gateway's calls to them")
        if self.role == "openai" and not self.served_model_name:
            raise ValueError("serve openai needs --served-model-name (TESSERA_SERVED_MODEL_NAME): the name of the "
                             "model behind the gateway, which clients put in `model`")
        if not self.media_timeout_s > 0:
            raise ValueError(f"--media-timeout-s must be positive (seconds), got {self.media_timeout_s}")
        for name, meaning in (("port", "0 = the role's default"), ("http_port", "0 = off"),
                              ("metrics_port", "0 = off")):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"--{name.replace('_', '-')} must be a port number ({meaning}), got "
                                 f"{getattr(self, name)}")
        for name in ("max_batch", "max_seq_len", "kv_budget_mb", "prefill_chunk", "block_size", "max_queue",
                     "max_message_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_message_mb > MAX_MESSAGE_MB:
            raise ValueError(f"--max-message-mb must be at most {MAX_MESSAGE_MB} (gRPC's message sizes are 32-bit), "
                             f"got {self.max_message_mb}")
        if self.quantize is not None and self.quantize not in QUANTIZATION_SCHEMES:
            raise ValueError(f"--quantize must be one of {', '.join(QUANTIZATION_SCHEMES)}, got {self.quantize!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.grace_period < 0:
            raise ValueError(f"--grace-period must be >= 0, got {self.grace_period}")
        if not self.backend_timeout > 0:
            raise ValueError(f"--backend-timeout must be positive (seconds), got {self.backend_timeout}")
        if not self.backend_keepalive_s >= 1:  # service.backends.MIN_KEEPALIVE_S
            raise ValueError(f"--backend-keepalive-s must be at least 1 (seconds; servers refuse more frequent "
                             f"pings), got {self.backend_keepalive_s}")
        for name in ("max_prompt_bytes", "max_images", "max_tiles", "max_messages", "max_content_parts",
                     "max_stop_strings", "max_stop_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.port == 0:
            object.__setattr__(self, "port", DEFAULT_PORTS[self.role])
        for name in ("gateway_target", "vision_target", "lm_target"):
            problem = target_problem(getattr(self, name))
            if problem:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: {problem}")
        if self.host.startswith("[") and self.host.endswith("]"):  # an IPv6 literal as URLs write it: [::]
            object.__setattr__(self, "host", self.host[1:-1])
        if not self.host or any(c.isspace() or c in "[]/" for c in self.host) or (":" in self.host
                                                                               and not _is_ipv6(self.host)):
            raise ValueError(f"--host must be a host name or an IP address without a port (e.g. 0.0.0.0, :: or [::]), "
                             f"got {self.host!r}")

    def address(self, port: int) -> str:
        """`host_port` of --host and one of this server's ports: what gRPC binds and the logs print."""
        return host_port(self.host, port)

    def prompt_limits(self):
        """The request limits the LM service and the gateway enforce (lm.prompt.PromptLimits)."""
        from lm.prompt import PromptLimits

        return PromptLimits(max_text_bytes=self.max_prompt_bytes, max_images=self.max_images,
                            max_tiles=self.max_tiles, max_messages=self.max_messages,
                            max_content_parts=self.max_content_parts, max_stop_strings=self.max_stop_strings,
                            max_stop_bytes=self.max_stop_bytes, allow_special_tokens=self.allow_special_tokens)

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb << 20

    @property
    def max_request_fields(self) -> int:
        """Protobuf fields a request body may hold (nested ones included), twice what the request limits
        let a valid request need: a chat message is 2 fields (the message, its role) and each content
        part 2 (the part, its text or image flag); stop strings, images and tiles a few each. A body
        over it is refused before it is parsed (service.decode)."""
        chat = self.max_messages * (2 + 2 * self.max_content_parts)
        return 2 * (chat + self.max_stop_strings + 8 * (self.max_images + self.max_tiles)) + 4096

    @property
    def media_domains(self) -> tuple[str, ...]:
        """--allowed-media-domains as lower-case host names."""
        return tuple(d.strip().lower().rstrip(".") for d in (self.allowed_media_domains or "").split(",") if d.strip())

    def bearer_token(self) -> str | None:
        """The bearer token: --auth-token (or TESSERA_AUTH_TOKEN), else the first line of --auth-token-file,
        else None (no authentication). Raises OSError if the file cannot be read, ValueError if it is empty."""
        if self.auth_token or not self.auth_token_file:
            return self.auth_token or None
        lines = Path(self.auth_token_file).read_text(encoding="utf-8").splitlines()
        token = lines[0].strip() if lines else ""
        if not token:
            raise ValueError(f"--auth-token-file {self.auth_token_file}: the file is empty; its first line must be "
                             "the bearer token")
        return token

    def redacted_json(self) -> str:
        values = asdict(self)
        for name in _SECRETS:
            if values[name]:
                values[name] = "<redacted>"
        return json.dumps(values, sort_keys=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every ServeConfig field as --flag-name with default None (resolved in `from_args`)."""
    for field in fields(ServeConfig):
        if field.name == "role":
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = _kind(field)
        help_text = f"(env TESSERA_{field.name.upper()}; default {field.default})"
        if field.name in _HELP:
            help_text = f"{_HELP[field.name]} {help_text}"
        parser.add_argument(flag, type=kind, default=None, help=help_text)


def from_args(role: str, args: argparse.Namespace, environ: Mapping[str, str]) -> ServeConfig:
    """Flags first, then TESSERA_<FLAG> from `environ`, then the defaults."""
    values = {}
    for field in fields(ServeConfig):
        if field.name == "role":
            continue
        value = getattr(args, field.name, None)
        if value is None:
            raw = environ.get(f"TESSERA_{field.name.upper()}")
            if raw not in (None, ""):
                try:
                    value = _kind(field)(raw)
                except ValueError as error:
                    raise ValueError(f"TESSERA_{field.name.upper()}={raw!r}: {error}") from error
        if value is not None:
            values[field.name] = value
    return ServeConfig(role=role, **values)


def _kind(field):
    return {"int": int, "float": float, "bool": _boolean}.get(str(field.type), str)


def _boolean(text: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
    if text.strip().lower() not in value:
        raise ValueError(f"expected true or false, got {text!r}")
    return value[text.strip().lower()]
