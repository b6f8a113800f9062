"""`tessera serve vision|lm|gateway|all|openai`: run a gRPC service (openai: the HTTP API) until SIGTERM
(graceful drain).

Every flag can also come from TESSERA_<FLAG> (e.g. TESSERA_METRICS_PORT); a flag on the command line
wins. The effective configuration is printed as one JSON line on stderr at start-up, secrets redacted.
The bearer token belongs in TESSERA_AUTH_TOKEN or a file (--auth-token-file): a command-line flag is
visible to every local user in `ps`.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from service.config import ROLES, add_arguments as add_config_arguments

    parser.add_argument("role", choices=ROLES,
                        help="vision, lm, gateway (image+text entry point calling the other two), all in one process "
                             "(with the OpenAI-compatible HTTP API on --http-port), or openai (that HTTP API alone, "
                             "in front of the gateway at --gateway-target)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from lm.checkpoints import check_model_spec
    from service.config import from_args
    from vision.config import usable_device

    try:
        config = from_args(args.role, args, os.environ)
    except ValueError as error:
        print(f"tessera serve: {error}", file=sys.stderr)
        return 2
    if config.role in ("all", "lm", "vision"):  # what this machine cannot load, before the ports are bound
        try:
            usable_device(config.device)
        except ValueError as error:
            print(f"tessera serve: --device: {error}", file=sys.stderr)
            return 2
        try:
            check_model_spec(config.model)
        except (OSError, ValueError) as error:
            print(f"tessera serve: cannot load model {config.model!r}: {error}", file=sys.stderr)
            return 2
    print(config.redacted_json(), file=sys.stderr, flush=True)
    if getattr(args, "auth_token", None):
        print("tessera serve: warning: --auth-token is visible to every local user in `ps`; pass the token in "
              "TESSERA_AUTH_TOKEN or --auth-token-file instead", file=sys.stderr, flush=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_serve(config))


async def _serve(config) -> int:
    from service.server import TesseraServer

    server = TesseraServer(config)
    try:
        port = await server.start()
    except (OSError, RuntimeError, ValueError) as error:
        print(f"tessera serve: cannot start: {error}", file=sys.stderr)
        return 2
    print(f"tessera serve {config.role}: listening on {config.address(port)}"
          + (f", OpenAI-compatible HTTP on :{server.http_port}" if server.http_port and config.role == "all" else "")
          + (f", metrics on :{server.metrics_port}" if server.metrics_port else ""), file=sys.stderr, flush=True)
    status = await server.serve_until_signal()
    if server.load_error is not None:
        print(f"tessera serve: loading {config.model!r} failed: {server.load_error}", file=sys.stderr)
    return status
