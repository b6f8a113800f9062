"""The checkpoint's own tokenizer (tokenizer.json through `tokenizers`), its special ids, and an
incremental detokeniser for streaming.

Encoding releases the GIL (the `tokenizers` batch entry point does; its single-text one does not), so a
long text tokenized on a worker thread never stalls an event loop or the engine thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# Placeholder id of image soft tokens when the checkpoint states none (the text-only 270M): one past
# the 262,144-entry Gemma 3 vocabulary, as in the vision-language releases. It is never looked up in
# the embedding table; the model overwrites those rows with soft tokens.
DEFAULT_IMAGE_TOKEN_ID = 262_144
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
START_OF_IMAGE = "<start_of_image>"
END_OF_IMAGE = "<end_of_image>"
_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class SpecialTokens:
    """Special ids, all read from the checkpoint (tokenizer_config.json, config.json,
    generation_config.json); the Gemma 3 prompt tokens are None in a tokenizer without them."""

    bos_id: int | None  # first token of every prompt where the checkpoint adds one (Gemma: <bos>; Qwen: none)
    eos_id: int  # tokenizer_config.json's eos_token
    pad_id: int | None
    start_of_turn_id: int | None  # Gemma 3's <start_of_turn> (105)
    end_of_turn_id: int | None  # Gemma 3's <end_of_turn> (106)
    start_of_image_id: int | None  # Gemma 3's <start_of_image> (255999), opens each image tile
    end_of_image_id: int | None  # Gemma 3's <end_of_image> (256000), closes it
    image_token_id: int | None  # placeholder of one soft token (may lie outside the vocabulary); None: no images
    stop_ids: tuple[int, ...]  # generation ends on any of these: every eos id the checkpoint states


class Tokenizer:
    def __init__(self, backend, special: SpecialTokens, *, add_bos: bool = True, chat_template=None) -> None:
        self.backend = backend  # tokenizers.Tokenizer
        self.special = special
        self.add_bos = add_bos  # the checkpoint's default for encode()
        self.chat_template = chat_template  # lm.chat_template.ChatTemplate, or None: raw prompts only
        # The same tokenizer with special-token strings read as plain text. A second backend, never
        # mutated after this, rather than flipping `encode_special_tokens` on the shared one: encodes run
        # concurrently on worker threads with the GIL released.
        self._plain_text_backend = _plain_text_backend(backend)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """From a checkpoint directory holding tokenizer.json (+ tokenizer_config.json, config.json,
        generation_config.json where present)."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json; a checkpoint directory must hold one")
        backend = Backend.from_file(str(path / "tokenizer.json"))
        tokenizer_config = _read_json(path / "tokenizer_config.json")
        config = _read_json(path / "config.json")
        generation = _read_json(path / "generation_config.json")

        def token_id(field: str, required: bool) -> int | None:
            token = _token_text(tokenizer_config.get(field))
            found = None if token is None else backend.token_to_id(token)
            if found is None and required:
                raise ValueError(f"{path}: tokenizer_config.json's {field} {token!r} is not a token of tokenizer.json")
            return found

        add_bos = bool(tokenizer_config.get("add_bos_token", False))
        bos_id = token_id("bos_token", required=add_bos)
        eos_id = token_id("eos_token", required=True)
        stop = {eos_id}
        for source in (config, config.get("text_config") or {}, generation):
            stop.update(_ids(source.get("eos_token_id")))
        start_of_image_id = backend.token_to_id(START_OF_IMAGE)
        image_token_id = config.get("image_token_index", config.get("image_token_id"))
        if image_token_id is None and start_of_image_id is not None:  # a Gemma 3 vocabulary without a vision tower
            image_token_id = backend.token_to_id("<image_soft_token>") or DEFAULT_IMAGE_TOKEN_ID
        special = SpecialTokens(
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=token_id("pad_token", required=False),
            start_of_turn_id=backend.token_to_id(START_OF_TURN),
            end_of_turn_id=backend.token_to_id(END_OF_TURN),
            start_of_image_id=start_of_image_id,
            end_of_image_id=backend.token_to_id(END_OF_IMAGE),
            image_token_id=None if image_token_id is None else int(image_token_id),
            stop_ids=tuple(sorted(stop)),
        )
        from lm.chat_template import ChatTemplate, load_chat_templates

        chat_template = None
        if load_chat_templates(path):
            marker = START_OF_IMAGE if image_token_id is not None and start_of_image_id is not None else None
            chat_template = ChatTemplate.from_dir(path, backend, image_marker=marker)
        return cls(backend, special, add_bos=add_bos, chat_template=chat_template)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None, special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With `special_tokens` (the default) special tokens written in the text
        (e.g. "<start_of_turn>") become their ids; without, they are encoded as the plain text they are
        spelled with, as transformers' `split_special_tokens=True` does (for text a user wrote, which must
        not forge control tokens). Added tokens the checkpoint does not mark special (Gemma's
        "<start_of_image>", "\\n\\n") match in both modes, as in the reference. `add_bos` defaults to the
        checkpoint's choice (Gemma: yes)."""
        backend = self.backend if special_tokens else self._plain_text_backend
        ids = _encode_without_gil(backend, text)
        if (self.add_bos if add_bos is None else add_bos) and self.special.bos_id is not None:
            ids.insert(0, self.special.bos_id)
        return ids

    def control_id(self, token: str) -> int:
        """The id of a control token (e.g. "<start_of_turn>") a prompt template writes; ValueError when
        this tokenizer has no such token."""
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {token!r} token; the prompt template needs it")
        return token_id

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def incremental_decoder(self, *, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Turns a stream of generated token ids into text deltas.

    Byte-fallback tokens can split one UTF-8 character over several tokens; text ending in U+FFFD
    (an incomplete character) is held back until the character completes. Only a short window of
    recent tokens is decoded each step, so a step costs O(1) in the sequence length."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = 0  # tokens before this have been emitted as text

    def push(self, token_ids: int | Iterable[int]) -> str:
        """Add generated token(s); returns the new text they complete (possibly "")."""
        self._ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full_text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text):]

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""


def _encode_without_gil(backend, text: str) -> list[int]:
    # `encode_batch(_fast)` releases the GIL while it works (`encode` holds it: an 8 MiB text stalls
    # every other thread for seconds); `_fast` skips the offsets nobody here reads (tokenizers >= 0.20).
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return encode_batch([text], add_special_tokens=False)[0].ids


def _plain_text_backend(backend):
    """A tokenizer equal to `backend` except that special tokens in the input are not matched
    (`encode_special_tokens`). It shares `backend`'s model (the vocabulary and merges: no copy, a few
    milliseconds); when re-adding the added tokens would not give them their ids back (a vocabulary whose
    added tokens are not in the model and not contiguous after it), it is a full copy instead."""
    from tokenizers import Tokenizer as Backend

    added = backend.get_added_tokens_decoder()  # id -> AddedToken, with its special flag
    plain = Backend(backend.model)
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if getattr(backend, part) is not None:
            setattr(plain, part, getattr(backend, part))
    plain.add_tokens([added[token_id] for token_id in sorted(added)])
    if any(plain.token_to_id(token.content) != token_id for token_id, token in added.items()):
        plain = Backend.from_str(backend.to_str())
    plain.encode_special_tokens = True
    return plain


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
