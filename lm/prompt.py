"""Prompt layout as pure functions: a request (chat messages, one user turn or plain text, with images)
-> token ids with the positions of the image placeholders; and the cheap limits checked before it.

- Chat messages are rendered by the checkpoint's own chat template (lm.chat_template, as transformers'
  `apply_chat_template`), for every model family.
- Images (Gemma 3 vision-language checkpoints) are expanded after rendering, as the reference
  `Gemma3Processor` does: per tile "\n\n<start_of_image>" + 256 placeholders + "<end_of_image>\n\n",
  and an image with Pan & Scan crops becomes "Here is the original image {tile} and here are some crops
  to help you see better {crop tiles joined by spaces}".

Rules every entry point shares through `layout_request` (`tessera generate`, the LM service, and the
gateway through the LM service):
- Text a user writes in a chat (message contents, the system prompt, a one-turn prompt) is plain text:
  a control-token string in it ("<end_of_turn>", "<|im_start|>") is encoded as the characters it is
  spelled with, as transformers' `apply_chat_template(sanitize_control_tokens=True)` encodes it, so no
  user can forge a turn; the template's own control tokens are ids. `allow_special_tokens` (a server
  setting) lets chat text write them. In a chat, images go where the image parts are, and nowhere else.
- A raw prompt is the whole prompt, control tokens included, read as `Gemma3Processor(text=...)` reads
  it: its images go at its "<start_of_image>" markers, or, when it has none, before it (one marker per
  image, joined by spaces, as the processor writes them for images without text).
- A request with no text, no image and no messages is refused.
The text between two control tokens or placeholder runs is encoded in one piece: the reference
tokenizer, too, splits its input at added tokens and encodes the pieces one by one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from lm.tokenizer import END_OF_IMAGE, START_OF_IMAGE, Tokenizer
from vision.pan_and_scan import MAX_CROPS_CAP, PanAndScanConfig, num_tiles

TOKENS_PER_TILE = 256  # soft tokens per image tile (mm_tokens_per_image)
IMAGE_MARKER = START_OF_IMAGE  # where an image goes in a raw prompt (as in the reference processor)
MAX_TILES_PER_IMAGE = 1 + MAX_CROPS_CAP  # the original and at most MAX_CROPS_CAP Pan & Scan crops
CHAT_ROLES = ("system", "user", "assistant", "tool")  # what the chat templates of the supported families render
_ORIGINAL_INTRO = "Here is the original image "
_CROPS_INTRO = " and here are some crops to help you see better "


class EmptyPrompt(ValueError):
    """A request with nothing to answer: no text, no image, no messages."""


class RequestTooLarge(ValueError):
    """A request over a limit that is checked before anything is tokenized, decoded or encoded; the
    message names the limit."""


@dataclass(frozen=True)
class PromptLimits:
    max_text_bytes: int = 1 << 20  # UTF-8 bytes of a request's text (prompt, message texts, stop strings): 1 MiB
    max_images: int = 8  # images in one request
    max_tiles: int = 32  # image tiles (originals + Pan & Scan crops) in one request
    max_messages: int = 1024  # chat messages in one request (a first system message included)
    max_content_parts: int = 64  # content parts (text or image) in one chat message
    max_stop_strings: int = 16  # stop strings in one request (every generated token is checked against each)
    max_stop_bytes: int = 1024  # UTF-8 bytes of one stop string (streamed text is held back this long)
    allow_special_tokens: bool = False  # chat text may write control tokens ("<end_of_turn>") as such

    def __post_init__(self) -> None:
        for name in ("max_text_bytes", "max_images", "max_tiles", "max_messages", "max_content_parts",
                     "max_stop_strings", "max_stop_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


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


# A prompt before tokenizing: text (str), control tokens, images and placeholder runs.
@dataclass(frozen=True)
class _Control:
    token: str  # a control token the template writes ("<start_of_turn>"), added as its id


@dataclass(frozen=True)
class _Image:
    pass  # where the next image goes


@dataclass(frozen=True)
class _Placeholders:
    count: int


def image_token_cost(width: int, height: int, pan_and_scan: PanAndScanConfig,
                     tokens_per_tile: int = TOKENS_PER_TILE) -> int:
    """Soft tokens an image of `width` x `height` will take in the prompt, from the crop geometry
    alone (before decoding or encoding anything). The wording around them ("\\n\\n", image markers,
    the Pan & Scan sentence) adds a few text tokens on top."""
    return num_tiles(width, height, pan_and_scan) * tokens_per_tile


# ----- the request rules, shared by every entry point ------------------------------------------------

def layout_request(tokenizer: Tokenizer, *, prompt: str = "", raw: bool = False,
                   messages: Sequence[Mapping[str, Any]] | None = None, image_tiles: Sequence[int] = (),
                   tokens_per_tile: int = TOKENS_PER_TILE, allow_special_tokens: bool = False,
                   template_kwargs: Mapping[str, Any] | None = None,
                   tools: Sequence[Mapping[str, Any]] | None = None) -> Prompt:
    """The prompt of one request, `image_tiles[i]` being the tiles (1 + crops) of its i-th image:
    - `messages`: a chat (images at its image parts; `prompt` must then be empty);
    - `raw`: `prompt` as plain text, images at its IMAGE_MARKERs or, when it has none, before it;
    - otherwise: `prompt` as one user turn, the images first.
    `template_kwargs` are chat-template variables (e.g. {"enable_thinking": False}); raw text has no
    template, so they are refused with it; so are `tools` (OpenAI function definitions, given to the
    template). Raises EmptyPrompt (no text, no image, no messages) and ValueError (bad messages, image
    markers that do not match the images, template kwargs or tools with raw)."""
    template_kwargs = check_template_kwargs(template_kwargs or {})
    if messages:
        if prompt:
            raise ValueError("give either prompt or messages, not both")
        return layout_chat(tokenizer, messages, image_tiles, tokens_per_tile=tokens_per_tile,
                           allow_special_tokens=allow_special_tokens, tools=tools, **template_kwargs)
    require_prompt(prompt, raw=raw, num_images=len(image_tiles))
    if raw:
        if template_kwargs or tools:
            given = "tools" if tools else f"chat template kwargs ({', '.join(sorted(template_kwargs))})"
            raise ValueError(f"{given} need a chat prompt; a raw prompt has no template")
        return layout_text(tokenizer, with_image_markers(prompt, len(image_tiles)), image_tiles,
                           tokens_per_tile=tokens_per_tile)
    # A string when there are no images: some templates (Qwen 3's) read only string content.
    content = [{"type": "image"} for _ in image_tiles] + [{"type": "text", "text": prompt}] if image_tiles else prompt
    return layout_chat(tokenizer, [{"role": "user", "content": content}], image_tiles,
                       tokens_per_tile=tokens_per_tile, allow_special_tokens=allow_special_tokens, tools=tools,
                       **template_kwargs)


# Names layout_chat and the template renderer (lm.chat_template) set themselves, and the sandbox's globals
# (Jinja's and transformers'): a client's template kwargs cannot replace them. So are the special-token
# names (any name ending in "_token").
RESERVED_TEMPLATE_NAMES = frozenset({"messages", "add_generation_prompt", "tools", "documents", "allow_control_tokens",
                                     "allow_special_tokens", "image_tiles", "tokens_per_tile", "raise_exception",
                                     "strftime_now", "namespace", "dict", "range", "lipsum", "cycler", "joiner"})


MAX_TEMPLATE_KWARGS = 32  # chat-template variables in one request
MAX_TEMPLATE_KWARGS_BYTES = 64 << 10  # UTF-8 bytes of their names and JSON values together


def template_kwargs_from_json(entries: Mapping[str, str], *, source: str = "chat_template_kwargs") -> dict[str, Any]:
    """Chat-template variables given as name -> JSON text (a request's `chat_template_kwargs`, the CLI's
    --template-kwarg). Raises ValueError naming `source` and the entry: too many or too large (counted
    before anything is parsed), a value that is not JSON (nested too deep included), or a name
    check_template_kwargs refuses."""
    if len(entries) > MAX_TEMPLATE_KWARGS:
        raise ValueError(f"{source} has {len(entries):,} entries; at most {MAX_TEMPLATE_KWARGS}")
    size = sum(len(key.encode()) + len(value.encode()) for key, value in entries.items())
    if size > MAX_TEMPLATE_KWARGS_BYTES:
        raise ValueError(f"{source} hold {size:,} bytes; at most {MAX_TEMPLATE_KWARGS_BYTES:,}")
    kwargs = {}
    for key, text in entries.items():
        try:
            kwargs[key] = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
            raise ValueError(f"{source} {key!r}: {text[:40]!r} is not JSON; give e.g. false, 3 or \"text\"") from None
    return check_template_kwargs(kwargs)


MAX_TOOLS = 128  # function definitions in one request


def tools_from_json(text: str) -> list[dict[str, Any]] | None:
    """A request's tools (OpenAI's JSON array of {"type": "function", "function": {"name", ...}}), None
    for empty text. Raises ValueError naming the entry that is not such a definition."""
    if not text:
        return None
    try:
        tools = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError(f"tools are not valid JSON: {text[:60]!r}") from None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ValueError(f"tools must be a JSON array of at most {MAX_TOOLS} function definitions")
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tools[{index}] is not {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
    return tools


def check_template_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Chat-template variables a client may set (e.g. `enable_thinking`): identifiers, not the names the
    renderer sets itself, values of plain JSON types. Raises ValueError naming the first bad one."""
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_"):
            raise ValueError(f"chat template kwarg {key!r} is not a plain name (letters, digits, underscores)")
        if key in RESERVED_TEMPLATE_NAMES or key.endswith("_token"):
            raise ValueError(f"chat template kwarg {key!r} is set by the server; it cannot be given")
        if not isinstance(value, (str, int, float, bool, type(None), list, dict)):
            raise ValueError(f"chat template kwarg {key!r} has a {type(value).__name__}; values are JSON")
    return dict(kwargs)


