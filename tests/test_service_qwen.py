"""`tessera serve all` on a Qwen 3 checkpoint (a tiny random model with Qwen 3's real tokenizer and chat
template), over a real loopback socket: the LM service and the gateway answer chats with the prompt the
checkpoint's own template gives (equal to transformers' `apply_chat_template`) and stop on the
checkpoint's end-of-turn id; GetInfo says the model takes no images, and images or soft tokens are
INVALID_ARGUMENT naming why."""

from __future__ import annotations

import json

import grpc
import pytest

from proto.tessera.common.v1 import tensor_pb2
from proto.tessera.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from proto.tessera.lm.v1 import lm_pb2, lm_pb2_grpc
from service_fixtures import END_OF_TEXT, IM_END, photo, refused, start_server, write_tiny_qwen3


@pytest.fixture(scope="module")
def checkpoint(qwen3_tokenizer_dir, tmp_path_factory):
    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"), qwen3_tokenizer_dir)


@pytest.fixture(scope="module")
def server(checkpoint):
    running = start_server(model=str(checkpoint), max_seq_len=512)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as channel:
        yield channel


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


def _messages(chat):
    return [lm_pb2.ChatMessage(role=m["role"], content=[lm_pb2.ContentPart(text=m["content"])]) for m in chat]


def test_chat_prompt_is_the_checkpoints_template_and_generation_stops_at_its_end_of_turn(checkpoint, channel):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(checkpoint)
    expected = reference.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=True)
    lm = lm_pb2_grpc.LanguageModelServiceStub(channel)
    tokenized = lm.Tokenize(lm_pb2.TokenizeRequest(messages=_messages(CHAT)), timeout=30)
    assert list(tokenized.token_ids) == list(expected["input_ids"])
    info = lm.GetInfo(lm_pb2.GetInfoRequest(), timeout=30)
    assert not info.accepts_images and info.vocab_size == 151_936

    stop_on_any_token = lm_pb2.StopTokenIds(ids=list(range(151_936)))  # the first token ends it: "stop"
    reply = lm.Generate(lm_pb2.GenerateRequest(messages=_messages(CHAT), sampling=lm_pb2.SamplingParams(
        max_new_tokens=4, stop_token_ids=stop_on_any_token)), timeout=60)
    assert reply.finish_reason == "stop" and reply.prompt_tokens == len(expected["input_ids"])
    gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
    answer = gateway.Query(gateway_pb2.QueryRequest(prompt="What is 2 + 2?", sampling=lm_pb2.SamplingParams(
        max_new_tokens=5)), timeout=60)
    assert answer.completion_tokens >= 1 and answer.finish_reason in ("stop", "length")
    one_turn = reference.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], tokenize=True,
                                             add_generation_prompt=True, return_dict=True)["input_ids"]
    assert answer.prompt_tokens == len(one_turn)


