"""Hybrid thinking in the engine, driven by a scripted model (the next token is a fixed function of the
last one): the thinking budget closes an open <think> block with the end message, </think> and a blank
line, then the model answers; a model that closes the block itself gets nothing inserted; budget 0; a
block opened by the prompt; streamed pieces marked reasoning or answer; cancel while thinking;
preemption and chunked prefill in the middle of a budgeted request change nothing; a model without
<think> refuses a budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lm.engine import Engine, EngineConfig
from lm.requests import GenerationRequest, InvalidRequest
from lm.sampling import SamplingParams
from lm.thinking import ThinkingTokens
from lm.tokenizer import IncrementalDecoder
from test_lm_engine import tiny_config

BOS, EOS, THINK, END_THINK, BLANK = 2, 1, 3, 4, 5
THOUGHT = (6, 7)  # "hmm ", "so "
ANSWER = (10, 11, 12)  # "The ", "answer ", "is 42."
MESSAGE = (8, 9)  # the end-of-thinking message
USER = 20  # a prompt token
TEXT = {BOS: "", EOS: "", THINK: "<think>", END_THINK: "</think>", BLANK: "\n\n", 6: "hmm ", 7: "so ",
        8: "\nTime is up. ", 9: "Answering.\n", 10: "The ", 11: "answer ", 12: "is 42.", USER: "Q? "}
THINKING = ThinkingTokens(start_id=THINK, end_id=END_THINK, end_message_ids=MESSAGE, blank_line_ids=(BLANK,))


class ScriptTokenizer:
    def incremental_decoder(self):
        return IncrementalDecoder(self, skip_special_tokens=True)

    def decode(self, ids, skip_special_tokens=False):
        return "".join("" if skip_special_tokens and i in (THINK, END_THINK) else TEXT.get(i, "?") for i in ids)


class ScriptedModel(nn.Module):
    """next token = `script[last token]`: hidden states are one-hot last tokens, logits one-hot choices.
    Follows the family network contract (lm.models.base) without attention (its cache is never read)."""

    def __init__(self, script: dict[int, int], vocab: int = 32):
        super().__init__()
        table = torch.full((vocab,), EOS)
        for last, nxt in script.items():
            table[last] = nxt
        self.register_buffer("table", table)
        self.vocab = vocab

    def forward(self, input_ids, positions, attention, soft_tokens=None, image_mask=None):
        return nn.functional.one_hot(input_ids, self.vocab).float()  # (1, N, vocab)

    def logits(self, hidden):
        return nn.functional.one_hot(self.table[hidden.argmax(-1)], self.vocab).float() * 10


ENDLESS = {USER: THINK, THINK: 6, 6: 7, 7: 6, BLANK: 10, 10: 11, 11: 12, 12: EOS,
           MESSAGE[0]: MESSAGE[1], MESSAGE[1]: END_THINK, END_THINK: BLANK}  # thinks forever unless cut
SELF_CLOSING = {**ENDLESS, 7: END_THINK}  # "hmm so </think>" then answers


def engine_for(script, **overrides) -> Engine:
    config = tiny_config(vocab_size=32)
    settings = dict(max_seq_len=128, kv_budget_bytes=1 << 22, max_batch=4, prefill_chunk=16, stop_token_ids=(EOS,),
                    block_size=4)
    settings.update(overrides)
    return Engine(ScriptedModel(script), config, EngineConfig(**settings), tokenizer=ScriptTokenizer(),
                  thinking=THINKING)


def run(engine, request):
    handle = engine.submit(request)
    while not handle.done:
        engine.step()
    return handle, handle.result()


def ask(budget, prompt=(BOS, USER), max_new_tokens=40, stop=()):
    return GenerationRequest(list(prompt), SamplingParams(max_new_tokens=max_new_tokens, thinking_budget=budget,
                                                          stop=stop))


def test_budget_reached_mid_thought_inserts_the_message_then_the_model_answers():
    handle, result = run(engine_for(ENDLESS), ask(budget=5))
    # <think> then 5 thinking tokens, then the message, </think>, blank line, then the answer
    assert result.token_ids == [THINK, 6, 7, 6, 7, 6, *MESSAGE, END_THINK, BLANK, *ANSWER, EOS]
    assert result.reasoning_text == "hmm so hmm so hmm \nTime is up. Answering.\n"
    assert result.text == "The answer is 42."
    assert result.reasoning_tokens == 1 + 5 + 2 + 1  # <think>, thoughts, message, </think>
    assert result.finish_reason == "stop" and not result.reasoning_truncated
    events = list(handle)
    assert "".join(e.text for e in events if e.reasoning) == result.reasoning_text
    assert "".join(e.text for e in events if not e.reasoning) == result.text


def test_a_block_the_model_closes_itself_gets_nothing_inserted():
    _, result = run(engine_for(SELF_CLOSING), ask(budget=5))
    assert result.token_ids == [THINK, 6, 7, END_THINK, BLANK, *ANSWER, EOS]
    assert result.reasoning_text == "hmm so " and result.text == "The answer is 42."


def test_budget_zero_places_the_empty_block_first():
    _, result = run(engine_for(ENDLESS), ask(budget=0))
    assert result.token_ids == [THINK, BLANK, END_THINK, BLANK, *ANSWER, EOS]
    assert result.reasoning_text.strip() == "" and result.text == "The answer is 42."
    assert result.reasoning_tokens == 3 and result.completion_tokens == 3 + 1 + len(ANSWER) + 1


def test_a_block_opened_by_the_prompt_counts_toward_the_budget():
    """A thinking-only template pre-fills "<think>" + a blank line: those count from the <think>."""
    script = {**ENDLESS, USER: THINK}
    _, result = run(engine_for(script), ask(budget=3, prompt=(BOS, USER, THINK, BLANK)))
    # the prompt's blank line and two sampled tokens reach the budget of 3: the block is closed there
    assert result.token_ids == [10, 11, *MESSAGE, END_THINK, BLANK, *ANSWER, EOS]
    assert result.reasoning_text == "The answer \nTime is up. Answering.\n" and result.text == "The answer is 42."
    assert result.reasoning_tokens == 2 + 2 + 1


def test_a_think_token_inside_the_block_does_not_restart_the_budget():
    script = {**ENDLESS, THINK: THINK}  # <think> <think> <think> ... for ever
    _, result = run(engine_for(script), ask(budget=3))
    assert result.token_ids == [THINK, THINK, THINK, THINK, *MESSAGE, END_THINK, BLANK, *ANSWER, EOS]
    assert result.text == "The answer is 42."
    _, result = run(engine_for(script), ask(budget=2, prompt=(BOS, USER, THINK, THINK)))  # the prompt's too
    assert result.token_ids == [THINK, *MESSAGE, END_THINK, BLANK, *ANSWER, EOS]


def test_no_budget_and_too_few_tokens_says_the_reasoning_was_truncated():
    _, result = run(engine_for(ENDLESS), ask(budget=None, max_new_tokens=12))
    assert result.finish_reason == "length" and result.reasoning_truncated
    assert result.text == "" and result.reasoning_tokens == 12


def test_the_inserted_tokens_count_toward_max_new_tokens():
    _, result = run(engine_for(ENDLESS), ask(budget=5, max_new_tokens=8))
    assert result.token_ids == [THINK, 6, 7, 6, 7, 6, *MESSAGE] and result.finish_reason == "length"


def test_stop_strings_apply_to_the_answer_not_the_reasoning():
    _, result = run(engine_for(ENDLESS), ask(budget=5, stop=("hmm", "answer")))
    assert result.finish_reason == "stop" and result.text == "The "
    assert result.reasoning_text.startswith("hmm so")


def test_cancel_while_thinking():
    engine = engine_for(ENDLESS)
    handle = engine.submit(ask(budget=None, max_new_tokens=100))
    for _ in range(5):
        engine.step()
    handle.cancel()
    engine.step()
    result = handle.result(timeout=30)
    assert result.finish_reason == "cancelled" and not result.reasoning_truncated and result.text == ""
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


def test_preemption_and_chunked_prefill_change_nothing():
    """Four budgeted requests with long prompts, chunks of 3 tokens and a budget of a few blocks
    (preemption): each answer equals the request run alone."""
    alone = run(engine_for(ENDLESS), ask(budget=5, prompt=[BOS] + [USER] * 20))[1]
    probe = engine_for(ENDLESS)
    tight = engine_for(ENDLESS, prefill_chunk=3,
                       kv_budget_bytes=40 * probe.layout.block_bytes(probe.config, probe.dtype))
    handles = [tight.submit(ask(budget=5, prompt=[BOS] + [USER] * 20)) for _ in range(4)]
    while not all(h.done for h in handles):
        tight.step()
        tight.check_blocks()
    assert tight.stats().preemptions > 0
    for handle in handles:
        result = handle.result()
        assert (result.token_ids, result.text, result.reasoning_text) == (alone.token_ids, alone.text,
                                                                          alone.reasoning_text)


def test_a_model_that_does_not_think_refuses_a_budget():
    config = tiny_config(vocab_size=32)
    engine = Engine(ScriptedModel(ENDLESS), config, EngineConfig(max_seq_len=64, kv_budget_bytes=1 << 22),
                    tokenizer=None)
    with pytest.raises(InvalidRequest, match="does not think"):
        engine.submit(ask(budget=4))


def test_markers_come_from_the_qwen3_tokenizer(qwen3_tokenizer_dir):
    """<think> 151667 and </think> 151668 (DESIGN §7); the inserted text round-trips through the tokenizer."""
    from lm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(qwen3_tokenizer_dir)
    thinking = ThinkingTokens.from_tokenizer(tokenizer)
    assert (thinking.start_id, thinking.end_id) == (151667, 151668)
    assert tokenizer.decode(thinking.closing_ids()).endswith("</think>\n\n")
    assert tokenizer.decode(thinking.no_thinking_ids(block_open=False)) == "<think>\n\n</think>\n\n"


def test_greedy_decoding_on_a_thinking_model_warns_once_per_request(caplog):
    engine = engine_for(ENDLESS)
    with caplog.at_level("WARNING", logger="lm.engine.engine"):
        run(engine, ask(budget=5))  # greedy
        run(engine, GenerationRequest([BOS, USER], SamplingParams(max_new_tokens=12, temperature=0.6, seed=1)))
        run(engine, ask(budget=0))  # no thinking at all: nothing to warn about
    warnings = [r for r in caplog.records if "decodes greedily on a thinking model" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("generation_config,expected", [
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}, {"temperature": 0.6, "top_p": 0.95,
                                                                          "top_k": 20}),
    ({"do_sample": False, "temperature": 0.6}, {}),  # transformers decodes greedily without do_sample
    ({"temperature": 0.6}, {}),
    ({"do_sample": True, "top_k": 20}, {"top_k": 20}),
])
def test_checkpoint_sampling_defaults_are_read_as_transformers_reads_them(generation_config, expected):
    from lm.sampling import checkpoint_sampling_defaults

    assert checkpoint_sampling_defaults(generation_config) == expected


def test_unset_sampling_fields_take_the_checkpoints_defaults_and_set_ones_win():
    from proto.tessera.lm.v1 import lm_pb2
    from service.wire import sampling_from_proto

    defaults = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    unset = sampling_from_proto(lm_pb2.SamplingParams(), defaults)
    assert (unset.temperature, unset.top_p, unset.top_k) == pytest.approx((0.6, 0.95, 20))
    greedy = sampling_from_proto(lm_pb2.SamplingParams(temperature=0.0, top_k=0), defaults)
    assert greedy.greedy and greedy.top_k == 0 and greedy.top_p == pytest.approx(0.95)
    assert sampling_from_proto(lm_pb2.SamplingParams()).greedy  # no defaults: greedy, as before


class ByteScriptTokenizer(ScriptTokenizer):
    """Tokens 13 and 14 are the two bytes of "é": 13 alone is an incomplete character."""

    def decode(self, ids, skip_special_tokens=False):
        data = b"".join({13: b"\xc3", 14: b"\xa9"}.get(i) or super(ByteScriptTokenizer, self).decode(
            [i], skip_special_tokens).encode() for i in ids)
        return data.decode("utf-8", errors="replace")


def test_the_budget_never_cuts_inside_a_multibyte_character():
    """The budget is reached on the first byte of "é": the block is closed after the second."""
    script = {**ENDLESS, THINK: 6, 6: 13, 13: 14, 14: 6}
    engine = Engine(ScriptedModel(script), tiny_config(vocab_size=32),
                    EngineConfig(max_seq_len=128, kv_budget_bytes=1 << 22, stop_token_ids=(EOS,), block_size=4),
                    tokenizer=ByteScriptTokenizer(), thinking=THINKING)
    _, result = run(engine, ask(budget=2))
    assert result.token_ids == [THINK, 6, 13, 14, *MESSAGE, END_THINK, BLANK, *ANSWER, EOS]
    assert result.reasoning_text.startswith("hmm é") and "\ufffd" not in result.reasoning_text


def test_budget_zero_needs_room_for_an_answer():
    engine = engine_for(ENDLESS)
    with pytest.raises(InvalidRequest, match="no room for an answer"):
        engine.submit(ask(budget=0, max_new_tokens=4))
    _, result = run(engine, ask(budget=0, max_new_tokens=5))
    assert result.token_ids == [THINK, BLANK, END_THINK, BLANK, ANSWER[0]] and result.finish_reason == "length"


def test_a_newline_stop_string_does_not_match_the_blank_line_after_the_block():
    _, result = run(engine_for(ENDLESS), ask(budget=5, stop=("\n",)))
    assert result.text == "The answer is 42." and result.token_ids[-1] == EOS


def test_budget_zero_adds_nothing_after_a_block_the_prompt_closed():
    _, result = run(engine_for(ENDLESS), ask(budget=0, prompt=(BOS, USER, THINK, BLANK, END_THINK, BLANK)))
    assert result.token_ids == [*ANSWER, EOS] and result.reasoning_tokens == 0


def test_a_prompt_already_over_the_budget_is_closed_before_the_first_token():
    _, result = run(engine_for(ENDLESS), ask(budget=1, prompt=(BOS, USER, THINK, 6, 7, 6)))
    assert result.token_ids[:len(THINKING.closing_ids())] == THINKING.closing_ids()


def test_the_inserted_tokens_respect_max_seq_len():
    with pytest.raises(InvalidRequest, match="no room for an answer"):
        engine_for(ENDLESS, max_seq_len=16).submit(ask(budget=0, prompt=[BOS] + [USER] * 14))
    _, result = run(engine_for(ENDLESS, max_seq_len=12), ask(budget=5))
    assert result.finish_reason == "length" and result.prompt_tokens + result.completion_tokens <= 12
    assert result.token_ids == [THINK, 6, 7, 6, 7, 6, *MESSAGE, END_THINK][:12 - 2 - 1]


def test_a_real_replacement_character_does_not_hold_the_budget_off():
    class Replacing(ScriptTokenizer):
        def decode(self, ids, skip_special_tokens=False):
            return "".join("\ufffd" if i == 13 else super(Replacing, self).decode([i], skip_special_tokens)
                           for i in ids)

    engine = Engine(ScriptedModel({**ENDLESS, THINK: 13, 13: 13}), tiny_config(vocab_size=32),
                    EngineConfig(max_seq_len=128, kv_budget_bytes=1 << 22, stop_token_ids=(EOS,), block_size=4),
                    tokenizer=Replacing(), thinking=THINKING)
    _, result = run(engine, ask(budget=3, max_new_tokens=30))
    assert END_THINK in result.token_ids and result.token_ids.index(END_THINK) <= 1 + 3 + 3 + len(MESSAGE)
    assert not result.reasoning_truncated and result.text == "The answer is 42."


@pytest.mark.parametrize("name", ["documents", "pad_token", "namespace", "range", "messages"])
def test_template_kwargs_cannot_replace_the_renderers_names(name):
    from lm.prompt import check_template_kwargs

    with pytest.raises(ValueError, match=name):
        check_template_kwargs({name: 1})


def test_deeply_nested_template_kwargs_are_a_value_error():
    from lm.prompt import template_kwargs_from_json

    with pytest.raises(ValueError, match="not JSON"):
        template_kwargs_from_json({"x": "[" * 5000 + "]" * 5000})