def require_prompt(prompt: str, *, raw: bool, num_images: int) -> None:
    """EmptyPrompt unless there is something to answer: text (a chat turn's text is trimmed, so blank
    text is none) or an image. Requests with chat messages do not come here."""
    if not num_images and not (prompt if raw else prompt.strip()):
        raise EmptyPrompt("the prompt is empty: send some text, an image or chat messages")


def with_image_markers(text: str, num_images: int) -> str:
    """A raw prompt with its images placed: as written when `text` holds IMAGE_MARKERs (their count
    is checked by `layout_text`), else one marker per image before the text, joined by spaces (what
    `Gemma3Processor` writes for images given without text)."""
    if num_images and IMAGE_MARKER not in text:
        return " ".join([IMAGE_MARKER] * num_images) + text
    return text


def text_bytes(prompt: str = "", messages: Sequence[Mapping[str, Any]] = ()) -> int:
    """UTF-8 bytes of the text a request carries (its prompt and the texts of its messages): what
    `PromptLimits.max_text_bytes` bounds, with the stop strings (`check_text_bytes` adds those). O(1)
    per ASCII string."""
    total = _utf8_size(prompt)
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, (list, tuple)):
            total += sum(_utf8_size(part.get("text")) for part in content if isinstance(part, Mapping))
        else:
            total += _utf8_size(content)
    return total


