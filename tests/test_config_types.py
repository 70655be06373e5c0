"""LevyConfig checks the type of every levy field first, so a wrong type is named like a wrong value."""

from __future__ import annotations

import pytest

from hf_levy import LevyArguments, LevyConfig
from hf_levy.config import describe_type, fits_type


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("levy_alpha", "1.5", "a float"),
        ("levy_alpha", [1, 2], "a float"),
        ("levy_clip", "x", "a float or None"),
        ("num_eigenpairs", True, "an integer"),
        ("num_eigenpairs", 4.0, "an integer"),
        ("levy_virtual_batch_size", "64", "an integer or None"),
        ("calibration_fit_alpha", 1, "a bool"),
        ("hvp_method", None, "one of 'auto', 'autograd', 'finite_difference'"),
    ],
)
def test_a_wrong_type_names_the_field_the_value_and_the_type(tmp_path, field, value, expected):
    with pytest.raises(ValueError, match=f"^{field} must be {expected}, got ") as info:
        LevyConfig(output_dir=str(tmp_path), report_to="none", **{field: value})
    assert repr(value) in str(info.value)
    with pytest.raises(ValueError, match=f"^{field} must be"):
        LevyArguments(**{field: value})


def test_ints_are_floats_but_bools_are_neither():
    assert fits_type(2, float) and fits_type(2.5, float | None) and fits_type(None, float | None)
    assert not fits_type(True, float) and not fits_type(True, int) and not fits_type(2.0, int)
    assert LevyArguments(levy_alpha=2).levy_alpha == 2


def test_describe_type_reads_like_the_docs():
    assert describe_type(int | None) == "an integer or None"
    assert describe_type(list[str] | str) == "a list or a string"
