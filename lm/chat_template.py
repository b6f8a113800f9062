"""Chat prompts rendered from the checkpoint's own chat template, token for token as transformers'
`apply_chat_template` renders and tokenizes them.

Where the template comes from (transformers 5's precedence): `chat_template.jinja` in the checkpoint
directory (with named extras in `additional_chat_templates/*.jinja`) wins over `tokenizer_config.json`'s
`chat_template`, a string or a list of {name, template}. The GGUF converter writes a GGUF's
`tokenizer.chat_template` into tokenizer_config.json, so a converted GGUF is read the same way.

Rendering: a sandboxed Jinja environment set up as the reference sets it up (ImmutableSandboxedEnvironment,
`trim_blocks`, `lstrip_blocks`, loop controls, a `tojson` that does not escape HTML, `raise_exception`,
`strftime_now`, `{% generation %}` blocks rendered as their body, and `namespace` / `dict` that cannot
store underscore names), with `messages`, `tools`, `documents` (None), `add_generation_prompt`, the
tokenizer's named special tokens (`bos_token`, `eos_token`, ...) and template kwargs such as
`enable_thinking`.

Text a client sends stays plain text, as `apply_chat_template(..., sanitize_control_tokens=True)` keeps it:
before rendering, every control token written in the messages, tools or template kwargs is wrapped in two
private-use markers; after rendering, the chat is split at the markers, a marked token is encoded as the
characters it is spelled with and the rest (the template's own control tokens included) is encoded
normally. Control tokens are the tokenizer's special tokens plus the added tokens the template writes
as literal text (Gemma's "<start_of_image>", Qwen's "<think>"), or `chat_control_tokens` when
tokenizer_config.json lists them. A template that cuts a marked token apart (`split('</think>')`) leaves
lone markers; they are dropped, and still end the text they are in, as in the reference. So reasoning
sent back inside an earlier assistant turn's content ("<think>...</think>") renders as the sanitizing
reference renders it, not as the plain one; sent as `reasoning_content`, it renders as both do.
With `allow_control_tokens` client text writes control tokens and the ids are the plain reference's
(only a client's image marker is still marked, so the private-use markers are dropped from client text
of a model that takes images).

Images: the image marker the template writes for an image part ("<start_of_image>" for Gemma 3) is
recorded as an `ImageSlot`; the caller expands each slot (tiles and placeholders) when encoding, as the
reference processor expands the rendered text. The same marker written by a user is never a slot.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
# Private-use characters wrapped around control tokens found in client text (the reference's own pair, so
# that the same input gives the same ids). Clients cannot send them: they are removed from client text.
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"
# Message fields a reasoning text arrives under; templates read `reasoning_content` (gpt-oss: `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The messages cannot be rendered: the template refused them (its own message is quoted) or they are
    malformed (the message names which one and what is allowed). A request error."""


@dataclass(frozen=True)
class ImageSlot:
    index: int  # which image part of the messages, in prompt order (0-based)
    marker: str  # the text the template wrote for it ("<start_of_image>")


@dataclass(frozen=True)
class ChatPiece:
    """Text encoded in one go. A `plain` piece is a control token a client wrote, encoded as the
    characters it is spelled with; the others may hold the template's control tokens and image slots."""
    parts: tuple[str | ImageSlot, ...]
    plain: bool = False

    @property
    def text(self) -> str:
        return "".join(part.marker if isinstance(part, ImageSlot) else part for part in self.parts)


@dataclass(frozen=True)
class RenderedChat:
    pieces: tuple[ChatPiece, ...]  # the chat in encoding order
    num_images: int  # image slots, in order, across the pieces

    @property
    def text(self) -> str:
        """The rendered chat: `apply_chat_template(..., tokenize=False)`'s string (where the template cut
        a marked token apart, the text around the lone markers, without them)."""
        return "".join(piece.text for piece in self.pieces)


# What `ChatTemplate.encode`'s `expand_image` returns for one image: text (joined to the text around it,
# as the reference processor substitutes text into the rendered chat) and runs of ids (added as they are,
# e.g. control tokens and soft-token placeholders; they end the text before them as an added token would).
ImageExpansion = Sequence[str | Sequence[int]]


# ----- where the template comes from ------------------------------------------------------------------

