"""The OpenAI-compatible HTTP API with the official `openai` client, against `tessera serve all` in a
process of its own on loopback (a tiny random Qwen 3 with Qwen 3's real tokenizer and chat template):
chat and completions, streaming with usage, n and seed, logprobs (equal to the gRPC gateway's, which
the reference model checks), stop strings, JSON schema and json_object output that parses and validates
on a random-weight model (decoding is constrained), forced tool calls with the template's tool prompt
(token counts equal to transformers' `apply_chat_template`), a tool-result turn, the bearer token, and
error statuses; greedy answers equal the gRPC gateway's. Reasoning (`reasoning_content`, thinking
budget) runs on a scripted Qwen 3 (tests/service_fixtures.write_scripted_qwen3)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import grpc
import httpx2 as httpx
import openai
import pytest
import torch

from proto.tessera.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from proto.tessera.lm.v1 import lm_pb2
from service_fixtures import (THINK, free_port, photo, start_process, start_server, write_scripted_qwen3,
                              write_tiny_qwen3)

REPO = Path(__file__).resolve().parent.parent
TOKEN = "test-token-7f3a"
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def checkpoint(qwen3_tokenizer_dir, tmp_path_factory):
    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3-http"), qwen3_tokenizer_dir)


@pytest.fixture(scope="module")
def stack(checkpoint, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    process, target, base = start_process(str(checkpoint), "--max-seq-len", "512", "--kv-budget-mb", "64",
                                          "--served-model-name", "tiny-qwen3", "--auth-token-file", str(token_file),
                                          "--max-message-mb", "1", cwd=REPO)
    yield target, base
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack[1] + "/v1", api_key=TOKEN, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def gateway(stack):
    with grpc.insecure_channel(stack[0]) as channel:
        yield gateway_pb2_grpc.GatewayServiceStub(channel)


@pytest.fixture(scope="module")
def reference_tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def data_url(image: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(image).decode()}"


def chat(client, messages, **kwargs):
    kwargs.setdefault("extra_body", NO_THINKING)
    return client.chat.completions.create(model="tiny-qwen3", messages=messages, **kwargs)


def grpc_query(gateway, messages, **sampling):
    request = gateway_pb2.QueryRequest(
        messages=[lm_pb2.ChatMessage(role=m["role"], content=[lm_pb2.ContentPart(text=m["content"])]) for m in messages],
        sampling=lm_pb2.SamplingParams(**sampling), chat_template_kwargs={"enable_thinking": "false"})
    return gateway.Query(request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=120)


HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


def test_models_health_and_the_bearer_token(stack, client):
    assert [model.id for model in client.models.list().data] == ["tiny-qwen3"]
    assert httpx.get(stack[1] + "/health").status_code == 200  # probes carry no token
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError) as caught:
            openai.OpenAI(base_url=stack[1] + "/v1", api_key=key or "x", max_retries=0).models.list()
        assert "bearer token" in caught.value.message
    reply = httpx.post(stack[1] + "/v1/chat/completions", json={"model": "tiny-qwen3", "messages": HELLO})
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"


def test_greedy_chat_equals_the_grpc_answer_and_counts_the_reference_prompt(client, gateway, reference_tokenizer):
    reply = chat(client, HELLO, max_tokens=12, temperature=0)
    over_grpc = grpc_query(gateway, HELLO, max_new_tokens=12, temperature=0.0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == over_grpc.text and over_grpc.completion_tokens == 12
    assert choice.finish_reason == "length"
    expected = reference_tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, enable_thinking=False,
                                                       tokenize=True, return_dict=False)
    assert reply.usage.prompt_tokens == len(expected) == over_grpc.prompt_tokens
    assert reply.usage.completion_tokens == 12 and reply.usage.total_tokens == len(expected) + 12
    assert reply.model == "tiny-qwen3" and reply.object == "chat.completion"


def test_streamed_deltas_join_into_the_whole_answer_with_usage_last(client):
    whole = chat(client, HELLO, max_tokens=10, temperature=0).choices[0].message.content
    chunks = list(chat(client, HELLO, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_n_choices_with_a_seed_are_reproducible_and_differ(client):
    first = chat(client, HELLO, max_tokens=8, temperature=1.0, n=2, seed=7)
    again = chat(client, HELLO, max_tokens=8, temperature=1.0, n=2, seed=7)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == [c.message.content for c in again.choices]
    assert texts[0] != texts[1]  # each choice has its own seed (seed + index)
    assert first.usage.completion_tokens == 16
    other = chat(client, HELLO, max_tokens=8, temperature=1.0, seed=8)
    assert other.choices[0].message.content != texts[0]


def test_logprobs_equal_the_grpc_ones_and_the_reference_model(client, gateway, checkpoint, reference_tokenizer):
    from transformers import AutoModelForCausalLM

    reply = chat(client, HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    over_grpc = grpc_query(gateway, HELLO, max_new_tokens=6, temperature=0.0, logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == len(over_grpc.logprobs) == 6
    for entry, record in zip(entries, over_grpc.logprobs):
        assert entry.token == record.token and entry.logprob == pytest.approx(record.logprob, abs=1e-6)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy: the best
        assert entry.bytes == list(entry.token.encode())
    # The reference: transformers' log-softmax of the same checkpoint's logits at each generated position.
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = reference_tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, enable_thinking=False,
                                                     tokenize=True, return_dict=False)
    ids = torch.tensor([prompt + list(over_grpc.token_ids)])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].float(), dim=-1)
    for step, record in enumerate(over_grpc.logprobs):
        assert record.token_id == over_grpc.token_ids[step]
        assert record.logprob == pytest.approx(float(logprobs[step, record.token_id]), abs=1e-4)
        assert [t.token_id for t in record.top] == torch.topk(logprobs[step], 3).indices.tolist()


def test_a_stop_string_ends_the_answer_before_it(client):
    whole = chat(client, HELLO, max_tokens=16, temperature=1.0, seed=5).choices[0].message.content
    words = [i for i, c in enumerate(whole) if not c.isspace() and i >= 2]
    assert words, whole
    stop = whole[words[0]:words[0] + 2]
    reply = chat(client, HELLO, max_tokens=16, temperature=1.0, seed=5, stop=[stop])
    assert reply.choices[0].message.content == whole[:whole.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "member": {"type": "boolean"}},
          "required": ["name", "age", "member"], "additionalProperties": False}


def test_json_schema_output_parses_and_validates_on_a_random_model(client):
    reply = chat(client, [{"role": "user", "content": "A person, as JSON."}], max_tokens=60, temperature=1.0, n=3,
                 seed=3, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    for choice in reply.choices:
        person = json.loads(choice.message.content)
        assert set(person) == {"name", "age", "member"}, person
        assert isinstance(person["name"], str) and len(person["name"]) <= 10
        assert isinstance(person["age"], int) and not isinstance(person["age"], bool) and 0 <= person["age"] <= 150
        assert isinstance(person["member"], bool)
        assert choice.finish_reason == "stop"
    free = chat(client, [{"role": "user", "content": "A person, as JSON."}], max_tokens=20, temperature=1.0, seed=3)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)  # unconstrained, the random model writes no JSON


def test_json_object_output_is_one_object(client):
    reply = chat(client, [{"role": "user", "content": "JSON please"}], max_tokens=80, temperature=0.7, seed=11,
                 response_format={"type": "json_object"})
    choice = reply.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # cut by max_tokens: still the beginning of one object
        assert choice.message.content.startswith("{")


def test_a_bad_schema_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, HELLO, max_tokens=4, response_format={"type": "json_schema",
                                                          "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert "json_schema" in caught.value.message


def test_forced_tool_calls_come_back_as_tool_calls_with_the_templates_tool_prompt(client, reference_tokenizer):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    expected = reference_tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True,
                                                       enable_thinking=False, tokenize=True, return_dict=False)
    named = chat(client, messages, tools=TOOLS, max_tokens=60, temperature=1.0, seed=1,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    required = chat(client, messages, tools=TOOLS, max_tokens=120, temperature=1.0, seed=2, tool_choice="required")
    for reply in (named, required):
        assert reply.usage.prompt_tokens == len(expected)
        calls = reply.choices[0].message.tool_calls
        assert calls and all(call.function.name == "get_weather" and call.id.startswith("call_") for call in calls)
        for call in calls:
            arguments = json.loads(call.function.arguments)
            assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("C", "F")
    assert required.choices[0].finish_reason == "tool_calls" and required.choices[0].message.content is None
    assert named.choices[0].finish_reason == "stop"  # as OpenAI answers a named tool_choice
    none = chat(client, messages, tools=TOOLS, max_tokens=2, tool_choice="none")
    assert none.usage.prompt_tokens == len(reference_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, enable_thinking=False, tokenize=True, return_dict=False))


def test_a_streamed_forced_tool_call_arrives_as_a_tool_calls_delta(client):
    chunks = list(chat(client, [{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS, max_tokens=120,
                       temperature=1.0, seed=4, tool_choice="required", stream=True))
    deltas = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert deltas and deltas[0].index == 0 and deltas[0].function.name == "get_weather"
    assert set(json.loads(deltas[0].function.arguments)) == {"city", "unit"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_a_tool_result_turn_is_rendered_as_the_reference_renders_it(client, reference_tokenizer):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                            "arguments": json.dumps({"city": "Paris", "unit": "C"})}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21}"}]
    reply = chat(client, messages, tools=TOOLS, max_tokens=2)
    reference = [{**m, "content": m["content"] or ""} for m in messages]
    expected = reference_tokenizer.apply_chat_template(reference, tools=TOOLS, add_generation_prompt=True,
                                                       enable_thinking=False, tokenize=True, return_dict=False)
    assert reply.usage.prompt_tokens == len(expected)


def test_completions_are_raw_text_with_legacy_logprobs(client, gateway):
    reply = client.completions.create(model="tiny-qwen3", prompt="Once upon a time", max_tokens=5, temperature=0,
                                      logprobs=2)
    over_grpc = gateway.Query(gateway_pb2.QueryRequest(prompt="Once upon a time", raw=True,
                                                       sampling=lm_pb2.SamplingParams(max_new_tokens=5, temperature=0.0)),
                              metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=60)
    choice = reply.choices[0]
    assert choice.text == over_grpc.text and reply.usage.completion_tokens == 5
    assert len(choice.logprobs.tokens) == 5 and "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.text_offset == [sum(len(t) for t in choice.logprobs.tokens[:i]) for i in range(5)]
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    streamed = client.completions.create(model="tiny-qwen3", prompt="Once upon a time", max_tokens=5, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == choice.text


@pytest.mark.parametrize("body, status, words", [
    ({"model": "other", "messages": HELLO}, 404, "does not exist"),
    ({"model": "tiny-qwen3", "messages": []}, 400, "messages"),
    ({"model": "tiny-qwen3", "messages": "hi"}, 400, "messages"),
    ({"model": "tiny-qwen3", "messages": HELLO, "temperature": -1}, 400, "temperature"),
    ({"model": "tiny-qwen3", "messages": HELLO, "top_logprobs": 2}, 400, "logprobs"),
    ({"model": "tiny-qwen3", "messages": HELLO, "n": 99}, 400, "n must be"),
    ({"model": "tiny-qwen3", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}]}]}, 400, "data: URL"),
    ({"model": "tiny-qwen3", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(photo(64, 48))}}]}]}, 400, "text-only"),
    ({"model": "tiny-qwen3", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]}, 400, "invalid base64"),
    ({"model": "tiny-qwen3", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400, "input_audio"),
    ({"model": "tiny-qwen3", "messages": HELLO, "tool_choice": "required"}, 400, "tool_choice needs tools"),
    ({"model": "tiny-qwen3", "messages": [{"role": "user", "content": "x" * 400_000}] * 3}, 413, "bytes"),
])
def test_errors_are_openai_json_with_the_right_status(stack, body, status, words):
    reply = httpx.post(stack[1] + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"},
                       timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and error["type"]


def test_a_prompt_over_the_context_is_a_400_before_any_token(stack):
    reply = httpx.post(stack[1] + "/v1/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60,
                       json={"model": "tiny-qwen3", "messages": [{"role": "user", "content": "word " * 2000}]})
    assert reply.status_code == 400 and "the limit is 511" in reply.json()["error"]["message"]


def test_max_tokens_beyond_the_context_is_a_400_naming_the_counts(stack):
    """An explicit max_tokens that the prompt leaves no room for is refused as OpenAI and vLLM refuse it;
    unset, generation runs to the context."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": "tiny-qwen3", "prompt": "Count:", "temperature": 0}
    prompt_tokens = httpx.post(stack[1] + "/v1/completions", headers=headers, timeout=60,
                               json={**body, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    reply = httpx.post(stack[1] + "/v1/completions", headers=headers, timeout=60,
                       json={**body, "max_tokens": 512 - prompt_tokens + 1})
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]["message"]
    assert "context is 512 tokens" in message and f"at most {512 - prompt_tokens} here" in message, message
    for fits in ({"max_tokens": 512 - prompt_tokens}, {}):
        reply = httpx.post(stack[1] + "/v1/completions", headers=headers, timeout=120, json={**body, **fits})
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= 512


def test_what_clients_of_openai_and_vllm_rely_on(stack):
    """Defaults and error fields a new user's trial found missing: completions' unset max_tokens is 16 and
    its logprobs go to 20, as OpenAI and vLLM have them; a prompt longer than the context is named (not "lower
    max_tokens to at most 0"); the sampling checks' 400s name their field in `param`; image parts are a user
    message's; /v1/models gives a creation time."""
    headers = {"Authorization": f"Bearer {TOKEN}"}

    def post(route: str, body: dict) -> httpx.Response:
        return httpx.post(stack[1] + route, json={"model": "tiny-qwen3", **body}, headers=headers, timeout=120)

    reply = post("/v1/completions", {"prompt": "Count:", "temperature": 0, "ignore_eos": True, "logprobs": 20})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 16
    assert all(len(top) >= 20 for top in reply.json()["choices"][0]["logprobs"]["top_logprobs"])
    reply = post("/v1/completions", {"prompt": "word " * 2000, "max_tokens": 5})
    message = reply.json()["error"]["message"]
    assert reply.status_code == 400 and "the limit is 511" in message and "max_tokens" not in message, reply.text
    for field, value in (("temperature", -1), ("top_p", 1.5), ("presence_penalty", 3), ("repetition_penalty", 0),
                         ("min_p", 2)):
        reply = post("/v1/chat/completions", {"messages": HELLO, "max_tokens": 1, field: value})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == field, reply.text
    image = {"type": "image_url", "image_url": {"url": data_url(photo(64, 48))}}
    reply = post("/v1/chat/completions", {"max_tokens": 1, "messages": [
        {"role": "system", "content": [image, {"type": "text", "text": "Be brief."}]}, *HELLO]})
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == "messages[0].content[0]", reply.text
    assert "user messages only" in error["message"] and "'system'" in error["message"]
    reply = httpx.post(stack[1] + "/v1/chat/completions", headers={**headers, "Content-Type": "application/json"},
                       content=rb'{"model": "tiny-qwen3", "messages": [{"role": "user", "content": "Hi \ud800"}]}')
    assert reply.status_code == 400 and "surrogate" in reply.json()["error"]["message"], reply.text
    reply = httpx.post(stack[1] + "/v1/chat/completions", headers={**headers, "Content-Type": "application/json"},
                       content=rb'{"model": "tiny-qwen3", "messages": [{"role": "user", "content": "\\ud800"},]}')
    assert reply.status_code == 400 and "surrogate" not in reply.json()["error"]["message"], reply.text  # an escaped \
    created = httpx.get(stack[1] + "/v1/models", headers=headers).json()["data"][0]["created"]
    assert time.time() - 86_400 < created <= time.time()


def test_a_stream_its_client_closes_is_counted_as_client_closed(stack):
    """The requests counter keeps every request: one whose client left mid-stream counts as status 499, and
    the tokens it generated count in tessera_tokens_generated_total."""
    headers = {"Authorization": f"Bearer {TOKEN}"}

    def metric(prefix: str) -> float:
        for line in httpx.get(stack[1] + "/metrics").text.splitlines():
            if line.startswith(prefix):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def closed() -> float:
        return metric('tessera_http_requests_total{route="completions",status="499"}')

    before, generated = closed(), metric("tessera_tokens_generated_total ")
    with httpx.stream("POST", stack[1] + "/v1/completions", headers=headers, timeout=60, json={
            "model": "tiny-qwen3", "prompt": "Count:", "max_tokens": 400, "temperature": 0, "stream": True}) as reply:
        assert reply.status_code == 200
        events = [line for _, line in zip(range(3), (x for x in reply.iter_lines() if x.startswith("data: ")))]
    assert len(events) == 3 and "[DONE]" not in events[-1]
    deadline = time.monotonic() + 20
    while (closed() < before + 1 or metric("tessera_tokens_generated_total ") == generated) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert closed() == before + 1
    assert generated + 3 <= metric("tessera_tokens_generated_total ") < generated + 400


def test_32_concurrent_streams_all_complete(stack):
    async def one(client, index):
        stream = await client.chat.completions.create(model="tiny-qwen3", messages=[{"role": "user", "content": f"n{index}"}],
                                                      max_tokens=6, temperature=1.0, seed=index, stream=True,
                                                      stream_options={"include_usage": True}, extra_body=NO_THINKING)
        chunks = [chunk async for chunk in stream]
        return chunks[-1].usage.completion_tokens, [c.choices[0].finish_reason for c in chunks if c.choices]

    async def main():
        async with openai.AsyncOpenAI(base_url=stack[1] + "/v1", api_key=TOKEN, max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    for completion_tokens, reasons in asyncio.run(main()):
        assert completion_tokens == 6 and reasons[-1] == "length"


def test_a_client_that_disconnects_frees_its_request(stack, gateway):
    from proto.tessera.lm.v1 import lm_pb2_grpc

    with httpx.stream("POST", stack[1] + "/v1/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"model": "tiny-qwen3", "messages": HELLO, "max_tokens": 400, "stream": True,
                            **NO_THINKING}, timeout=60) as reply:
        for line in reply.iter_lines():
            if '"content"' in line:
                break  # one token seen: hang up
    with grpc.insecure_channel(stack[0]) as channel:
        info = lm_pb2_grpc.LanguageModelServiceStub(channel)
        for _ in range(100):
            state = info.GetInfo(lm_pb2.GetInfoRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),))
            if state.kv_blocks_free == state.kv_blocks_total:
                break
            asyncio.run(asyncio.sleep(0.1))
        assert state.kv_blocks_free == state.kv_blocks_total  # cancelled, its blocks freed


