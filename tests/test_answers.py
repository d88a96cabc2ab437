"""Scoring generated answers: extraction by pattern or first line, normalization, alternatives, numbers."""

from __future__ import annotations

import pytest

from experiments.ablation.answers import compile_pattern, extract, matches


@pytest.mark.parametrize("prediction,answer,expected", [
    ("42", "42", True),
    (" 42.\n", "42", True),            # whitespace and trailing punctuation
    ("Paris!", "paris", True),          # case-insensitive
    ("1,000", "1000.0", True),          # numbers as numbers
    ("-3.50", "-3.5", True),
    ("+7", "7", True),
    ("1,2", "12", False),               # a comma that is not a thousands separator: a string, not 12
    ("12", "1,2", False),
    ("London", "Paris|London", True),   # alternatives
    ("Rome", "Paris|London", False),
    ("7 apples", "7", False),           # no partial credit: extract with a pattern instead
    ("", "0", False),
    (None, "42", False),                # the pattern did not match: wrong, not an error
])
def test_matches(prediction, answer, expected):
    assert matches(prediction, answer) is expected


def test_extract_first_line_by_default_and_first_group_of_a_pattern():
    assert extract("\n  12\nbecause ...", None) == "12"
    assert extract("", None) == ""
    cot = compile_pattern(r"####\s*(\S+)")
    assert extract("3 + 4 = 7\n#### 7", cot) == "7"
    assert extract("no marker here", cot) is None
    assert matches(extract("no marker here", cot), "7") is False
    optional = compile_pattern(r"answer(?: is (\d+))?")
    assert extract("the answer", optional) is None  # the group did not take part in the match


def test_bad_patterns_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        compile_pattern("([0-9]+")
    with pytest.raises(ValueError, match=r"has no group; put the answer in parentheses"):
        compile_pattern(r"#### \d+")
    assert compile_pattern(None) is None
