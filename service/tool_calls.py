"""Tool calls in a model's answer, in the Hermes format the Qwen 2.5 and Qwen 3 chat templates teach:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, anywhere in the answer (text around the blocks is the message's content). A block
whose JSON does not parse, or lacks a string "name", is left in the content as the model wrote it (as
vLLM's hermes parser does), so nothing the model said is lost. `ToolCallStream` does the same on a
stream: text that may still become a block is held back until it is known.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

START, END = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str

    def to_openai(self, index: int | None = None) -> dict:
        """The call as OpenAI writes it in `message.tool_calls` (with `index`: in a stream delta)."""
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call_from_json(text: str) -> ToolCall | None:
    """The call a block's JSON describes ({"name": str, "arguments": object or JSON text}), None if it
    describes none."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    arguments = arguments_text(data.get("arguments", data.get("parameters", {})))
    return None if arguments is None else ToolCall(data["name"], arguments, new_call_id())


def arguments_text(arguments) -> str | None:
    """A call's `arguments` as OpenAI sends them, JSON text: a parsed value dumped, text kept if it is
    JSON; None for text that is not."""
    if not isinstance(arguments, str):
        return json.dumps(arguments, ensure_ascii=False)
    try:
        json.loads(arguments)
    except (ValueError, RecursionError):
        return None
    return arguments


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(the content without its tool-call blocks, stripped; the calls in order)."""
    stream = ToolCallStream()
    content, calls = stream.push(text)
    return (content + stream.flush()).strip(), calls


class ToolCallStream:
    """Splits streamed answer text into content and tool calls. `push(delta)` returns (content to send
    now, calls completed now); `flush()` the content left at the end (an unfinished block, as written)."""

    def __init__(self) -> None:
        self._pending = ""  # text not yet released: a possible start of a block, or a block's inside
        self._in_block = False

    def push(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._pending += delta
        content, calls = [], []
        while True:
            if self._in_block:
                end = self._pending.find(END)
                if end < 0:
                    break
                body = self._pending[:end]
                call = call_from_json(body.strip())
                if call is None:
                    content.append(START + body + END)
                else:
                    calls.append(call)
                self._pending = self._pending[end + len(END):]
                self._in_block = False
                continue
            start = self._pending.find(START)
            if start >= 0:
                content.append(self._pending[:start])
                self._pending = self._pending[start + len(START):]
                self._in_block = True
                continue
            keep = _partial_suffix(self._pending, START)
            content.append(self._pending[:len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep:]
            break
        return "".join(content), calls

    def flush(self) -> str:
        rest = (START if self._in_block else "") + self._pending
        self._pending, self._in_block = "", False
        return rest


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (held back: it may become one)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