# ----- reasoning, on a scripted Qwen 3 --------------------------------------------------------------

@pytest.fixture(scope="module")
def thinker(qwen3_tokenizer_dir, tmp_path_factory):
    """Thinks "Let me count" over and over once it opens <think>; after a blank line answers "The answer
    is 4." and ends its turn."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(qwen3_tokenizer_dir / "tokenizer.json"))
    newline, blank = tokenizer.encode("\n").ids, tokenizer.encode("\n\n").ids
    thought, answer = tokenizer.encode("Let me count").ids, tokenizer.encode("The answer is 4.").ids
    states = thought + answer + newline + blank
    assert len(newline) == len(blank) == 1 and len(set(states)) == len(states)  # each token one successor
    script = {newline[0]: THINK, THINK: thought[0], **dict(zip(thought, thought[1:] + thought[:1])),
              blank[0]: answer[0], **dict(zip(answer, answer[1:] + [151_645]))}
    directory = write_scripted_qwen3(tmp_path_factory.mktemp("scripted-qwen3"), qwen3_tokenizer_dir, script)
    port = free_port()
    server = start_server(model=str(directory), max_seq_len=256, http_port=port, served_model_name="thinker")
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    server.stop()


def test_reasoning_content_with_a_thinking_budget(thinker):
    question = [{"role": "user", "content": "What is 2 + 2?"}]
    reply = thinker.chat.completions.create(model="thinker", messages=question, max_tokens=60, temperature=0.7,
                                            extra_body={"thinking_budget": 6})
    message = reply.choices[0].message
    assert message.content == "The answer is 4." and reply.choices[0].finish_reason == "stop"
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning.startswith("Let me countLet me") and "<think>" not in reasoning and "</think>" not in reasoning
    assert reply.usage.completion_tokens_details.reasoning_tokens > 6
    chunks = list(thinker.chat.completions.create(model="thinker", messages=question, max_tokens=60, stream=True,
                                                  temperature=0.7, extra_body={"thinking_budget": 6}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == "The answer is 4."
    off = thinker.chat.completions.create(model="thinker", messages=question, max_tokens=20,
                                          extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.content == "The answer is 4."
    assert not off.choices[0].message.model_extra.get("reasoning_content")
    cut = thinker.chat.completions.create(model="thinker", messages=question, max_tokens=5, temperature=0.7)
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content == ""


# ----- loading -----------------------------------------------------------------------------------------

def test_503_while_the_model_loads(checkpoint):
    import threading

    from service.server import default_lm_loader
    from service.config import ServeConfig

    release = threading.Event()
    load = default_lm_loader(ServeConfig(role="all", model=str(checkpoint), max_seq_len=256, kv_budget_mb=16))

    def held():
        release.wait(60)
        return load()

    port = free_port()
    server = start_server(model=str(checkpoint), load_lm=held, wait=False, http_port=port, max_seq_len=256)
    try:
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/health").status_code == 503
        reply = httpx.post(base + "/v1/chat/completions", json={"model": str(checkpoint), "messages": HELLO})
        assert reply.status_code == 503 and "loading" in reply.json()["error"]["message"]
        release.set()
        server.call(server.server.loaded.wait(), 120)
        assert httpx.get(base + "/health").status_code == 200
    finally:
        release.set()
        server.stop()


# ----- images, on a tiny vision-language Gemma 3 ----------------------------------------------------

@pytest.fixture(scope="module")
def vlm(tiny_vlm_tok_dir):
    process, target, base = start_process(str(tiny_vlm_tok_dir), "--max-seq-len", "2048", "--kv-budget-mb", "256",
                                          "--served-model-name", "tiny-vlm", cwd=REPO)
    yield target, base, openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
    process.terminate()
    process.wait(timeout=60)


def metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not among the metrics")


def test_an_image_data_url_answers_as_the_grpc_gateway_does(vlm):
    target, base, client = vlm
    image = photo(320, 200, seed=3)
    reply = client.chat.completions.create(model="tiny-vlm", max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                     {"type": "text", "text": "Describe the image."}]}])
    with grpc.insecure_channel(target) as channel:
        over_grpc = gateway_pb2_grpc.GatewayServiceStub(channel).Query(gateway_pb2.QueryRequest(
            prompt="Describe the image.", images=[{"data": image}],
            sampling=lm_pb2.SamplingParams(max_new_tokens=8, temperature=0.0)), timeout=300)
    assert reply.choices[0].message.content == over_grpc.text
    assert reply.usage.prompt_tokens == over_grpc.prompt_tokens > 256


def test_a_two_turn_image_chat_encodes_the_image_once_and_reuses_the_prefix(vlm):
    target, base, client = vlm
    image = data_url(photo(300, 300, seed=9), "image/png")
    first_turn = [{"role": "system", "content": "You describe photos."},
                  {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                               {"type": "image_url", "image_url": {"url": image}}]}]
    encoded = metric(base, "tessera_images_encoded_total")
    first = client.chat.completions.create(model="tiny-vlm", messages=first_turn, max_tokens=6, temperature=0)
    assert metric(base, "tessera_images_encoded_total") == encoded + 1
    second_turn = first_turn + [{"role": "assistant", "content": first.choices[0].message.content},
                                {"role": "user", "content": "And the colours?"}]
    hits = metric(base, "tessera_prefix_cache_hit_tokens")
    second = client.chat.completions.create(model="tiny-vlm", messages=second_turn, max_tokens=6, temperature=0)
    assert metric(base, "tessera_images_encoded_total") == encoded + 1  # the vision cache held it
    assert metric(base, "tessera_prefix_cache_hit_tokens") - hits >= 256  # the first turn's image tokens at least
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    # The same image twice in one request, and a third turn about it again: still one encode.
    twice = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                          {"type": "text", "text": "Compare:"},
                                          {"type": "image_url", "image_url": {"url": image}}]}]
    client.chat.completions.create(model="tiny-vlm", messages=twice, max_tokens=2, temperature=0)
    assert metric(base, "tessera_images_encoded_total") == encoded + 1
    fresh = data_url(photo(200, 300, seed=10))
    client.chat.completions.create(model="tiny-vlm", max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": fresh}}, {"type": "image_url", "image_url": {"url": fresh}}]}])
    assert metric(base, "tessera_images_encoded_total") == encoded + 2


def test_pan_and_scan_per_request_and_image_errors_over_http(vlm):
    target, base, client = vlm
    wide = data_url(photo(1200, 300, seed=4))
    plain = client.chat.completions.create(model="tiny-vlm", max_tokens=1, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": wide}}]}])
    cropped = client.chat.completions.create(model="tiny-vlm", max_tokens=1, extra_body={"pan_and_scan": {
        "enabled": True, "min_crop_size": 64, "max_num_crops": 4}}, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": wide}}]}])
    assert cropped.usage.prompt_tokens >= plain.usage.prompt_tokens + 2 * 256  # crops add tiles
    broken = data_url(photo(64, 48)[:60])
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-vlm", max_tokens=1, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": broken}}]}])
    assert "image 0" in caught.value.message
    with pytest.raises(openai.APIStatusError) as caught:  # more images than the request limit (8)
        client.chat.completions.create(model="tiny-vlm", max_tokens=1, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": wide}}] * 9}])
    assert caught.value.status_code == 413 and "images" in caught.value.message
    with pytest.raises(openai.APIStatusError) as caught:  # counted before any is decoded or fetched
        client.chat.completions.create(model="tiny-vlm", max_tokens=1, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.example/a.png"}}] * 9}])
    assert caught.value.status_code == 413 and "at most 8 per request" in caught.value.message


def test_a_grammar_leaves_the_thinking_free_and_constrains_the_answer(thinker):
    digit = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["n"], "additionalProperties": False}
    reply = thinker.chat.completions.create(
        model="thinker", messages=[{"role": "user", "content": "2 + 2?"}], max_tokens=60, temperature=0.7,
        response_format={"type": "json_schema", "json_schema": {"name": "digit", "schema": digit}},
        extra_body={"thinking_budget": 4})
    message = reply.choices[0].message
    assert message.model_extra["reasoning_content"].startswith("Let me count")  # the script's own thinking
    assert set(json.loads(message.content)) == {"n"} and reply.choices[0].finish_reason == "stop"


def test_serve_openai_alone_in_front_of_a_gateway(stack, client):
    front = start_server("openai", model="unused", port=free_port(), gateway_target=stack[0], auth_token=TOKEN,
                         served_model_name="tiny-qwen3")
    try:
        base = f"http://127.0.0.1:{front.server.port}"
        for _ in range(100):  # /health follows the gateway's readiness
            if httpx.get(base + "/health").status_code == 200:
                break
            asyncio.run(asyncio.sleep(0.1))
        remote = openai.OpenAI(base_url=base + "/v1", api_key=TOKEN, max_retries=0, timeout=120)
        assert remote.chat.completions.create(model="tiny-qwen3", messages=HELLO, max_tokens=8, temperature=0,
                                              extra_body=NO_THINKING).choices[0].message.content == \
            chat(client, HELLO, max_tokens=8, temperature=0).choices[0].message.content
        with pytest.raises(openai.BadRequestError):  # the gateway's INVALID_ARGUMENT is a 400 here too
            remote.chat.completions.create(model="tiny-qwen3", messages=HELLO, max_tokens=8, temperature=-3)
        with pytest.raises(openai.APIStatusError) as caught:  # over the gateway's limits: 413, as from `serve all`
            remote.chat.completions.create(model="tiny-qwen3", messages=[{"role": "user", "content": "x" * 400_000}] * 3)
        assert caught.value.status_code == 413 and "too large" in caught.value.message
        many = [{"role": ("user", "assistant")[i % 2], "content": "a"} for i in range(1101)]
        with pytest.raises(openai.APIStatusError) as caught:  # refused by the gateway itself (RequestTooLarge)
            remote.chat.completions.create(model="tiny-qwen3", messages=many, max_tokens=8)
        assert caught.value.status_code == 413 and "1,101 chat messages" in caught.value.message
    finally:
        front.stop()


def test_a_full_queue_is_429_and_metrics_count_the_statuses(checkpoint):
    port = free_port()
    server = start_server(model=str(checkpoint), http_port=port, max_batch=1, max_queue=1, max_seq_len=512)
    base = f"http://127.0.0.1:{port}"
    body = {"model": str(checkpoint), "messages": HELLO, "max_tokens": 300, "ignore_eos": True, **NO_THINKING}

    async def main():
        async with httpx.AsyncClient(base_url=base, timeout=300) as http:
            return await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(5)))

    try:
        replies = asyncio.run(main())
        statuses = sorted(reply.status_code for reply in replies)
        assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}, statuses
        refused = next(reply for reply in replies if reply.status_code == 429).json()["error"]
        assert refused["type"] == "rate_limit_error" and "waiting" in refused["message"]
        for reply in replies:
            if reply.status_code == 200:
                assert reply.json()["usage"]["completion_tokens"] == 300  # ignore_eos: to max_tokens
        counted = httpx.get(base + "/metrics").text
        assert f'tessera_http_requests_total{{route="chat",status="429"}} {statuses.count(429)}.0' in counted
    finally:
        server.stop()


def test_the_grpc_gateway_takes_chat_messages_with_images_in_order(gateway):
    with pytest.raises(grpc.RpcError) as caught:
        gateway.Query(gateway_pb2.QueryRequest(messages=[lm_pb2.ChatMessage(role="user", content=[
            lm_pb2.ContentPart(text="two images?"), lm_pb2.ContentPart(image=True)])], images=[]),
            metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1 image part(s) for 0 image(s)" in \
        caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        gateway.Query(gateway_pb2.QueryRequest(prompt="hi", messages=[lm_pb2.ChatMessage(role="user", content=[
            lm_pb2.ContentPart(text="x")])]), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=30)
    assert "either prompt or messages" in caught.value.details()


def test_a_schema_may_force_the_text_of_control_tokens(client):
    for text in ("<|im_end|>", "a<think>b</tool_call>"):
        reply = chat(client, HELLO, max_tokens=40, temperature=1.0, seed=1, response_format={
            "type": "json_schema", "json_schema": {"name": "t", "schema": {"const": text}}})
        assert json.loads(reply.choices[0].message.content) == text  # spelled with ordinary tokens


@pytest.mark.parametrize("schema", [{"$ref": "#"}, {"type": "object", "properties": {"a": {"$ref": "#"}},
                                                    "required": ["a"]}])
def test_a_schema_that_recurses_without_end_is_a_400(stack, schema):
    reply = httpx.post(stack[1] + "/v1/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120,
                       json={"model": "tiny-qwen3", "messages": HELLO, "max_tokens": 400, **NO_THINKING,
                             "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}})
    assert reply.status_code == 400 and "constraint" in reply.json()["error"]["message"], reply.text


def test_nulls_are_unset_logit_bias_steers_and_unsupported_fields_are_refused(stack, client):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": "tiny-qwen3", "messages": HELLO, "max_tokens": 3, "temperature": 0, "n": None, "stream": None,
            "logprobs": None, "presence_penalty": None, "frequency_penalty": None, "min_p": None, **NO_THINKING}
    plain = httpx.post(stack[1] + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert plain.status_code == 200, plain.text
    first = chat(client, HELLO, max_tokens=1, temperature=0, logprobs=True).choices[0].logprobs.content[0]
    legacy = client.completions.create(model="tiny-qwen3", prompt="Hello", max_tokens=1, temperature=0, logprobs=0)
    steered = chat(client, HELLO, max_tokens=1, temperature=0, logprobs=True, logit_bias={"15": 100})
    assert steered.choices[0].logprobs.content[0].token == "0"  # id 15 is "0" in Qwen's vocabulary
    assert first.token != "0"
    assert set(legacy.choices[0].logprobs.top_logprobs[0]) == {legacy.choices[0].logprobs.tokens[0]}  # as OpenAI's
    for extra, name in (({"min_tokens": 3}, "min_tokens"), ({"functions": [{"name": "f"}]}, "functions"),
                        ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"15": 500}}, "logit_bias"),
                        ({"modalities": ["text", "audio"]}, "modalities")):
        reply = httpx.post(stack[1] + "/v1/chat/completions", json={**body, **extra}, headers=headers, timeout=60)
        assert reply.status_code == 400 and name in reply.json()["error"]["message"], (extra, reply.text)
    for change, where in (({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 123}}]}]},
                           "messages.0.content.0.image_url.url"),
                          ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "data:,"}]}]},
                           "messages.0.content.0.image_url"),
                          ({"messages": [{"role": "user", "content": 123}]}, "messages.0.content"),
                          ({"tool_choice": {"type": "function"}}, "tool_choice.function"),
                          ({"logit_bias": {"a[1]": "zz"}}, "logit_bias.a[1]")):
        # content is a string or a list of parts: the error is the one inside the part sent, not "not a string";
        # pydantic's names of a union's members (`str`, `list[ContentPart]`, `NamedToolChoice`) are not fields
        reply = httpx.post(stack[1] + "/v1/chat/completions", headers=headers, timeout=60, json={**body, **change})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == where, reply.text
    for prompt in ([1, 2, 3], [[1, 2], [3]]):  # token ids: a 400 of their own, not a validation error on `str`
        reply = httpx.post(stack[1] + "/v1/completions", json={"model": "tiny-qwen3", "prompt": prompt, "max_tokens": 2},
                           headers=headers, timeout=60)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt", reply.text
        assert "token ids" in reply.json()["error"]["message"]


def test_parallel_tool_calls_false_gives_one_call(client):
    reply = chat(client, [{"role": "user", "content": "Weather in Paris and Oslo?"}], tools=TOOLS, max_tokens=120,
                 temperature=1.0, seed=2, tool_choice="required", parallel_tool_calls=False)
    assert len(reply.choices[0].message.tool_calls) == 1


def test_completions_take_response_format_and_never_think_under_it(client):
    # logit_bias pushes <think> (151667) to the top: a raw completion's constrained text may not open it
    reply = client.completions.create(model="tiny-qwen3", prompt="A person:", max_tokens=60, temperature=1.0, seed=2,
                                      logit_bias={"151667": 100}, extra_body={"response_format": {
                                          "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}})
    assert set(json.loads(reply.choices[0].text)) == {"name", "age", "member"}


def test_streamed_completions_count_every_prompt_once(client):
    prompts = ["a", "a much longer prompt than the first one, with many more tokens in it"]
    whole = client.completions.create(model="tiny-qwen3", prompt=prompts, max_tokens=2, n=2)
    chunks = list(client.completions.create(model="tiny-qwen3", prompt=prompts, max_tokens=2, n=2, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens > 14
    assert sorted(c.index for c in whole.choices) == [0, 1, 2, 3]


def test_tools_checks_and_auto_with_a_response_format(stack, client):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    auto = chat(client, HELLO, tools=TOOLS, max_tokens=30, temperature=1.0, seed=1,
                response_format={"type": "json_object"})  # no call forced: the answer is JSON
    assert auto.choices[0].message.content.startswith("{")
    assert chat(client, HELLO, tools=[], tool_choice="auto", max_tokens=2).choices[0].message.tool_calls is None
    weather = TOOLS[0]["function"]
    for tools, words in (([TOOLS[0], TOOLS[0]], "duplicate"),
                         ([{"type": "function", "function": {**weather, "parameters": {"type": "integer"}}}],
                          "object")):
        reply = httpx.post(stack[1] + "/v1/chat/completions", headers=headers, timeout=60,
                           json={"model": "tiny-qwen3", "messages": HELLO, "tools": tools})
        assert reply.status_code == 400 and words in reply.json()["error"]["message"]


def test_model_lookup_unknown_routes_and_auth_headers(stack, client):
    assert client.models.retrieve("tiny-qwen3").id == "tiny-qwen3"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        reply = httpx.request(method, stack[1] + path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert reply.status_code == status and reply.json()["error"]["message"]
        assert status != 405 or reply.headers["allow"] == "POST"
    refused = httpx.get(stack[1] + "/v1/models")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int4"])
def test_serve_quantized_weights(checkpoint, scheme):
    port = free_port()
    server = start_server(model=str(checkpoint), http_port=port, max_seq_len=256, quantize=scheme)
    try:
        reply = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0).chat.completions \
            .create(model=str(checkpoint), messages=HELLO, max_tokens=5, extra_body={"ignore_eos": True, **NO_THINKING})
        assert reply.usage.completion_tokens == 5
        layer = server.server.lm.loaded.lm.model.layers[0].self_attn.qkv_proj  # q, k and v fused at load
        assert type(layer).__name__ == {"int8-dynamic": "Int8DynamicLinear", "int4": "Int4Linear"}[scheme]
    finally:
        server.stop()


def test_a_busy_http_port_stops_serve_all_before_it_loads_anything(checkpoint):
    import socket

    loaded = []
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError, match=f"HTTP port {busy.getsockname()[1]}"):
            start_server(model=str(checkpoint), http_port=busy.getsockname()[1], load_lm=lambda: loaded.append(1))
    assert not loaded
