"""Prompt layout as pure functions: chat messages or plain text with images -> token ids, with the
positions of the image placeholders.

Follows the reference `Gemma3Processor` with Gemma 3's chat template:
- chat turns are `<start_of_turn>{user|model}\n{content}<end_of_turn>\n`, text parts trimmed, a system
  prompt folded into the first user turn as "{system}\n\n", and `<start_of_turn>model\n` appended
  for generation;
- each image is marked by `<start_of_image>` in the text (the template writes one per image part);
  the marker becomes, per tile, "\n\n<start_of_image>" + 256 placeholders + "<end_of_image>\n\n", and
  an image with Pan & Scan crops becomes "Here is the original image {tile} and here are some crops
  to help you see better {crop tiles joined by spaces}".
Text pieces are tokenized as the reference tokenizes them: special tokens split the text, so the
pieces between placeholder runs are encoded one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from lm.tokenizer import END_OF_IMAGE, END_OF_TURN, START_OF_IMAGE, START_OF_TURN, Tokenizer
from vision.pan_and_scan import PanAndScanConfig, num_tiles

TOKENS_PER_TILE = 256  # soft tokens per image tile (mm_tokens_per_image)
IMAGE_MARKER = START_OF_IMAGE  # where an image goes in a text prompt (as in the reference processor)
_ORIGINAL_INTRO = "Here is the original image "
_CROPS_INTRO = " and here are some crops to help you see better "
_ROLES = {"user": "user", "assistant": "model", "model": "model"}


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]  # the full prompt, placeholders included
    image_mask: list[bool]  # True at image placeholder positions
    tiles_per_image: tuple[int, ...]  # tiles (original + crops) of each image, in prompt order
    tokens_per_tile: int = TOKENS_PER_TILE
    placeholder_positions: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        positions = [i for i, is_image in enumerate(self.image_mask) if is_image]
        expected = sum(self.tiles_per_image) * self.tokens_per_tile
        if len(self.image_mask) != len(self.token_ids) or len(positions) != expected:
            raise ValueError(f"prompt layout: {len(positions)} placeholders for {expected} soft tokens")
        object.__setattr__(self, "placeholder_positions", positions)

    @property
    def num_tiles(self) -> int:
        return sum(self.tiles_per_image)


@dataclass(frozen=True)
class _Placeholders:
    count: int


def image_token_cost(width: int, height: int, pan_and_scan: PanAndScanConfig,
                     tokens_per_tile: int = TOKENS_PER_TILE) -> int:
    """Soft tokens an image of `width` x `height` will take in the prompt, from the crop geometry
    alone (before decoding or encoding anything). The wording around them ("\\n\\n", image markers,
    the Pan & Scan sentence) adds a few text tokens on top."""
    return num_tiles(width, height, pan_and_scan) * tokens_per_tile


def render_chat(messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
    """The text Gemma 3's chat template makes of `messages`, without the leading <bos> (`layout_chat`
    adds it as a token). Image parts become IMAGE_MARKER."""
    if not messages:
        raise ValueError("chat: no messages")
    first_user_prefix = ""
    if messages[0].get("role") == "system":
        first_user_prefix = _system_text(messages[0].get("content")) + "\n\n"
        messages = messages[1:]
    pieces = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if (role == "user") != (index % 2 == 0):
            raise ValueError(f"chat: message {index} has role {role!r}; roles must alternate user/assistant "
                             "starting with user (after an optional first system message)")
        if role not in _ROLES:
            raise ValueError(f"chat: message {index} has role {role!r}; allowed: system (first), user, assistant")
        pieces.append(f"{START_OF_TURN}{_ROLES[role]}\n" + (first_user_prefix if index == 0 else ""))
        pieces.append(_content_text(message.get("content"), index))
        pieces.append(f"{END_OF_TURN}\n")
    if add_generation_prompt:
        pieces.append(f"{START_OF_TURN}model\n")
    return "".join(pieces)


def count_images(messages: Sequence[Mapping[str, Any]]) -> int:
    """Image parts in the messages, i.e. how many entries `layout_chat` expects in `image_tiles`."""
    return sum(
        1
        for message in messages
        if isinstance(message.get("content"), (list, tuple))
        for part in message["content"]
        if part.get("type") == "image"
    )


def layout_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], image_tiles: Sequence[int] = (), *,
                add_generation_prompt: bool = True, tokens_per_tile: int = TOKENS_PER_TILE) -> Prompt:
    """Token ids of a chat, with `image_tiles[i]` tiles (1 + crops) for the i-th image part."""
    text = render_chat(messages, add_generation_prompt=add_generation_prompt)
    return layout_text(tokenizer, text, image_tiles, add_bos=True, tokens_per_tile=tokens_per_tile)


def layout_text(tokenizer: Tokenizer, text: str, image_tiles: Sequence[int] = (), *, add_bos: bool = True,
                tokens_per_tile: int = TOKENS_PER_TILE) -> Prompt:
    """Token ids of a plain prompt in which each IMAGE_MARKER stands for one image, the i-th having
    `image_tiles[i]` tiles."""
    chunks = text.split(IMAGE_MARKER)
    if len(chunks) - 1 != len(image_tiles):
        raise ValueError(f"prompt has {len(chunks) - 1} image marker(s) {IMAGE_MARKER!r} for {len(image_tiles)} "
                         f"image(s); put one marker where each image goes")
    segments: list[str | _Placeholders] = [chunks[0]]
    for tiles, chunk in zip(image_tiles, chunks[1:]):
        segments.extend(image_segments(tiles, tokens_per_tile))
        segments.append(chunk)

    ids: list[int] = [tokenizer.special.bos_id] if add_bos else []
    mask: list[bool] = [False] * len(ids)
    placeholder = tokenizer.special.image_token_id
    for segment in _merge_text(segments):
        if isinstance(segment, _Placeholders):
            ids.extend([placeholder] * segment.count)
            mask.extend([True] * segment.count)
        elif segment:
            piece = tokenizer.encode(segment, add_bos=False)
            ids.extend(piece)
            mask.extend([False] * len(piece))
    return Prompt(ids, mask, tuple(image_tiles), tokens_per_tile)


def image_segments(tiles: int, tokens_per_tile: int = TOKENS_PER_TILE) -> list[str | _Placeholders]:
    """What one image with `tiles` tiles (the original first, then its crops) becomes in the prompt."""
    if not isinstance(tiles, int) or tiles < 1:
        raise ValueError(f"an image has at least one tile (the original), got {tiles!r}")

    def tile() -> list[str | _Placeholders]:
        return [f"\n\n{START_OF_IMAGE}", _Placeholders(tokens_per_tile), f"{END_OF_IMAGE}\n\n"]

    if tiles == 1:
        return tile()
    segments: list[str | _Placeholders] = [_ORIGINAL_INTRO, *tile(), _CROPS_INTRO]
    for crop in range(tiles - 1):
        if crop:
            segments.append(" ")
        segments.extend(tile())
    return segments


def _merge_text(segments: list[str | _Placeholders]) -> list[str | _Placeholders]:
    """Adjacent text pieces joined: the reference tokenizes the text between two placeholder runs as one."""
    merged: list[str | _Placeholders] = []
    for segment in segments:
        if isinstance(segment, str) and merged and isinstance(merged[-1], str):
            merged[-1] += segment
        else:
            merged.append(segment)
    return merged


def _system_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)) and content and content[0].get("type") == "text":
        return content[0]["text"]  # the template takes the first part only, untrimmed
    raise ValueError("chat: a system message's content must be a string or a list starting with a text part")


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, (list, tuple)):
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "image":
                pieces.append(IMAGE_MARKER)
            elif kind == "text":
                pieces.append(part["text"].strip())
            else:
                raise ValueError(f"chat: message {index} has a content part of type {kind!r}; allowed: text, image")
        return "".join(pieces)
    raise ValueError(f"chat: message {index} content must be a string or a list of text/image parts")
