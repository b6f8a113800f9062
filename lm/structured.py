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
forever. llguidance builds the token trie from the tokenizer.json once per model (about a second for a
150k vocabulary), on first use.
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


class GrammarMatcher:
    """One request's grammar state (engine thread only): which tokens may come next, and the tokens taken."""

    def __init__(self, matcher, vocab_size: int):
        self._matcher = matcher  # llguidance.LLMatcher
        self.vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        """(vocab_size,) bool: the tokens the grammar accepts next (stop tokens where it is complete)."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool)
        return torch.from_numpy(mask)

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token. RuntimeError if the grammar refuses it (it was masked: a bug)."""
        if not self._matcher.consume_token(token_id):
            raise RuntimeError(f"the grammar refused token {token_id}: {self._matcher.get_error()}")

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
                self._tokenizer = llguidance.LLTokenizer(self._backend.to_str(), n_vocab=self.vocab_size,
                                                         eos_token=list(self.stop_token_ids))
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
            raise ValueError(f"the {constraint.kind} constraint cannot be used: {matcher.get_error()}")
        return GrammarMatcher(matcher, self.vocab_size)


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


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError(f"{what} is not valid JSON: {text[:60]!r}") from None