def _utf8_size(text: Any) -> int:
    if not isinstance(text, str):
        return 0
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


# A lower bound on the tokens of one chat turn, whatever its content: the template's two control
# tokens (<start_of_turn>, <end_of_turn>) plus two text pieces that are never empty - the role line
# ("user\n", "model\n") and the "\n" after <end_of_turn> - of at least one token each.
MIN_TOKENS_PER_TURN = 4


def check_request_size(*, text_bytes: int, tiles_per_image: Sequence[int], limits: PromptLimits,
                       max_prompt_tokens: int | None = None, tokens_per_tile: int = TOKENS_PER_TILE,
                       messages: int = 0, stop: Sequence[str] = ()) -> None:
    """Refuse a request that is certainly too large before anything is tokenized, decoded or encoded:
    more than `limits.max_messages` chat messages, more than `limits.max_stop_strings` stop strings or
    one over `limits.max_stop_bytes`, more than `limits.max_text_bytes` bytes of text (`text_bytes`,
    the prompt's and the messages' that are known, plus the stop strings), more than `limits.max_images`
    images, an image of fewer than 1 or more than MAX_TILES_PER_IMAGE tiles, more than `limits.max_tiles`
    tiles in all, or images and chat turns that alone fill `max_prompt_tokens` (the longest prompt the
    engine takes; None: not checked), counting `tokens_per_tile` per tile and MIN_TOKENS_PER_TURN per
    turn. `tiles_per_image` come from image headers (`vision.pan_and_scan.num_tiles`) or from
    soft-token shapes; `messages` is their count and `stop` the stop strings. Every count is compared
    before its items are read, so the cost is O(1) in what is over a limit and O(images + stop strings)
    otherwise. Raises RequestTooLarge."""
    if messages > limits.max_messages:
        raise RequestTooLarge(f"the request has {messages:,} chat messages; at most {limits.max_messages:,} are "
                              "allowed per request")
    if len(tiles_per_image) > limits.max_images:
        raise RequestTooLarge(f"the request has {len(tiles_per_image):,} images; at most {limits.max_images} "
                              "are allowed per request")
    check_text_bytes(text_bytes, limits, stop=stop)
    for index, tiles in enumerate(tiles_per_image):
        if not 1 <= tiles <= MAX_TILES_PER_IMAGE:
            raise RequestTooLarge(f"image {index} has {tiles} tiles; an image has 1 to {MAX_TILES_PER_IMAGE} "
                                  f"(the original and at most {MAX_CROPS_CAP} Pan & Scan crops)")
    total = sum(tiles_per_image)
    if total > limits.max_tiles:
        raise RequestTooLarge(f"the images have {total} tiles in all ({', '.join(map(str, tiles_per_image))}); "
                              f"at most {limits.max_tiles} are allowed per request")
    if max_prompt_tokens is None:
        return
    turns = max(messages - 1, 0)  # a first system message folds into the first user turn
    least = 1 + total * tokens_per_tile + turns * MIN_TOKENS_PER_TURN  # <bos>, placeholders, turns
    if least > max_prompt_tokens:
        parts = [f"the images' {total} tiles take {total * tokens_per_tile} ({tokens_per_tile} each)"] if total else []
        if turns:
            parts.append(f"{turns:,} chat turns take at least {turns * MIN_TOKENS_PER_TURN:,} "
                         f"({MIN_TOKENS_PER_TURN} each)")
        raise RequestTooLarge(f"the prompt needs at least {least:,} tokens ({'; '.join(parts)}), more than fit "
                              f"in the prompt limit of {max_prompt_tokens} tokens")


