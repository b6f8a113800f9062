"""`tessera serve` configuration: flags, each also read from TESSERA_<FLAG> (the flag wins), defaults
per role. See the contract in the README / deployment manifests: names and defaults are shared."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields
from typing import Mapping

ROLES = ("vision", "lm", "gateway", "all")
DEFAULT_PORTS = {"vision": 50051, "lm": 50052, "gateway": 50050, "all": 50050}
_SECRETS = ("auth_token",)


@dataclass(frozen=True)
class ServeConfig:
    role: str  # vision | lm | gateway | all
    model: str = "gemma3-270m"  # model id, .gguf file or checkpoint directory (vision, lm, all)
    host: str = "0.0.0.0"  # bind address
    port: int = 0  # gRPC port; 0 here = the role's default (see DEFAULT_PORTS)
    metrics_port: int = 9090  # Prometheus HTTP port; 0 = off
    vision_target: str = "localhost:50051"  # gateway only
    lm_target: str = "localhost:50052"  # gateway only
    device: str = "cpu"
    dtype: str = "float32"
    max_batch: int = 8  # engine decode batch
    max_seq_len: int = 4096  # engine context per request
    kv_budget_mb: int = 1024  # engine KV cache budget
    max_queue: int = 64  # waiting requests before RESOURCE_EXHAUSTED
    max_message_mb: int = 64  # gRPC max send/receive message size
    # Request limits (lm, gateway, all), checked before any tokenizing, decoding or encoding:
    max_prompt_bytes: int = 1 << 20  # UTF-8 bytes of a request's text (prompt, message texts)
    max_images: int = 8  # images per request
    max_tiles: int = 32  # image tiles (originals + Pan & Scan crops) per request
    allow_special_tokens: bool = False  # chat text may write control tokens ("<end_of_turn>") as such
    grace_period: float = 30.0  # seconds to finish in-flight requests on SIGTERM
    tls_cert: str | None = None  # PEM certificate chain; with tls_key: TLS on
    tls_key: str | None = None  # PEM private key
    auth_token: str | None = None  # bearer token required in `authorization` metadata

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key (or neither)")
        for name in ("max_batch", "max_seq_len", "kv_budget_mb", "max_queue", "max_message_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.grace_period < 0:
            raise ValueError(f"--grace-period must be >= 0, got {self.grace_period}")
        for name in ("max_prompt_bytes", "max_images", "max_tiles"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.port == 0:
            object.__setattr__(self, "port", DEFAULT_PORTS[self.role])

    def prompt_limits(self):
        """The request limits the LM service and the gateway enforce (lm.prompt.PromptLimits)."""
        from lm.prompt import PromptLimits

        return PromptLimits(max_text_bytes=self.max_prompt_bytes, max_images=self.max_images,
                            max_tiles=self.max_tiles, allow_special_tokens=self.allow_special_tokens)

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb << 20

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
