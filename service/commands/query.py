"""`tessera query [--target HOST:PORT] [--image PATH ...] [--pan-and-scan] [--stream] PROMPT`:
ask a running gateway (`tessera serve gateway` or `all`) and print the answer."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the question or instruction; - reads it from standard input (a prompt "
                                       "longer than the command line allows)")
    parser.add_argument("--target", default="localhost:50050", help="gateway address (default localhost:50050)")
    parser.add_argument("--image", action="append", default=[], type=Path, metavar="PATH",
                        help="an image to send (repeatable)")
    parser.add_argument("--pan-and-scan", action="store_true", help="add Pan & Scan crops of wide or tall images")
    parser.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    parser.add_argument("--raw", action="store_true",
                        help="send the prompt as plain text to complete, not as a chat turn (base models); images "
                             "go at its <start_of_image> markers, or before the text when it has none")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, help="0 = greedy (default: the model's recommendation, else 0)")
    parser.add_argument("--top-k", type=int, help="0 = off (default: the model's, else 0)")
    parser.add_argument("--top-p", type=float, help="1 = off (default: the model's, else 1)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--thinking-budget", type=int, metavar="N",
                        help="reasoning models: most tokens of thinking, then the model answers (0: none)")
    parser.add_argument("--no-thinking", action="store_true", help="reasoning models: enable_thinking=false")
    parser.add_argument("--template-kwarg", action="append", default=[], metavar="NAME=JSON",
                        help="a chat-template variable, e.g. enable_thinking=false (repeatable)")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    parser.add_argument("--ca-cert", type=Path, help="PEM root certificate: connect with TLS")
    parser.add_argument("--auth-token", help="bearer token (default: env TESSERA_AUTH_TOKEN)")
    parser.add_argument("--max-message-mb", type=int, default=64)


def build_request(args: argparse.Namespace):
    from proto.tessera.common.v1 import tensor_pb2
    from proto.tessera.gateway.v1 import gateway_pb2
    from proto.tessera.lm.v1 import lm_pb2

    sampling = lm_pb2.SamplingParams(max_new_tokens=args.max_new_tokens)
    for name in ("temperature", "top_k", "top_p"):  # unset: the model's recommendation
        if getattr(args, name) is not None:
            setattr(sampling, name, getattr(args, name))
    from lm.commands.generate import template_kwargs

    if args.seed is not None:
        sampling.seed = args.seed
    if args.thinking_budget is not None:
        sampling.thinking_budget = args.thinking_budget
    kwargs = {name: json.dumps(value) for name, value in template_kwargs(args).items()}
    images = [tensor_pb2.Image(data=path.read_bytes()) for path in args.image]
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    return gateway_pb2.QueryRequest(prompt=prompt, raw=args.raw, images=images, sampling=sampling,
                                    pan_and_scan=tensor_pb2.PanAndScanOptions(enabled=args.pan_and_scan),
                                    chat_template_kwargs=kwargs)


def run(args: argparse.Namespace) -> int:
    import grpc

    from lm.commands.generate import print_sections
    from proto.tessera.gateway.v1 import gateway_pb2_grpc
    from service.config import MAX_MESSAGE_MB

    try:
        if not 1 <= args.max_message_mb <= MAX_MESSAGE_MB:
            raise ValueError(f"--max-message-mb must be 1 to {MAX_MESSAGE_MB} (gRPC's message sizes are 32-bit), "
                             f"got {args.max_message_mb}")
        if not args.timeout > 0:
            raise ValueError(f"--timeout must be positive (seconds), got {args.timeout}")
        if not 1 <= args.max_new_tokens <= 2**31 - 1:  # the request's int32 (the context ends generation sooner)
            raise ValueError(f"--max-new-tokens must be 1 to {2**31 - 1}, got {args.max_new_tokens}")
        request = build_request(args)
        try:
            root_certificate = args.ca_cert.read_bytes() if args.ca_cert else None
        except OSError as error:
            raise ValueError(f"--ca-cert {args.ca_cert}: {error.strerror or error}") from None
    except (OSError, ValueError) as error:
        print(f"tessera query: {error}", file=sys.stderr)
        return 2
    limit = args.max_message_mb << 20
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    if root_certificate is not None:
        channel = grpc.secure_channel(args.target, grpc.ssl_channel_credentials(root_certificate), options)
    else:
        channel = grpc.insecure_channel(args.target, options)
    token = args.auth_token or os.environ.get("TESSERA_AUTH_TOKEN")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    try:
        if args.stream:
            done = None

            def pieces():
                nonlocal done
                for message in stub.QueryStream(request, timeout=args.timeout, metadata=metadata):
                    if message.HasField("done"):
                        done = message.done
                    else:
                        yield message.text, message.reasoning

            print_sections(pieces())
        else:
            done = stub.Query(request, timeout=args.timeout, metadata=metadata)
            if done.reasoning_tokens:
                print(f"[Thinking]\n{done.reasoning_text}\n[Answer]")
            print(done.text)
    except grpc.RpcError as error:
        print(f"tessera query: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    sys.stdout.flush()
    if done is not None:
        images = f"image tiles {list(done.tiles_per_image)} encoded in {done.encode_time_s:.3f} s; " \
            if done.tiles_per_image else ""
        print(f"[{done.finish_reason}; {images}{done.prompt_tokens} prompt + {done.completion_tokens} generated "
              f"tokens; first token {done.time_to_first_token_s:.3f} s; total {done.total_time_s:.3f} s]",
              file=sys.stderr)
    return 0
