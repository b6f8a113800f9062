"""Structured output: decoding constrained to a grammar, through llguidance.

A request's constraint (a JSON Schema, "any JSON object", a regular expression or a Lark grammar) is
compiled once per request into an llguidance grammar and checked against the model's vocabulary before
the request is queued (`GrammarCompiler.matcher`, ValueError naming what is wrong). At every step the
engine asks the request's `GrammarMatcher` which tokens may come next (a bitmask over the vocabulary,
`allowed`), masks the others out of the logits before sampling (greedy included), then feeds it the
sampled token (`accept`). Stop tokens (end of turn, eos) are allowed exactly where the grammar is
complete, so the answer always parses.

JSON is generated in one fixed layout: no optional whitespace, ", " between items and ": " after keys
(Python's `json.dumps` style, what models most often write); free whitespace would let a weak model pad
forever. llguidance builds the token trie from the tokenizer.json once per model (one to five seconds for
a 150k-260k vocabulary), on first use.

Control tokens never stand for text: llguidance gets a copy of the tokenizer in which every added token
that is special (or not part of the model's own vocabulary, as Qwen's <think> and <tool_call>) is renamed
to a string no text contains and marked special, so text a grammar forces ("<|im_end|>" in a JSON
string) is spelled with ordinary tokens, and the stop tokens are allowed only where the grammar is
complete. A grammar that allows no first token, or that the parser gives up on while generating (a
schema that recurses without end), is a GrammarError (a ValueError: the request's own fault).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# llguidance's JsonCompileOptions: the fixed layout described above.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_GRAMMAR_BYTES = 256 << 10  # a schema, regex or grammar's UTF-8 size


@dataclass(frozen=True)
class StructuredOutput:
    """What the answer must match: `kind` is "json_schema" (`spec` the schema's JSON text),
    "json_object" (`spec` empty), "regex" or "lark" (`spec` the expression or grammar)."""
    kind: str
    spec: str = ""

    KINDS = ("json_schema", "json_object", "regex", "lark")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"structured output kind {self.kind!r} is not one of {', '.join(self.KINDS)}")
        if len(self.spec.encode()) > MAX_GRAMMAR_BYTES:
            raise ValueError(f"the {self.kind} constraint is {len(self.spec.encode()):,} bytes; at most "
                             f"{MAX_GRAMMAR_BYTES:,}")


class GrammarError(ValueError):
    """The constraint cannot be followed: no output satisfies it, or the parser gave up on it."""


_RENAMED = "\U000F0000"  # a private-use character: no text a grammar forces starts a control token with it


def grammar_tokenizer_json(backend) -> str:
    """`backend` (a tokenizers.Tokenizer) as JSON for llguidance, its control tokens renamed (see the
    module docstring). Falls back to the tokenizer as it is if the renamed copy would not keep every id."""
    from tokenizers import Tokenizer

    original = backend.to_str()
    data = json.loads(original)
    vocab = (data.get("model") or {}).get("vocab")
    renamed = []
    for token in data.get("added_tokens", []):
        content, token_id = token["content"], token["id"]
        in_vocab = (isinstance(vocab, dict) and vocab.get(content) == token_id) or \
            (isinstance(vocab, list) and token_id < len(vocab) and vocab[token_id][0] == content)
        if in_vocab and not token.get("special"):
            continue  # ordinary text the model's vocabulary holds (Gemma's whitespace runs): merges use it
        new = _RENAMED + content
        if in_vocab and isinstance(vocab, dict):
            del vocab[content]
            vocab[new] = token_id
        elif in_vocab:
            vocab[token_id][0] = new
        token["content"], token["special"] = new, True
        renamed.append((new, token_id))
    text = json.dumps(data, ensure_ascii=False)
    try:
        check = Tokenizer.from_str(text)
    except Exception:  # noqa: BLE001 - an unusual tokenizer: llguidance gets it unchanged
        return original
    if any(check.token_to_id(content) != token_id for content, token_id in renamed):
        return original
    return text


class GrammarMatcher:
    """One request's grammar state (engine thread only): which tokens may come next, and the tokens taken."""

    def __init__(self, matcher, vocab_size: int):
        self._matcher = matcher  # llguidance.LLMatcher
        self.vocab_size = vocab_size
        # A chat answer of a thinking model may open its <think> block first (the engine allows that
        # token before the answer begins); a raw completion may not: its text is all answer.
        self.allow_thinking = True

    def allowed(self) -> torch.Tensor:
        """(vocab_size,) bool: the tokens the grammar accepts next (stop tokens where it is complete)."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool)
        return torch.from_numpy(mask)

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token (one `allowed` gave). GrammarError if the parser gives up (e.g. a
        schema that recurses past its limits)."""
        if not self._matcher.consume_token(token_id):
            raise GrammarError(f"the output constraint could not be followed: {_first_line(self._matcher.get_error())}")

    @property
    def finished(self) -> bool:
        """The grammar allows nothing more (not even optional text): the answer is complete."""
        return self._matcher.is_stopped()


class GrammarCompiler:
    """Compiles requests' constraints for one model: its tokenizer (a `tokenizers.Tokenizer`), the width
    of its logits (`vocab_size`, which may exceed the tokenizer's) and its stop tokens. Thread-safe."""

    def __init__(self, backend, vocab_size: int, stop_token_ids: tuple[int, ...]):
        self._backend = backend
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
        self._tokenizer = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self):
        import llguidance

        with self._lock:
            if self._tokenizer is None:
                text = grammar_tokenizer_json(self._backend)
                try:
                    self._tokenizer = llguidance.LLTokenizer(text, n_vocab=self.vocab_size,
                                                             eos_token=list(self.stop_token_ids))
                except TypeError:  # llguidance 1.0 takes one end token: the first stop token
                    self._tokenizer = llguidance.LLTokenizer(text, n_vocab=self.vocab_size,
                                                             eos_token=self.stop_token_ids[0])
            return self._tokenizer

    def matcher(self, constraint: StructuredOutput) -> GrammarMatcher:
        """A fresh matcher for `constraint`. Raises ValueError naming the constraint and what is wrong
        (not JSON, an unsupported schema keyword, a bad regex or grammar)."""
        import llguidance

        grammar = _grammar(constraint)
        tokenizer = self._ll_tokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise ValueError(f"the {constraint.kind} constraint cannot be used: {'; '.join(messages)}")
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the {constraint.kind} constraint cannot be used: {_first_line(matcher.get_error())}")
        result = GrammarMatcher(matcher, self.vocab_size)
        first = result.allowed()
        first[list(self.stop_token_ids)] = False
        if matcher.is_stopped() or not bool(first.any()):  # nothing, or only an end, may come first
            raise GrammarError(f"the {constraint.kind} constraint allows no output (e.g. a schema that only "
                               "refers to itself)")
        return result


def _grammar(constraint: StructuredOutput) -> str:
    import llguidance

    if constraint.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_LAYOUT)
    if constraint.kind == "json_schema":
        schema = _json(constraint.spec, "json_schema")
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"json_schema must be a JSON object (a schema), got {type(schema).__name__}")
        return llguidance.LLMatcher.grammar_from_json_schema(schema if isinstance(schema, dict) else {},
                                                             overrides=JSON_LAYOUT)
    if constraint.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(constraint.spec)
    return llguidance.LLMatcher.grammar_from_lark(constraint.spec)


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError(f"{what} is not valid JSON: {text[:60]!r}") from None