def check_text_bytes(text_bytes: int, limits: PromptLimits, *, stop: Sequence[str] = ()) -> None:
    """Refuse more than `limits.max_stop_strings` stop strings, one longer than `limits.max_stop_bytes`,
    or more than `limits.max_text_bytes` bytes of text in all (`text_bytes`, from `text_bytes()`, plus
    the stop strings). The count is compared before any stop string is read. Raises RequestTooLarge."""
    if len(stop) > limits.max_stop_strings:
        raise RequestTooLarge(f"the request has {len(stop):,} stop strings; at most {limits.max_stop_strings} "
                              "are allowed per request")
    total = text_bytes
    for index, string in enumerate(stop):
        size = _utf8_size(string)
        if size > limits.max_stop_bytes:
            raise RequestTooLarge(f"stop string {index} is {size:,} bytes; a stop string may have at most "
                                  f"{limits.max_stop_bytes:,} bytes")
        total += size
    if total > limits.max_text_bytes:
        with_stop = f" ({total - text_bytes:,} of them in stop strings)" if stop else ""
        raise RequestTooLarge(f"the request's text is {total:,} bytes{with_stop}; the limit is "
                              f"{limits.max_text_bytes:,} bytes")


def check_content_parts(parts_per_message: Sequence[int], limits: PromptLimits) -> None:
    """Refuse a chat message with more than `limits.max_content_parts` content parts, naming the first.
    `parts_per_message` has one count per message (at most `limits.max_messages`, checked before by
    `check_request_size`). Raises RequestTooLarge."""
    for index, parts in enumerate(parts_per_message):
        if parts > limits.max_content_parts:
            raise RequestTooLarge(f"chat message {index} has {parts:,} content parts; at most "
                                  f"{limits.max_content_parts} are allowed per message")


