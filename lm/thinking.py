"""Hybrid thinking: the `<think> … </think>` block of reasoning models (Qwen 3) and the thinking budget.

A model thinks inside `<think> … </think>` before it answers; its chat template may already open the
block at the end of the prompt (thinking-only variants pre-fill `<think>\\n`) or pre-fill an empty one
(`enable_thinking=False`). The thinking budget of the Qwen 3 technical report (§4.3): once the thinking
reaches the budget, in tokens counted from the `<think>` that opened the block, the server ends it by appending a short
end-of-thinking message, `</think>` and a blank line, and the model goes on to answer. Budget 0 means no
thinking: the empty block (`<think>\\n\\n</think>\\n\\n`, what the template writes for
`enable_thinking=False`) is placed before the model's first token, unless the prompt already closed a
block (then nothing is added).

A model whose vocabulary has no `<think>` / `</think>` tokens (Gemma 3) has no thinking: a budget is
refused (lm.engine.Engine.submit raises InvalidRequest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

# Appended when the budget is reached (in the spirit of the Qwen 3 report's message: the time for
# thinking is over and the answer follows from the thinking so far).
DEFAULT_END_MESSAGE = "I have thought about this long enough; I will now answer from what I have so far."
START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ThinkingTokens:
    """Token ids of a thinking model's markers and of the text the budget inserts."""

    start_id: int  # <think>
    end_id: int  # </think>
    end_message_ids: tuple[int, ...]  # "\n" + the end-of-thinking message + "\n", before </think>
    blank_line_ids: tuple[int, ...]  # "\n\n", after </think> (and inside an empty block)

    @classmethod
    def from_tokenizer(cls, tokenizer, message: str = DEFAULT_END_MESSAGE) -> "ThinkingTokens | None":
        """The markers of `tokenizer` (lm.tokenizer.Tokenizer), None if it has no `<think>` and `</think>`."""
        token_to_id = getattr(tokenizer, "token_to_id", None)  # a bare detokenizer (tests) has no vocabulary
        if token_to_id is None:
            return None
        start, end = token_to_id(START), token_to_id(END)
        if start is None or end is None:
            return None
        encode = lambda text: tuple(tokenizer.encode(text, add_bos=False, special_tokens=False))  # noqa: E731
        return cls(start, end, encode(f"\n{message}\n"), encode("\n\n"))

    def closing_ids(self) -> list[int]:
        """What the budget appends to an open block: message, </think>, blank line."""
        return [*self.end_message_ids, self.end_id, *self.blank_line_ids]

    def no_thinking_ids(self, block_open: bool) -> list[int]:
        """What budget 0 places before the model's first token: the empty block, or its end if the prompt
        already opened one."""
        if block_open:
            return [*self.blank_line_ids, self.end_id, *self.blank_line_ids]
        return [self.start_id, *self.blank_line_ids, self.end_id, *self.blank_line_ids]

    def closed_block_last(self, token_ids: Sequence[int]) -> bool:
        """Whether the last marker in `token_ids` is `</think>` (a block the prompt already closed, as
        `enable_thinking=False` templates write)."""
        for token in reversed(token_ids):
            if token in (self.start_id, self.end_id):
                return token == self.end_id
        return False

    def open_block_start(self, token_ids: Sequence[int]) -> int | None:
        """Index of the `<think>` that opened the block still open at the end of `token_ids` (the first
        one after the last `</think>`: another `<think>` inside the block does not restart it), or None."""
        start = None
        for index in range(len(token_ids) - 1, -1, -1):
            if token_ids[index] == self.end_id:
                break
            if token_ids[index] == self.start_id:
                start = index
        return start
