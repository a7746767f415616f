"""The CLI's one number parser (``pipeline.cli.common._number``): every bound, and messages that name the value and the
allowed range (argparse turns them into usage errors, exit 2)."""

from __future__ import annotations

import argparse

import pytest

from pipeline.cli.common import (
    _finite,
    _fraction,
    _non_negative,
    _non_negative_int,
    _nonzero,
    _number,
    _positive,
    _positive_int,
    _share,
)


@pytest.mark.parametrize(("parse", "text", "value"), [
    (_positive_int, "3", 3), (_non_negative_int, "0", 0), (_finite, "-2.5", -2.5), (_non_negative, "0", 0.0),
    (_positive, "1e-9", 1e-9), (_nonzero, "-1", -1.0), (_share, "0", 0.0), (_fraction, "1", 1.0),
    (_number(int, low=1, high=10), "10", 10), (_number(low=0, high=100, unit=" points"), "100", 100.0),
])
def test_values_inside_the_bounds_are_parsed(parse, text: str, value: float) -> None:
    got = parse(text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(("parse", "text", "message"), [
    (_positive_int, "0", "0 is not an integer >= 1"),
    (_positive_int, "2.5", "'2.5' is not an integer"),
    (_non_negative_int, "-1", "-1 is not an integer >= 0"),
    (_finite, "abc", "'abc' is not a number"),
    (_finite, "nan", "nan is not a finite number"),
    (_non_negative, "-0.5", "-0.5 is not a number >= 0"),
    (_positive, "0", "0 is not a number > 0"),
    (_nonzero, "0.0", "0.0 is zero; give a finite non-zero number"),
    (_share, "1", "1 is not a share in [0, 1)"),
    (_fraction, "0", "0 is not a fraction in (0, 1]"),
    (_fraction, "1.5", "1.5 is not a fraction in (0, 1]"),
    (_number(int, low=1, high=10), "11", "11 is more than 10"),
    (_number(int, low=1, high=10), "0", "0 is not an integer >= 1"),
    (_number(low=0, high=100, unit=" points"), "101", "101 is more than 100 points"),
])
def test_values_outside_the_bounds_are_refused_naming_value_and_range(parse, text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as err:
        parse(text)
    assert str(err.value) == message
