"""Scoring generated answers: extraction by pattern or first line, normalization, alternatives, numbers."""

from __future__ import annotations

import pytest

from lowrank_ablation.answers import check_compare, compile_pattern, correct, extract, matches


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


@pytest.mark.parametrize("text,answer,pattern,expected", [
    ("#### 1,000", "1000", r"#### (.+)", True),     # thousands separators
    ("so the answer is 3.0", "3", None, True),      # the verifier extracts the last expression itself
    ("\\boxed{\\frac{1}{2}}", "0.5", None, True),   # LaTeX, boxed first
    ("18 eggs, 18 * 2 = 36", "18", None, False),     # not the first number: the final one
    ("no marker", "5", r"#### (.+)", False),         # the pattern did not match: wrong
    ("nothing to parse", "5", None, False),
    ("7", "8|7", None, True),                        # alternatives, as for exact
])
def test_math_verify_comparison(text, answer, pattern, expected):
    assert correct(text, answer, compile_pattern(pattern), "math-verify") is expected


def test_exact_comparison_is_the_default_and_unknown_ones_are_refused():
    assert correct("1,000\nmore", "1000", None) is True and correct("3.0 apples", "3", None) is False
    with pytest.raises(ValueError, match="answer_compare must be one of"):
        check_compare("latex")