def load_chat_templates(directory: str | Path) -> dict[str, str]:
    """Every chat template of a checkpoint directory by name ("default" for the main one): the
    `chat_template.jinja` / `additional_chat_templates/*.jinja` files when there are any (transformers 5
    then ignores tokenizer_config.json's), else tokenizer_config.json's `chat_template` (a string, or a
    list of {"name", "template"}). Empty when the checkpoint has none. Raises ValueError for a
    tokenizer_config.json that is not JSON or a `chat_template` of another shape."""
    directory = Path(directory)
    templates: dict[str, str] = {}
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (directory / CHAT_TEMPLATE_DIR).is_dir():
        for path in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates
    config_path = directory / "tokenizer_config.json"
    value = _read_json(config_path).get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(
            isinstance(item, Mapping) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str)
            for item in value):
        return {item["name"]: item["template"] for item in value}
    raise ValueError(f"{config_path}: chat_template must be a string or a list of {{'name', 'template'}} "
                     f"objects, got {type(value).__name__}")


def load_chat_template(directory: str | Path, *, tools: bool = False) -> str | None:
    """The chat template a chat with (`tools=True`) or without tools is rendered with: "tool_use" when there
    are tools and the checkpoint names one, else "default"; None when the checkpoint has no template.
    Raises ValueError when it has named templates but none called "default"."""
    templates = load_chat_templates(directory)
    return templates[_template_name(templates, tools=tools, where=str(directory))] if templates else None


def _template_name(templates: Mapping[str, str], *, tools: bool, where: str) -> str:
    if tools and "tool_use" in templates:
        return "tool_use"
    if "default" in templates:
        return "default"
    raise ValueError(f"{where} has chat templates {sorted(templates)} but none named 'default' "
                     f"(a {CHAT_TEMPLATE_FILE} file or a template named 'default' in tokenizer_config.json)")


# ----- rendering and encoding -------------------------------------------------------------------------

