"""The hand-written wire form of float values in online rows equals protobuf's own serialisation, byte for byte:
Feast's Redis store reads these bytes back with `Value.ParseFromString`."""

from __future__ import annotations

import math
import random
import struct

import pytest
from feast.protos.feast.types.Value_pb2 import DoubleList, Value

from services.features.online import encode_double, encode_double_list

SPECIAL = [0.0, -0.0, 1.0, -1.5, 1e-300, -1e300, math.inf, -math.inf, 5e-324, 1 / 3, 123456.789]


def _random_doubles(rng: random.Random, count: int) -> list[float]:
    # Any bit pattern but NaN (NaN != NaN; its bytes are checked separately): covers every exponent and sign.
    values = []
    while len(values) < count:
        value = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        if not math.isnan(value):
            values.append(value)
    return values


@pytest.mark.parametrize("value", SPECIAL)
def test_a_double_is_encoded_as_protobuf_does(value: float) -> None:
    assert encode_double(value) == Value(double_val=value).SerializeToString()


def test_random_doubles_and_nan_are_encoded_as_protobuf_does() -> None:
    rng = random.Random(7)
    for value in [*_random_doubles(rng, 2000), math.nan]:
        assert encode_double(value) == Value(double_val=value).SerializeToString()


@pytest.mark.parametrize("length", [0, 1, 2, 15, 16, 17, 24, 100, 2000])
def test_double_lists_of_every_length_class_are_encoded_as_protobuf_does(length: int) -> None:
    # 16 doubles = 128 bytes: the first length that needs two varint bytes; 2,000 needs two in the outer length too.
    values = _random_doubles(random.Random(length), length)
    expected = Value(double_list_val=DoubleList(val=values)).SerializeToString()
    assert encode_double_list(values) == expected


def test_encoded_values_parse_back_to_the_same_floats() -> None:
    values = [0.25, -0.0, 1e-9, 3.0]
    parsed = Value()
    parsed.ParseFromString(encode_double_list(values))
    assert parsed.WhichOneof("val") == "double_list_val"
    assert list(parsed.double_list_val.val) == values
    parsed.ParseFromString(encode_double(-0.0))
    assert parsed.WhichOneof("val") == "double_val" and math.copysign(1.0, parsed.double_val) == -1.0
