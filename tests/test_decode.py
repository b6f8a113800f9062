"""Request bodies are counted on the wire before they are parsed (service.decode): the count equals the
number of fields protobuf's own parser finds, nested messages included; a body over the limit is refused
without being parsed."""

from __future__ import annotations

import pytest

from proto.tessera.common.v1 import tensor_pb2
from proto.tessera.gateway.v1 import gateway_pb2
from proto.tessera.lm.v1 import lm_pb2
from service.decode import MIN_FIELD_BYTES, RequestDecoder, TooManyFields, Undecodable, count_fields


def parsed_fields(message) -> int:
    """Fields of a parsed message, by protobuf's own reflection: every set scalar, every element of a
    repeated field, every nested message and its fields."""
    total = 0
    for field, value in message.ListFields():
        items = value if field.is_repeated else [value]
        for item in items:
            total += 1
            if field.type == field.TYPE_MESSAGE:
                total += parsed_fields(item)
    return total


def varint(value: int) -> bytes:
    out = b""
    while value >= 0x80:
        out += bytes([value & 0x7F | 0x80])
        value >>= 7
    return out + bytes([value])


def unpacked_ints(number: int, values) -> bytes:
    return b"".join(varint(number << 3 | 0) + varint(value) for value in values)


REQUESTS = [
    lm_pb2.GenerateRequest(prompt="Hello", sampling=lm_pb2.SamplingParams(max_new_tokens=12, temperature=0.5,
                                                                          stop=["a", "bc", ""])),
    lm_pb2.GenerateRequest(messages=[lm_pb2.ChatMessage(role="user", content=[
        lm_pb2.ContentPart(text="look"), lm_pb2.ContentPart(image=True)])] * 7,
        images=[tensor_pb2.Tensor(data=b"\0" * 70_000, dtype="float32", shape=[1, 256, 640])]),
    lm_pb2.TokenizeRequest(messages=[lm_pb2.ChatMessage(role="assistant", content=[lm_pb2.ContentPart(text="é" * 300)])],
                           image_tiles=[1, 5, 3]),
    gateway_pb2.QueryRequest(prompt="what is it?", images=[tensor_pb2.Image(data=bytes(range(256)) * 40)] * 3,
                             sampling=lm_pb2.SamplingParams(stop_token_ids=lm_pb2.StopTokenIds(ids=[1, 106]))),
]


@pytest.mark.parametrize("request_message", REQUESTS, ids=lambda m: type(m).__name__)
def test_the_count_on_the_wire_equals_the_parsed_fields(request_message):
    data = request_message.SerializeToString()
    expected = parsed_fields(type(request_message).FromString(data))
    # Packed arrays (shape, image_tiles, ids) are one field on the wire, several elements once parsed.
    packed = sum(max(len(v) - 1, 0) for v in _packed_arrays(request_message))
    assert count_fields(data, request_message.DESCRIPTOR, 10**9) == expected - packed
    assert count_fields(data, request_message.DESCRIPTOR, 3) == 4  # stops just past the limit


def _packed_arrays(message):
    for field, value in message.ListFields():
        if field.type == field.TYPE_MESSAGE:
            for item in (value if field.is_repeated else [value]):
                yield from _packed_arrays(item)
        elif field.is_repeated and field.type != field.TYPE_STRING and field.type != field.TYPE_BYTES:
            yield value


def test_unpacked_and_unknown_fields_are_counted_and_malformed_bodies_are_left_to_the_parser():
    tokenize = lm_pb2.TokenizeRequest(prompt="hi").SerializeToString()
    unpacked = tokenize + unpacked_ints(4, [1, 2, 3, 4, 5])  # image_tiles sent unpacked: 5 fields
    assert lm_pb2.TokenizeRequest.FromString(unpacked).image_tiles == [1, 2, 3, 4, 5]
    assert count_fields(unpacked, lm_pb2.TokenizeRequest.DESCRIPTOR, 10**9) == 6
    unknown = tokenize + varint(99 << 3 | 0) + varint(300) + varint(98 << 3 | 5) + b"\0" * 4 \
        + varint(97 << 3 | 1) + b"\0" * 8 + varint(96 << 3 | 2) + varint(3) + b"abc"  # two-byte tags
    assert lm_pb2.TokenizeRequest.FromString(unknown).prompt == "hi"
    assert count_fields(unknown, lm_pb2.TokenizeRequest.DESCRIPTOR, 10**9) == 5
    for broken in (b"\x0a\xff", b"\x0a\x05ab", b"\xff" * 12, b"\x0b"):  # truncated, overlong varint, group
        count_fields(broken, lm_pb2.TokenizeRequest.DESCRIPTOR, 10**9)  # returns; the parser decides


def test_a_body_over_the_field_limit_is_refused_unparsed():
    parsed = []

    def parse(data: bytes):
        parsed.append(len(data))
        return lm_pb2.GenerateRequest.FromString(data)
    parse.__self__ = lm_pb2.GenerateRequest  # as a bound FromString carries its message class

    decoder = RequestDecoder(parse, max_fields=100)
    small = lm_pb2.GenerateRequest(prompt="x" * 150).SerializeToString()
    assert len(small) <= 100 * MIN_FIELD_BYTES and decoder.decode(small).prompt == "x" * 150
    large = lm_pb2.GenerateRequest(prompt="x" * 5000, sampling=lm_pb2.SamplingParams(stop=["s"] * 90)).SerializeToString()
    assert decoder.decode(large).sampling.stop == ["s"] * 90
    flood = lm_pb2.GenerateRequest(sampling=lm_pb2.SamplingParams(stop=["s"] * 200)).SerializeToString()
    refused = decoder.decode(flood)
    assert isinstance(refused, Undecodable) and isinstance(refused.error, TooManyFields)
    assert "more than 100 protobuf fields" in str(refused.error) and len(parsed) == 2  # never parsed
    broken = decoder.decode(b"\x0a\xff" + b"x" * 300)
    assert isinstance(broken, Undecodable) and broken.message_type == "tessera.lm.v1.GenerateRequest"
