"""Staleness weights of asynchronous contributions: the four forms, their exact values, their specs."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collectives.errors import ConfigError
from optimizers.staleness import STALENESS_FORMS, StalenessConfig, staleness_weight

SPECS = ["inverse-sqrt", "poly:a=0.5", "poly:a=1", "poly:a=2.5", "hinge:a=1,b=2", "hinge:a=0.25,b=0", "constant"]

# spec, τ -> s(τ), exactly
VALUES = [
    ("inverse-sqrt", 1, 1 / math.sqrt(2)),
    ("inverse-sqrt", 3, 0.5),
    ("inverse-sqrt", 8, 1 / 3),
    ("inverse-sqrt", 15, 0.25),
    ("poly:a=1", 1, 0.5),
    ("poly:a=1", 3, 0.25),
    ("poly:a=2", 1, 0.25),
    ("poly:a=0.5", 3, 0.5),
    ("hinge:a=1,b=2", 1, 1.0),
    ("hinge:a=1,b=2", 2, 1.0),
    ("hinge:a=1,b=2", 3, 0.5),
    ("hinge:a=1,b=2", 4, 1 / 3),
    ("hinge:a=0.5,b=0", 2, 0.5),
    ("constant", 1, 1.0),
    ("constant", 1000, 1.0),
]


@pytest.mark.parametrize("spec,tau,expected", VALUES)
def test_the_weight_is_the_formula_exactly(spec, tau, expected):
    assert StalenessConfig.parse(spec).weight(tau) == expected


@pytest.mark.parametrize("spec", SPECS)
def test_a_fresh_contribution_weighs_exactly_one(spec):
    assert StalenessConfig.parse(spec).weight(0) == 1.0


def test_the_default_is_inverse_sqrt():
    assert StalenessConfig() == StalenessConfig.parse("inverse-sqrt")
    assert str(StalenessConfig()) == "inverse-sqrt"


def test_the_registry_lists_the_four_forms():
    assert sorted(STALENESS_FORMS) == ["constant", "hinge", "inverse-sqrt", "poly"]


def test_staleness_weight_takes_a_spec_or_a_config():
    assert staleness_weight("poly:a=1", 1) == staleness_weight(StalenessConfig("poly", a=1), 1) == 0.5


configs = st.one_of(
    st.just(StalenessConfig("inverse-sqrt")),
    st.just(StalenessConfig("constant")),
    st.builds(StalenessConfig, st.just("poly"), st.floats(0.01, 10)),
    st.builds(StalenessConfig, st.just("hinge"), st.floats(0.01, 10), st.integers(0, 50)),
)


@given(configs, st.integers(0, 10**6), st.integers(1, 10**6))
def test_the_weight_never_grows_with_staleness(config, tau, more):
    assert config.weight(tau + more) <= config.weight(tau)


@given(configs, st.integers(0, 10**6))
def test_the_weight_is_in_zero_one(config, tau):
    assert 0.0 <= config.weight(tau) <= 1.0


@given(configs)
def test_str_reads_back_into_the_same_config(config):
    assert StalenessConfig.parse(str(config)) == config


# written spec -> its canonical form
CANONICAL = [
    ("inverse-sqrt", "inverse-sqrt"),
    (" constant ", "constant"),
    ("poly:a=1.0", "poly:a=1"),
    ("poly: a = 0.5 ", "poly:a=0.5"),
    ("hinge:b=4,a=10", "hinge:a=10,b=4"),
    ("hinge:a=1e1,b=4.0", "hinge:a=10,b=4"),
]


@pytest.mark.parametrize("text,canonical", CANONICAL)
def test_str_is_the_canonical_spec(text, canonical):
    assert str(StalenessConfig.parse(text)) == canonical


# bad spec -> what the error says
BAD = [
    ("sqrt", "unknown staleness function 'sqrt'"),
    ("", "unknown staleness function ''"),
    ("poly", "poly takes a, got none"),
    ("poly:", "ends with ':'"),
    ("poly:a", "must read key=value"),
    ("poly:a=", "must read key=value"),
    ("poly:a=x", "a must be a number"),
    ("poly:a=0", "needs a finite a > 0"),
    ("poly:a=-1", "needs a finite a > 0"),
    ("poly:a=inf", "needs a finite a > 0"),
    ("poly:a=nan", "needs a finite a > 0"),
    ("poly:a=1,a=2", "a is given twice"),
    ("poly:a=1,b=2", "poly takes a, got a, b"),
    ("poly:c=1", "poly has no parameter 'c'"),
    ("hinge:a=1", "hinge takes a, b, got a"),
    ("hinge:a=1,b=2.5", "b must be a whole number >= 0"),
    ("hinge:a=1,b=-1", "needs a whole number b >= 0"),
    ("hinge:a=1,b=x", "b must be a whole number >= 0"),
    ("inverse-sqrt:a=0.5", "inverse-sqrt takes no parameters, got a"),
    ("constant:b=1", "constant takes no parameters, got b"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_a_bad_spec_is_refused_saying_why_and_naming_the_forms(text, message):
    with pytest.raises(ConfigError) as info:
        StalenessConfig.parse(text)
    assert message in str(info.value)
    assert "inverse-sqrt, poly:a=A (A > 0), hinge:a=A,b=B (A > 0, B a whole number >= 0) or constant" in str(info.value)


@pytest.mark.parametrize("kwargs", [{"name": "hinge", "a": 1.0, "b": True}, {"name": "hinge", "a": 1.0, "b": 1.5},
                                    {"name": "poly", "a": True}, {"name": 3}])
def test_a_config_built_directly_is_validated_too(kwargs):
    with pytest.raises(ConfigError):
        StalenessConfig(**kwargs)


@pytest.mark.parametrize("tau", [-1, 1.0, 0.0, True, "1", None])
def test_staleness_must_be_a_whole_number_of_rounds(tau):
    with pytest.raises(ConfigError, match="whole number of rounds >= 0"):
        StalenessConfig().weight(tau)
