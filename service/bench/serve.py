"""`tessera bench serve`: requests through the gRPC gateway and through the OpenAI-compatible HTTP API
(`serve all` on loopback; the official `openai` client, one per client thread) against the same engine
called in process, at 1, 4 and 16 concurrent clients, on the embedded 270M.

Each request is a chat turn generating exactly `--new-tokens` tokens (stop tokens off: `ignore_eos` over
HTTP), so every path does the same work. Figures: requests/s, generated tok/s, p50/p99 latency, the gRPC
and HTTP overheads at each concurrency (latency / in-process latency - 1) and throughput at 16 clients /
1 client.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

from service.bench import positive_int, positive_ints

PROMPTS = [
    "Explain how a refrigerator works in simple terms.",
    "Write a haiku about the sea.",
    "What are the three most important ideas in computer science?",
    "Give me a recipe for bread.",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="gemma3-270m", help="model id, .gguf file or checkpoint directory")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--clients", type=positive_ints, default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests-per-client", type=positive_int, default=2)
    parser.add_argument("--new-tokens", type=positive_int, default=16)
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    import grpc
    import torch

    from lm.prompt import layout_chat
    from lm.requests import GenerationRequest
    from lm.sampling import SamplingParams
    from proto.tessera.gateway.v1 import gateway_pb2, gateway_pb2_grpc
    from proto.tessera.lm.v1 import lm_pb2
    from service.config import ServeConfig
    from service.server import ServerThread, TesseraServer

    torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.clients.split(",")]
    config = ServeConfig(role="all", model=args.model, host="127.0.0.1", port=_free_port(), metrics_port=0,
                         http_port=_free_port(), max_batch=max(levels), max_seq_len=512, kv_budget_mb=512,
                         max_queue=256, served_model_name="bench")
    server = ServerThread(TesseraServer(config)).start()
    lm = server.server.lm.loaded.lm
    engine = server.server.lm.loaded.engine
    params = SamplingParams(max_new_tokens=args.new_tokens, stop_token_ids=())
    layouts = [layout_chat(lm.tokenizer, [{"role": "user", "content": p}]).token_ids for p in PROMPTS]
    sampling = lm_pb2.SamplingParams(max_new_tokens=args.new_tokens, stop_token_ids=lm_pb2.StopTokenIds())

    def in_process(index: int) -> int:
        return engine.submit(GenerationRequest(layouts[index % len(layouts)], params)).result().completion_tokens

    channels: list = []

    def make_gateway_call():
        channel = grpc.insecure_channel(server.target)
        channels.append(channel)
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)

        def call(index: int) -> int:
            request = gateway_pb2.QueryRequest(prompt=PROMPTS[index % len(PROMPTS)], sampling=sampling)
            return stub.Query(request, timeout=600).completion_tokens
        return call

    def make_http_call():
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="none",
                               max_retries=0, timeout=600)

        def call(index: int) -> int:
            reply = client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
                max_tokens=args.new_tokens, extra_body={"ignore_eos": True})
            return reply.usage.completion_tokens
        return call

    paths = (("in-process", lambda: in_process), ("gateway", make_gateway_call), ("http", make_http_call))
    print(f"tessera bench serve: {args.model}, {args.new_tokens} new tokens per request, "
          f"{args.requests_per_client} requests per client, torch threads {args.threads}")
    for _, factory in paths:  # warm-up
        factory()(0)
    results = {}
    try:
        for clients in levels:
            for path, factory in paths:
                figures = _measure(factory, clients, args.requests_per_client)
                results[(path, clients)] = figures
                print(f"{path:>10} clients {clients:>2}: {figures['requests_per_s']:6.2f} req/s "
                      f"{figures['tokens_per_s']:7.1f} tok/s  p50 {figures['p50_s']:.3f} s  p99 {figures['p99_s']:.3f} s")
    finally:
        for channel in channels:
            channel.close()
        server.stop()
    summary = {}
    for clients in levels:
        base = results[("in-process", clients)]
        for path, name in (("gateway", "gRPC"), ("http", "HTTP")):
            side = results[(path, clients)]
            overhead = side["p50_s"] / base["p50_s"] - 1
            summary[f"{name.lower()}_overhead_p50_{clients}"] = overhead
            print(f"{name} overhead at {clients:>2} client(s): p50 {overhead * 100:+.1f}%, "
                  f"throughput {side['tokens_per_s'] / base['tokens_per_s']:.2f}x of in-process")
    if 1 in levels and 16 in levels:
        scaling = results[("gateway", 16)]["tokens_per_s"] / results[("gateway", 1)]["tokens_per_s"]
        summary["gateway_scaling_16_over_1"] = scaling
        print(f"gateway throughput at 16 clients / 1 client: {scaling:.2f}x")
    if args.json:
        print(json.dumps({"results": {f"{p}@{c}": v for (p, c), v in results.items()}, **summary}))
    return 0


def _measure(factory, clients: int, per_client: int) -> dict[str, float]:
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(index: int) -> None:
        call = factory()
        barrier.wait()
        for n in range(per_client):
            began = time.perf_counter()
            generated = call(index * per_client + n)
            with lock:
                latencies.append(time.perf_counter() - began)
                tokens[0] += generated

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    ordered = sorted(latencies)
    return {"requests_per_s": len(ordered) / elapsed, "tokens_per_s": tokens[0] / elapsed,
            "p50_s": statistics.median(ordered), "p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
            "elapsed_s": elapsed}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
