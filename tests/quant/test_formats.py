"""Bit codes, their names and storage cost, and QuantSpec validation."""

import numpy as np
import pytest

from moeqjax.quant import QUANT_CODES
from moeqjax.quant import QuantSpec
from moeqjax.quant import VALID_CODES
from moeqjax.quant import code_name
from moeqjax.quant import storage_bits
from moeqjax.quant import validate_codes


def test_code_tables():
  assert VALID_CODES == (0, 1, 2, 3, 4, 8)
  assert QUANT_CODES == (1, 2, 3, 4, 8)
  assert [code_name(c) for c in VALID_CODES] == ["fp", "ternary", "int2", "int3", "int4", "int8"]


def test_storage_bits():
  assert storage_bits(0, "2bit") == 16.0
  assert storage_bits(1, "2bit") == 2.0
  assert storage_bits(1, "base3") == pytest.approx(1.6)
  assert [storage_bits(c, "base3") for c in (2, 3, 4, 8)] == [2.0, 3.0, 4.0, 8.0]
  with pytest.raises(ValueError, match="ternary_packing='base4' is unsupported"):
    storage_bits(1, "base4")


def test_validate_codes():
  got = validate_codes([[0, 1], [4, 8]])
  assert got.dtype == np.int32 and got.tolist() == [[0, 1], [4, 8]]
  with pytest.raises(ValueError, match=r"unsupported bit code 5 at index \(2,\); choose from 0 \(full"
                                       r" precision\), 1 \(ternary\), 2, 3, 4, 8"):
    validate_codes(np.array([4, 1, 5, 6]))
  with pytest.raises(ValueError, match=r"unsupported bit code 16 at index \(1, 0\)"):
    validate_codes([[4, 4], [16, 4]])
  with pytest.raises(ValueError, match="must be integers"):
    validate_codes([1.5])


@pytest.mark.parametrize("kwargs,message", [
    ({"granularity": "row"}, "granularity='row' is unsupported"),
    ({"group_size": 0}, "group_size=0 must be positive"),
    ({"group_size": 32.0}, "must be a positive int"),
    ({"ternary_method": "sign"}, "ternary_method='sign' is unsupported"),
    ({"ternary_packing": "1bit"}, "ternary_packing='1bit' is unsupported"),
    ({"scale_bytes": 3}, "scale_bytes=3 is unsupported"),
    ({"symmetric": "yes"}, "symmetric='yes' must be True or False"),
])
def test_quant_spec_rejects_bad_fields(kwargs, message):
  with pytest.raises(ValueError, match=message):
    QuantSpec(**kwargs)


def test_quant_spec_is_hashable_and_frozen():
  spec = QuantSpec(granularity="group", group_size=64)
  assert hash(spec) == hash(QuantSpec(granularity="group", group_size=64))
  with pytest.raises(AttributeError):
    spec.group_size = 32