class ChatTemplate:
    """A checkpoint's chat template(s), compiled once, bound to its tokenizer.

    `templates`: the template source, or templates by name (see `load_chat_templates`); `backend`: the
    checkpoint's `tokenizers.Tokenizer` (tokenizer.json); `special_tokens`: the named special tokens the
    template sees (`bos_token`, `eos_token`, ...; see `special_tokens_of`); `control_tokens`: the added
    tokens besides the special ones that client text may not write (default: those the template writes as
    literal text); `image_marker`: what the template writes for an image part (Gemma 3: "<start_of_image>";
    None: the model takes no images). Raises ValueError for a template that does not compile.
    Thread-safe: rendering and encoding keep no state."""

    def __init__(self, templates: str | Mapping[str, str], backend, *, special_tokens: Mapping[str, str] = {},
                 control_tokens: Sequence[str] | None = None, image_marker: str | None = None) -> None:
        import jinja2

        self.templates = {"default": templates} if isinstance(templates, str) else dict(templates)
        self.backend = backend
        self.special_tokens = dict(special_tokens)
        self.image_marker = image_marker
        if control_tokens is not None and (isinstance(control_tokens, str) or
                                           not all(isinstance(token, str) for token in control_tokens)):
            raise ValueError(f"chat_control_tokens must be a list of strings, got {control_tokens!r}")
        added = backend.get_added_tokens_decoder().values()
        self._compiled: dict[str, Any] = {}
        self._control_tokens: dict[str, tuple[str, ...]] = {}
        self._patterns: dict[str, tuple[re.Pattern, re.Pattern]] = {}
        for name, source in self.templates.items():
            environment = _environment()
            try:
                self._compiled[name] = environment.from_string(source)
                literal_text = _literal_text(environment, source)
            except jinja2.TemplateSyntaxError as error:
                raise ValueError(f"chat template {name!r} does not compile: {error} (line {error.lineno})") from None
            listed = set(control_tokens) if control_tokens is not None else None
            tokens = {token.content for token in added
                      if token.special or (token.content in listed if listed is not None
                                           else token.content in literal_text and not token.content.isspace())}
            if image_marker:
                tokens.add(image_marker)  # a client's marker must never become an image slot
            self._control_tokens[name] = tuple(sorted(tokens))
            alternation = _alternation(tokens)
            self._patterns[name] = (re.compile(alternation),
                                    re.compile(f"{_MARK_START}({alternation}){_MARK_END}|[{_MARK_START}{_MARK_END}]"))
        self._newline_ids = self._encode_texts(["\n"])[0]

    @classmethod
    def from_dir(cls, directory: str | Path, backend=None, *, image_marker: str | None = None) -> "ChatTemplate":
        """The chat template(s) of a checkpoint directory (see `load_chat_templates`), with its named special
        tokens and `chat_control_tokens` from tokenizer_config.json; `backend` defaults to its tokenizer.json.
        Raises ValueError when the checkpoint has no chat template (a base model: send a raw prompt)."""
        directory = Path(directory)
        templates = load_chat_templates(directory)
        if not templates:
            raise ValueError(f"{directory} has no chat template (neither {CHAT_TEMPLATE_FILE} nor a chat_template "
                             "in tokenizer_config.json): this model cannot take chat messages; send a raw prompt")
        if backend is None:
            from tokenizers import Tokenizer as Backend

            backend = Backend.from_file(str(directory / "tokenizer.json"))
        config = _read_json(directory / "tokenizer_config.json")
        return cls(templates, backend, special_tokens=special_tokens_of(config),
                   control_tokens=config.get("chat_control_tokens"), image_marker=image_marker)

    @functools.cached_property
    def takes_tools(self) -> bool:
        """Whether the template a chat with tools is rendered with reads the `tools` variable (jinja2's
        undeclared variables of its source, parsed once): Gemma 3's does not, so tools sent to it never
        reach the prompt."""
        import jinja2.meta

        source = self.templates[self._name(True)]
        return "tools" in jinja2.meta.find_undeclared_variables(_environment().parse(source))

    def control_tokens(self, *, tools: bool = False) -> tuple[str, ...]:
        """The tokens client text is kept from writing, for a chat with or without tools."""
        return self._control_tokens[self._name(tools)]

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool,
               tools: Sequence[Mapping[str, Any]] | None = None, allow_control_tokens: bool = False,
               **template_kwargs: Any) -> RenderedChat:
        """The chat `messages` ({"role", "content"} dicts; content a string or a list of {"type": "text",
        "text"} / {"type": "image"} parts; other fields such as `reasoning_content` or `tool_calls` are
        passed on) rendered by the template, with `add_generation_prompt`, `tools` (JSON schemas) and
        `template_kwargs` (e.g. `enable_thinking=False`) as template variables. Control tokens written in
        the messages, tools or kwargs stay plain text unless `allow_control_tokens`.
        Raises ChatTemplateError: no messages, a message that is not a mapping, a tool that is not a JSON
        schema, an image part for a model without images, an image part the template did not write, or a
        template that refuses the messages or fails on them (its message quoted)."""
        import jinja2

        if not messages:
            raise ChatTemplateError("chat: no messages; send at least one")
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise ChatTemplateError(f"chat: message {index} is a {type(message).__name__}; each message is "
                                        "an object with a role and a content")
        if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
            raise ChatTemplateError("chat: each tool must be a JSON schema object")
        image_parts = _count_image_parts(messages)
        if image_parts and not self.image_marker:
            raise ChatTemplateError("chat: a message has an image part, but this model takes no images")
        name = self._name(tools is not None)
        control_re, split_re = self._patterns[name]
        # Client data is rebuilt out of plain JSON types (the sandbox must not see objects with methods of
        # their own) with its control tokens marked; a message's None fields are dropped, as the reference
        # drops them (templates test `is defined`, not `is none`).
        mark = control_re
        if allow_control_tokens:  # only a client's image marker is marked: it must not become an image slot
            mark = re.compile(re.escape(self.image_marker)) if self.image_marker else None
        chat = [_alias_reasoning(_template_data({k: v for k, v in message.items() if v is not None}, mark))
                for message in messages]
        variables = {**self.special_tokens, **_template_data(template_kwargs, mark)}
        try:
            text = self._compiled[name].render(messages=chat, tools=_template_data(tools, mark), documents=None,
                                               add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"chat template refused the messages: {error.message or error}") from None
        except (TypeError, ValueError, LookupError, AttributeError) as error:
            raise ChatTemplateError(f"chat template failed on the messages ({type(error).__name__}: {error}); "
                                    "check their roles and content types") from None
        rendered = self._pieces(text, split_re if mark is not None else None, plain=not allow_control_tokens)
        if rendered.num_images != image_parts:
            raise ChatTemplateError(f"chat: the template wrote {rendered.num_images} image(s) for {image_parts} "
                                    "image part(s); images go in user messages")
        return rendered

    def encode(self, rendered: RenderedChat, *,
               expand_image: Callable[[ImageSlot], ImageExpansion] | None = None) -> list[int]:
        """Token ids of a rendered chat: without `expand_image`, `apply_chat_template(...)`'s ids (with
        `sanitize_control_tokens=True` unless rendered with `allow_control_tokens`); with it, each image slot
        is replaced by what it returns before tokenizing. Raises ChatTemplateError when a control token a
        client wrote cannot be kept as plain text (the tokenizer builds it from its characters)."""
        # Each piece becomes text runs and id runs; every text run is encoded in one batch, which releases
        # the GIL (see lm.tokenizer). A text run is ("text", text, follows_a_marker).
        plan: list[tuple] = []
        for position, piece in enumerate(rendered.pieces):
            if piece.plain:
                plan.append(("plain", piece.text))
                continue
            runs: list[str | list[int]] = [""]
            for part in piece.parts:
                items = [part.marker] if isinstance(part, ImageSlot) and expand_image is None else (
                    expand_image(part) if isinstance(part, ImageSlot) else [part])
                for item in items:
                    if isinstance(item, str) and isinstance(runs[-1], str):
                        runs[-1] += item
                    else:
                        runs.append(item if isinstance(item, str) else [int(token_id) for token_id in item])
            for index, run in enumerate(runs):
                if isinstance(run, list):
                    plan.append(("ids", run))
                elif run:
                    plan.append(("text", run, position > 0 and index == 0))
        text_runs = [step for step in plan if step[0] == "text"]
        encoded = iter(self._encode_runs([step[1] for step in text_runs], [step[2] for step in text_runs]))
        plain: dict[str, list[int]] = {}  # a forged token repeated many times is encoded once
        ids: list[int] = []
        for step in plan:
            if step[0] == "text":
                ids.extend(next(encoded))
            elif step[0] == "ids":
                ids.extend(step[1])
            else:
                if step[1] not in plain:
                    plain[step[1]] = self._encode_plain(step[1])
                ids.extend(plain[step[1]])
        return ids

    def apply(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool,
              tools: Sequence[Mapping[str, Any]] | None = None, allow_control_tokens: bool = False,
              **template_kwargs: Any) -> list[int]:
        """`encode(render(...))`: the chat's token ids, image slots left as the template's marker token."""
        return self.encode(self.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                       allow_control_tokens=allow_control_tokens, **template_kwargs))

    # -- internals --

    def _name(self, tools: bool) -> str:
        return _template_name(self.templates, tools=tools, where="this checkpoint")

    def _pieces(self, text: str, split_re: re.Pattern | None, *, plain: bool) -> RenderedChat:
        """`text` cut at the markers (`split_re`; None: nothing was marked) into pieces, with image slots
        where the template wrote the image marker. A marked token becomes a plain piece when `plain`, else
        (only the image marker was marked) text joined to the text around it."""
        # re.split with one group gives [text, token, text, token, ..., text], token None for a lone marker.
        chunks = split_re.split(text) if split_re is not None else [text]
        pieces: list[ChatPiece] = []
        parts: list[str | ImageSlot] = []
        images = 0

        def add(part: str | ImageSlot) -> None:
            if isinstance(part, str) and parts and isinstance(parts[-1], str):
                parts[-1] += part
            elif part:
                parts.append(part)

        for index, chunk in enumerate(chunks):
            if index % 2 == 0:
                runs = chunk.split(self.image_marker) if self.image_marker else [chunk]
                for run_index, run in enumerate(runs):
                    if run_index:
                        add(ImageSlot(images, self.image_marker))
                        images += 1
                    add(run)
            elif not plain:
                add(chunk or "")
            else:  # a marked token, or a lone marker, which still ends the text it is in
                if parts:
                    pieces.append(ChatPiece(tuple(parts)))
                parts = []
                if chunk:
                    pieces.append(ChatPiece((chunk,), plain=True))
        if parts:
            pieces.append(ChatPiece(tuple(parts)))
        return RenderedChat(tuple(pieces), images)

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        encode_batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [encoding.ids for encoding in encode_batch(texts, add_special_tokens=False)]

    def _encode_runs(self, texts: list[str], after_marker: list[bool]) -> list[list[int]]:
        # Text after a marker is encoded after a "\n" that is then removed, as the reference does (so that
        # a tokenizer that treats the start of a string specially does not here); where the "\n" joins the
        # text's first token, the text is encoded alone.
        encoded = self._encode_texts([("\n" + text) if after else text for text, after in zip(texts, after_marker)])
        newline = self._newline_ids
        retry = []
        for i, after in enumerate(after_marker):
            if after and encoded[i][:len(newline)] == newline:
                encoded[i] = encoded[i][len(newline):]
            elif after:
                retry.append(i)
        for i, ids in zip(retry, self._encode_texts([texts[i] for i in retry])):
            encoded[i] = ids
        return encoded

    def _encode_plain(self, token: str) -> list[int]:
        """A control token a client wrote, as the characters it is spelled with: the tokenizer's pipeline
        without its added tokens (after a "\\n" that is then removed, as for text after a marker)."""
        ids = self._without_added_tokens("\n" + token)
        newline = self._newline_ids
        ids = ids[len(newline):] if ids[:len(newline)] == newline else self._without_added_tokens(token)
        token_id = self.backend.token_to_id(token)
        if token_id is not None and token_id in ids:
            raise ChatTemplateError(f"{token!r} in the messages cannot be kept as plain text: this tokenizer "
                                    "builds the token from its characters")
        return ids

    def _without_added_tokens(self, text: str) -> list[int]:
        backend = self.backend
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        splits = [split for split, _ in backend.pre_tokenizer.pre_tokenize_str(text)] \
            if backend.pre_tokenizer is not None else [text]
        return [token.id for split in splits for token in backend.model.tokenize(split)]