def test_image_parts_and_unknown_roles_are_refused_not_dropped(channel):
    """A text-only template would drop an image part or a role it does not know without a word."""
    lm = lm_pb2_grpc.LanguageModelServiceStub(channel)
    image_part = [lm_pb2.ChatMessage(role="user", content=[lm_pb2.ContentPart(image=True),
                                                           lm_pb2.ContentPart(text="what is it?")])]
    error, _ = refused(lambda: lm.Tokenize(lm_pb2.TokenizeRequest(messages=image_part), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "text-only" in error.details()
    for role in ("bogus", "", "developer"):
        messages = [lm_pb2.ChatMessage(role=role, content=[lm_pb2.ContentPart(text="hello")])]
        error, _ = refused(lambda: lm.Generate(lm_pb2.GenerateRequest(messages=messages), timeout=30))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, role
        assert f"has role {role!r}; allowed: system, user, assistant, tool" in error.details()


def test_images_and_soft_tokens_are_refused_for_a_text_only_model(channel):
    gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
    error, _ = refused(lambda: gateway.Query(gateway_pb2.QueryRequest(
        prompt="What is this?", images=[tensor_pb2.Image(data=photo(64, 48))]), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "text-only" in error.details()
    lm = lm_pb2_grpc.LanguageModelServiceStub(channel)
    soft = tensor_pb2.Tensor(data=b"\0" * (256 * 64 * 4), dtype="float32", shape=[1, 256, 64])
    error, _ = refused(lambda: lm.Generate(lm_pb2.GenerateRequest(prompt="Hi", images=[soft]), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "image" in error.details()


THINK, END_THINK = 151_667, 151_668


def test_enable_thinking_false_is_rendered_as_the_template_renders_it(checkpoint, channel):
    """chat_template_kwargs reach the template: the prompt ids equal apply_chat_template(enable_thinking=
    False), which pre-fills the empty <think> block; a value that is not JSON is INVALID_ARGUMENT naming it."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(checkpoint)
    expected = reference.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=True,
                                             enable_thinking=False)["input_ids"]
    assert THINK in expected and END_THINK in expected
    lm = lm_pb2_grpc.LanguageModelServiceStub(channel)
    tokenized = lm.Tokenize(lm_pb2.TokenizeRequest(messages=_messages(CHAT),
                                                   chat_template_kwargs={"enable_thinking": "false"}), timeout=30)
    assert list(tokenized.token_ids) == list(expected)
    error, _ = refused(lambda: lm.Tokenize(lm_pb2.TokenizeRequest(
        messages=_messages(CHAT), chat_template_kwargs={"enable_thinking": "nope"}), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "enable_thinking" in error.details()


def test_thinking_budget_zero_places_the_empty_block_and_reasoning_is_kept_apart(channel):
    """Budget 0: the first completion tokens are <think>, a blank line, </think>, a blank line (what the
    template writes for enable_thinking=False); the stream marks the block's pieces as reasoning, the answer
    pieces add up to `text`, and reasoning + answer tokens are the completion tokens; the gateway too."""
    from transformers import AutoTokenizer  # noqa: F401 - the fixture's tokenizer is the real Qwen 3 one

    lm = lm_pb2_grpc.LanguageModelServiceStub(channel)
    sampling = lm_pb2.SamplingParams(max_new_tokens=12, thinking_budget=0, stop_token_ids=lm_pb2.StopTokenIds())
    messages = list(lm.GenerateStream(lm_pb2.GenerateRequest(messages=_messages(CHAT), sampling=sampling),
                                      timeout=60))
    done = messages[-1].done
    blank = list(done.token_ids)[1]
    assert list(done.token_ids)[:4] == [THINK, blank, END_THINK, blank]
    assert done.completion_tokens == 12 and done.reasoning_tokens == 3 and not done.reasoning_truncated
    pieces = messages[:-1]
    assert [p.token_id for p in pieces if p.reasoning and p.HasField("token_id")] == [THINK, blank, END_THINK]
    assert "".join(p.text for p in pieces if not p.reasoning) == done.text
    assert done.reasoning_text.strip() == "" and not done.text.startswith("\n")
    gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
    answer = gateway.Query(gateway_pb2.QueryRequest(prompt="What is 2 + 2?", sampling=sampling), timeout=60)
    assert answer.reasoning_tokens == 3 and answer.completion_tokens == 12


def test_generate_cli_keeps_reasoning_apart(checkpoint, capsys):
    """`tessera generate --thinking-budget 0` on a Qwen 3 checkpoint: --json has the reasoning fields, and
    the streamed output puts the (empty) thinking under its header before the answer."""
    from service.cli import main

    args = ["generate", "--model", str(checkpoint), "--prompt", "What is 2 + 2?", "--thinking-budget", "0",
            "--max-new-tokens", "6"]
    assert main(args + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["token_ids"][0] == THINK and summary["token_ids"][2] == END_THINK
    assert summary["reasoning_tokens"] == 3 and summary["reasoning_text"].strip() == ""
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.index("[Thinking]") < out.index("[Answer]") and out.endswith(summary["text"] + "\n")
    assert main(["generate", "--model", str(checkpoint), "--prompt", "hi", "--template-kwarg", "enable_thinking"]) == 2
    assert "NAME=JSON" in capsys.readouterr().err


def test_query_cli_sends_the_budget_and_template_kwargs(server, capsys):
    from service.cli import main

    assert main(["query", "--target", server.target, "--thinking-budget", "0", "--max-new-tokens", "6",
                 "What is 2 + 2?"]) == 0
    out = capsys.readouterr().out
    assert out.index("[Thinking]") < out.index("[Answer]")
    assert main(["query", "--target", server.target, "--stream", "--no-thinking", "--max-new-tokens", "4",
                 "What is 2 + 2?"]) == 0
    assert "[Thinking]" not in capsys.readouterr().out  # the template's empty block is prompt, not output


def test_a_thinking_budget_closes_an_open_block_over_grpc(checkpoint, channel):
    """A raw prompt that opens the block (as thinking-only templates pre-fill "<think>\\n"): with budget 5
    the server inserts its end-of-thinking message, </think> and a blank line after 4 sampled tokens (the
    prompt's newline counts), and the answer follows; reasoning + answer tokens = completion tokens."""
    from lm.thinking import ThinkingTokens
    from lm.tokenizer import Tokenizer

    thinking = ThinkingTokens.from_tokenizer(Tokenizer.from_dir(checkpoint))
    prompt = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    lm = lm_pb2_grpc.LanguageModelServiceStub(channel)
    sampling = lm_pb2.SamplingParams(max_new_tokens=40, thinking_budget=5, stop_token_ids=lm_pb2.StopTokenIds())
    messages = list(lm.GenerateStream(lm_pb2.GenerateRequest(prompt=prompt, raw=True, sampling=sampling), timeout=60))
    done = messages[-1].done
    ids = list(done.token_ids)
    closing = thinking.closing_ids()
    assert ids[4:4 + len(closing)] == closing, "the block was not closed after the budget"
    reasoning = 4 + len(closing) - len(thinking.blank_line_ids)  # up to and including </think>
    assert done.reasoning_tokens == reasoning and done.completion_tokens == 40
    assert done.reasoning_text.rstrip().endswith("I will now answer from what I have so far.")
    assert sum(1 for m in messages[:-1] if m.HasField("token_id") and not m.reasoning) == 40 - reasoning
    assert "".join(m.text for m in messages[:-1] if not m.reasoning) == done.text