# ----- layout -----------------------------------------------------------------------------------------

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
                add_generation_prompt: bool = True, tokens_per_tile: int = TOKENS_PER_TILE,
                allow_special_tokens: bool = False, tools: Sequence[Mapping[str, Any]] | None = None,
                **template_kwargs: Any) -> Prompt:
    """Token ids of a chat rendered by the checkpoint's own chat template (lm.chat_template), with
    `image_tiles[i]` tiles (1 + crops) for the i-th image part, expanded after rendering as the reference
    processor does. Control tokens written in the messages stay plain text unless `allow_special_tokens`.
    `template_kwargs` are template variables (e.g. `enable_thinking=False`); `tools` OpenAI function
    definitions, the template's `tools` (None: a chat without tools). Raises ValueError (a
    ChatTemplateError) when the model has no chat template, the template refuses the messages, or images
    and image parts disagree."""
    template = tokenizer.chat_template
    if template is None:
        raise ValueError("this model has no chat template (a base model): it cannot take chat messages; "
                         "send a raw prompt")
    check_message_content(messages)
    if not template.image_marker:
        if count_images(messages):
            raise ValueError(f"chat has {count_images(messages)} image part(s), but this model is text-only "
                             "(it takes no images): send text only, or use a vision-language checkpoint")
        messages = [_text_content_as_string(message) for message in messages]
    rendered = template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools or None,
                               allow_control_tokens=allow_special_tokens, **template_kwargs)
    if rendered.num_images != len(image_tiles):
        raise ValueError(f"chat has {rendered.num_images} image part(s) for {len(image_tiles)} image(s)")

    def expand(slot) -> list:
        return _template_pieces(tokenizer, image_segments(image_tiles[slot.index], tokens_per_tile))

    ids = template.encode(rendered, expand_image=expand)
    placeholder = tokenizer.special.image_token_id
    mask = [token == placeholder for token in ids] if image_tiles else [False] * len(ids)
    if sum(mask) != sum(image_tiles) * tokens_per_tile:
        raise ValueError(f"chat text holds image placeholder tokens ({sum(mask)} for {sum(image_tiles)} tiles)")
    return Prompt(ids, mask, tuple(image_tiles), tokens_per_tile)


def check_message_content(messages: Sequence[Mapping[str, Any]]) -> None:
    """ValueError naming the message unless its role is one of CHAT_ROLES (a template drops a role it
    does not know without a word) and its content is a string, None, or a list of
    {"type": "text", "text": str} and {"type": "image"} parts: what a template may be given (a template
    silently drops parts it does not know)."""
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in CHAT_ROLES:
            raise ValueError(f"chat: message {index} has role {role!r}; allowed: {', '.join(CHAT_ROLES)}")
        if "content" not in message:
            raise ValueError(f"chat: message {index} ({role}) has no content; give a string or a list of "
                             "text/image parts (an empty string for none)")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"chat: message {index} content must be a string or a list of text/image parts, "
                             f"got {type(content).__name__}")
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text" and isinstance(part.get("text"), str) or kind == "image":
                continue
            raise ValueError(f"chat: message {index} has a content part of type {kind!r}; allowed: text (with a "
                             "string `text`), image")


def _text_content_as_string(message: Mapping[str, Any]) -> Mapping[str, Any]:
    """A text-only model's template reads `content` as a string (Qwen's concatenates it): a list of text
    parts becomes its texts joined by newlines, as vLLM gives such templates ("string" content format)."""
    content = message.get("content")
    if not isinstance(content, (list, tuple)):
        return message
    return {**message, "content": "\n".join(part["text"] for part in content if part.get("type") == "text")}


