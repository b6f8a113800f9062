"""Request bodies -> protobuf messages, refusing before the parse a body with more fields than any valid
request needs.

Protobuf parses in C holding the GIL, in time that grows with the number of fields rather than bytes:
a 45 MB body of 15 million one-byte stop strings takes about half a second, during which no stream
advances and no health check is answered (and its parsed form takes gigabytes). So every body is first
walked on the wire by a compiled loop that releases the GIL (about a millisecond per 200,000 fields),
counting its fields, those of nested messages included, and refused as soon as the count passes the
limit; only a body within it is parsed. Protocol Buffers wire format:
https://protobuf.dev/programming-guides/encoding/
"""

from __future__ import annotations

import functools

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from numba import njit

MAX_DEPTH = 64  # nested messages followed; deeper ones are counted as one field (Tessera's nest 4 deep)
MALFORMED = -1
MIN_FIELD_BYTES = 2  # a field is at least a tag byte and a value byte (or a zero length)


class TooManyFields(ValueError):
    """A request body holds more protobuf fields than the server's limit."""


class Undecodable:
    """Stands in for a request body refused before or by the parser (gRPC would otherwise answer UNKNOWN
    with a traceback, before any handler or interceptor runs)."""

    def __init__(self, message_type: str, error: Exception):
        self.message_type = message_type
        self.error = error


def count_fields(data: bytes, descriptor: Descriptor, limit: int) -> int:
    """The fields in `data`, a serialized `descriptor` message, counting the fields of nested messages
    too (a repeated field once per element, a packed array once; unknown fields count), walked on the
    wire without parsing. Returns `limit + 1` as soon as there are more than `limit`. A malformed body
    ends the walk with the count so far: the parser then refuses it with its own error."""
    children, root = _child_table(descriptor)
    return int(_count(np.frombuffer(data, np.uint8), children, root, limit))


def compile_walker() -> None:
    """Compile (or load from numba's cache) the wire walker now, not on the first request."""
    _count(np.zeros(2, np.uint8), np.full((1, 1), -1, np.int32), 0, 10)


@functools.lru_cache(maxsize=None)
def _child_table(descriptor: Descriptor) -> tuple[np.ndarray, int]:
    """(children, root): children[t, n] is the index of the message type of field number n of message
    type t, or -1 where field n is not a message (or is not declared); root is `descriptor`'s index."""
    types: list[Descriptor] = [descriptor]
    index = {descriptor.full_name: 0}
    for message in types:  # breadth first; grows as nested types are found
        for field in message.fields:
            if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name not in index:
                index[field.message_type.full_name] = len(types)
                types.append(field.message_type)
    width = 1 + max((field.number for message in types for field in message.fields), default=0)
    children = np.full((len(types), width), -1, np.int32)
    for t, message in enumerate(types):
        for field in message.fields:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                children[t, field.number] = index[field.message_type.full_name]
    return children, 0


@njit(cache=True, nogil=True, inline="always")
def _varint(data, position, end):
    """(value, position after it), or (0, MALFORMED) when it runs past `end` or past 10 bytes."""
    value = 0
    shift = 0
    while position < end and shift < 70:
        byte = data[position]
        value |= np.int64(byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7
    return 0, MALFORMED


@njit(cache=True, nogil=True)
def _count(data, children, root, limit):
    ends = np.empty(MAX_DEPTH, np.int64)  # the end of each open message, outermost first
    types = np.empty(MAX_DEPTH, np.int64)
    depth = 0
    ends[0] = len(data)
    types[0] = root
    position = 0
    count = 0
    while True:
        if position >= ends[depth]:
            if position > ends[depth] or depth == 0:
                return count
            depth -= 1  # a nested message ended; its parent goes on from here
            continue
        tag, position = _varint(data, position, ends[depth])
        if position == MALFORMED:
            return count
        count += 1
        if count > limit:
            return count
        wire_type = tag & 7
        if wire_type == 0:
            _, position = _varint(data, position, ends[depth])
            if position == MALFORMED:
                return count
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, position = _varint(data, position, ends[depth])
            if position == MALFORMED or length > ends[depth] - position:
                return count
            number = tag >> 3
            child = children[types[depth], number] if number < children.shape[1] else -1
            if child >= 0 and depth + 1 < MAX_DEPTH:
                depth += 1  # walk into the nested message
                ends[depth] = position + length
                types[depth] = child
            else:
                position += length
        else:  # groups (proto2 only) or a malformed tag
            return count


class RequestDecoder:
    """Parses request bodies of one message type (`parse`: the class's FromString, whose `__self__` is
    the message class) after checking they hold at most `max_fields` fields. `decode` returns the message,
    or an Undecodable naming what was wrong."""

    def __init__(self, parse, max_fields: int):
        self.parse = parse
        self.descriptor: Descriptor | None = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
        self.max_fields = max_fields

    def decode(self, data: bytes):
        name = getattr(self.descriptor, "full_name", "request")
        could_be_over = self.descriptor is not None and len(data) > self.max_fields * MIN_FIELD_BYTES
        if could_be_over and count_fields(data, self.descriptor, self.max_fields) > self.max_fields:
            return Undecodable(name, TooManyFields(
                f"the request body ({len(data):,} bytes) holds more than {self.max_fields:,} protobuf fields, "
                "more than the server's request limits (--max-messages, --max-content-parts, --max-stop-strings, "
                "--max-images) allow"))
        try:
            return self.parse(data)
        except Exception as error:  # noqa: BLE001 - DecodeError, invalid UTF-8 in a string field, ...
            return Undecodable(name, error)