def special_tokens_of(tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens a template sees, from tokenizer_config.json: every `*_token` entry (a string
    or an AddedToken object) and the entries of an `extra_special_tokens` object (e.g. `image_token`)."""
    named = dict(tokenizer_config)
    extra = tokenizer_config.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        named.update(extra)
    tokens: dict[str, str] = {}
    for key, value in named.items():
        if isinstance(value, Mapping) and isinstance(value.get("content"), str):
            value = value["content"]
        if key.endswith("_token") and isinstance(value, str):
            tokens[key] = value
    return tokens


def _environment():
    """A sandboxed Jinja environment set up as transformers sets up the one it renders chat templates in."""
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    class GenerationBlocks(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks the assistant's text for training masks; here it
        # renders as its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        # No underscore names: they lead to Python internals.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attributes = dict(*args, **kwargs)
            for name in attributes:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attributes)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not store {name!r} on a namespace")

    class Dict:
        # `dict(...)` and `dict.fromkeys(...)` only, not the type itself.
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters ("<" -> "\u003c"); templates expect plain JSON.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlocks, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    environment.globals["namespace"] = Namespace
    environment.globals["dict"] = Dict()
    return environment


def _literal_text(environment, source: str) -> str:
    """The template's literal text and string constants, joined by NULs so that no search matches across two."""
    import jinja2.nodes

    tree = environment.parse(source)
    literals = {node.data for node in tree.find_all(jinja2.nodes.TemplateData)}
    literals |= {node.value for node in tree.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return "\0".join(literals)


def _alternation(tokens) -> str:
    """A regex matching any of `tokens`, longest first, as a trie: one alternation of thousands of tokens
    (Gemma has 6,249 special tokens) would try each of them at every "<" of a long text."""
    trie: dict = {}
    for token in tokens:
        node = trie
        for char in token:
            node = node.setdefault(char, {})
        node[""] = {}  # the end of a token

    def pattern(node: dict) -> str:
        prefix = ""
        while len(node) == 1 and "" not in node:  # a chain of single characters: one literal run
            (char, node), = node.items()
            prefix += re.escape(char)
        branches = [re.escape(char) + pattern(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return prefix
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return prefix + (f"(?:{body})?" if "" in node else body)  # greedy: the longer token first

    return pattern(trie) if tokens else "(?!)"


def _template_data(value: Any, mark: re.Pattern | None) -> Any:
    """`value` rebuilt from plain JSON types (anything else becomes "<TypeName>"), with the matches of
    `mark` in its strings (not in dict keys) wrapped in markers and any marker characters already there
    removed."""
    if value is None or type(value) in (bool, int, float):
        return value
    if isinstance(value, str):
        value = str.__str__(value)
        if mark is None:
            return value
        value = value.replace(_MARK_START, "").replace(_MARK_END, "")
        return mark.sub(lambda match: f"{_MARK_START}{match.group(0)}{_MARK_END}", value)
    if isinstance(value, int):  # bool and int subclasses (enums) become the plain value
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_template_data(key, None): _template_data(item, mark) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_template_data(item, mark) for item in value]
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict) -> dict:
    """A message's reasoning under every name templates read it by (the first of _REASONING_FIELDS that is
    set), as the reference passes it."""
    reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _count_image_parts(messages: Sequence[Mapping[str, Any]]) -> int:
    return sum(1 for message in messages if isinstance(message.get("content"), (list, tuple))
               for part in message["content"] if isinstance(part, Mapping) and part.get("type") == "image")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value