def _template_pieces(tokenizer: Tokenizer, segments: list) -> list:
    """image_segments' output as ChatTemplate.encode takes an image's expansion: text as strings, control
    tokens and placeholder runs as id lists."""
    pieces: list = []
    for segment in segments:
        if isinstance(segment, _Placeholders):
            pieces.append([tokenizer.special.image_token_id] * segment.count)
        elif isinstance(segment, _Control):
            pieces.append([tokenizer.control_id(segment.token)])
        else:
            pieces.append(segment)
    return pieces


def layout_text(tokenizer: Tokenizer, text: str, image_tiles: Sequence[int] = (), *, add_bos: bool | None = None,
                tokens_per_tile: int = TOKENS_PER_TILE) -> Prompt:
    """Token ids of a plain prompt in which each IMAGE_MARKER stands for one image, the i-th having
    `image_tiles[i]` tiles; control tokens written in the text are control tokens. `add_bos` defaults to
    the checkpoint's choice (Gemma: a <bos> first; Qwen: none)."""
    if add_bos is None:
        add_bos = tokenizer.add_bos
    chunks = text.split(IMAGE_MARKER)
    segments: list = [chunks[0]]
    for chunk in chunks[1:]:
        segments.extend([_Image(), chunk])
    return _layout(tokenizer, segments, image_tiles, tokens_per_tile, add_bos=add_bos, special_tokens_in_text=True,
                   mismatch=lambda n: f"prompt has {n} image marker(s) {IMAGE_MARKER!r} for {len(image_tiles)} "
                                      "image(s); put one marker where each image goes, or none to have the "
                                      "images before the text")


def image_segments(tiles: int, tokens_per_tile: int = TOKENS_PER_TILE) -> list:
    """What one image with `tiles` tiles (the original first, then its crops) becomes in the prompt:
    text, control tokens and placeholder runs."""
    if not isinstance(tiles, int) or tiles < 1:
        raise ValueError(f"an image has at least one tile (the original), got {tiles!r}")

    def tile() -> list:
        return ["\n\n", _Control(START_OF_IMAGE), _Placeholders(tokens_per_tile), _Control(END_OF_IMAGE), "\n\n"]

    if tiles == 1:
        return tile()
    segments: list = [_ORIGINAL_INTRO, *tile(), _CROPS_INTRO]
    for crop in range(tiles - 1):
        if crop:
            segments.append(" ")
        segments.extend(tile())
    return segments


def _layout(tokenizer: Tokenizer, segments: list, image_tiles: Sequence[int], tokens_per_tile: int, *,
            add_bos: bool, special_tokens_in_text: bool, mismatch) -> Prompt:
    images = sum(isinstance(segment, _Image) for segment in segments)
    if images != len(image_tiles):
        raise ValueError(mismatch(images))
    tiles = iter(image_tiles)
    expanded: list = []
    for segment in segments:
        if isinstance(segment, _Image):
            expanded.extend(image_segments(next(tiles), tokens_per_tile))
        else:
            expanded.append(segment)

    ids: list[int] = [tokenizer.special.bos_id] if add_bos and tokenizer.special.bos_id is not None else []
    mask: list[bool] = [False] * len(ids)
    placeholder = tokenizer.special.image_token_id
    for segment in _merge_text(expanded):
        if isinstance(segment, _Placeholders):
            ids.extend([placeholder] * segment.count)
            mask.extend([True] * segment.count)
        elif isinstance(segment, _Control):
            ids.append(tokenizer.control_id(segment.token))
            mask.append(False)
        elif segment:
            piece = tokenizer.encode(segment, add_bos=False, special_tokens=special_tokens_in_text)
            ids.extend(piece)
            mask.extend([False] * len(piece))
    return Prompt(ids, mask, tuple(image_tiles), tokens_per_tile)


def _merge_text(segments: list) -> list:
    """Adjacent text pieces joined: the reference tokenizes the text between two control tokens or
    placeholder runs as one."""
    merged: list = []
    for segment in segments:
        if isinstance(segment, str) and merged and isinstance(merged[-1], str):
            merged[-1] += segment
        else:
            merged.append(segment)
    return merged
