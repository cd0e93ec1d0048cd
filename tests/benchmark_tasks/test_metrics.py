"""Metric definitions, checked against hand-computed values."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lm_eval_xke import metrics
from lm_eval_xke.metrics import (
    F1_FORMULAS,
    answer_tokens,
    exact_match,
    multiset_overlap,
    normalize_answer,
    normalized_em,
    normalized_f1,
    token_f1,
)


def test_formulas():
    assert F1_FORMULAS == ("harmonic", "legacy_pr")


# ---------------------------------------------------------------- raw token F1 (teacher-forced protocol)


def test_overlap_removes_one_gold_item_per_predicted_item():
    assert multiset_overlap([1, 2, 2, 3], [2, 2, 4]) == 2
    assert multiset_overlap([2, 2, 2], [2]) == 1  # duplicates in pred cannot reuse one gold item
    assert multiset_overlap([2], [2, 2, 2]) == 1
    assert multiset_overlap([], [1]) == 0


def test_hand_computed_f1_both_formulas():
    # overlap 2, P = 2/4, R = 2/3
    assert token_f1([1, 2, 2, 3], [2, 2, 4]) == pytest.approx(4 / 7)
    assert token_f1([1, 2, 2, 3], [2, 2, 4], formula="harmonic") == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert token_f1([1, 2, 2, 3], [2, 2, 4], formula="legacy_pr") == pytest.approx(1 / 3)


def test_duplicates_are_counted_once_per_gold_copy():
    # overlap 1, P = 1/3, R = 1
    assert token_f1([7, 7, 7], [7], "harmonic") == pytest.approx(0.5)
    assert token_f1([7, 7, 7], [7], "legacy_pr") == pytest.approx(1 / 3)


def test_identical_sequences_score_one():
    for formula in F1_FORMULAS:
        assert token_f1([5, 6, 5], [5, 5, 6], formula) == 1.0


@pytest.mark.parametrize("formula", F1_FORMULAS)
def test_zero_overlap_is_zero_not_zero_division(formula):
    assert token_f1([1, 2], [3, 4], formula) == 0.0


@pytest.mark.parametrize("formula", F1_FORMULAS)
def test_empty_sequences(formula):
    assert token_f1([], [], formula) == 1.0
    assert token_f1([], [1], formula) == 0.0
    assert token_f1([1], [], formula) == 0.0


def test_legacy_never_exceeds_harmonic():
    pairs = [([1, 2, 2, 3], [2, 2, 4]), ([1], [1, 2, 3]), ([1, 2, 3, 4], [4]), ([1, 1], [1, 1])]
    for pred, gold in pairs:
        assert token_f1(pred, gold, "legacy_pr") <= token_f1(pred, gold, "harmonic") + 1e-12


def test_unknown_formula_lists_valid_ones():
    with pytest.raises(ValueError, match="harmonic, legacy_pr"):
        token_f1([1], [1], formula="f1")


def test_token_f1_rejects_untokenized_strings():
    with pytest.raises(TypeError, match="tokenize first"):
        token_f1("2006", "2006")


def test_exact_match_is_raw_equality():
    assert exact_match("2006", "2006") == 1.0
    assert exact_match("2006 ", "2006") == 0.0
    assert exact_match("Paris", "paris") == 0.0
    assert exact_match("", "") == 1.0


# ---------------------------------------------------------------- normalisation (generation protocol)


def test_normalize_casefold_punctuation_whitespace():
    assert normalize_answer("  Hello,   World! ", "fr") == "hello world"
    assert normalize_answer("B/E/A/T/B/O/X", "en") == "b e a t b o x"
    assert normalize_answer("STRASSE", "de") == normalize_answer("straße", "de")  # casefold, not lower


def test_normalize_full_width_forms():
    assert normalize_answer("２００６年", "zh") == "2006年"
    assert normalize_answer("ＡＢＣ", "ja") == "abc"
    assert normalize_answer("2006年。", "zh") == "2006年"
    assert normalize_answer("《红楼梦》", "zh") == "红楼梦"


def test_articles_dropped_only_for_english():
    assert normalize_answer("The Beatles", "en") == "beatles"
    assert normalize_answer("an apple and a pear", "en-US") == "apple and pear"
    assert normalize_answer("Theatre", "en") == "theatre"  # whole words only
    assert normalize_answer("(The Beatles)", "en") == "beatles"
    assert normalize_answer("B/E/A/T", "en") == "b e a t"  # the "a" inside a word is not an article
    assert normalize_answer("The Beatles", "de") == "the beatles"


def test_normalize_keeps_answers_that_would_vanish():
    assert normalize_answer("The", "en") == "the"
    assert normalize_answer("?", "en") == "?"
    assert normalize_answer("", "en") == ""
    assert normalized_em("!", "?", "en") == 0.0
    assert normalized_em("", "?", "en") == 0.0


def test_answer_tokens_space_delimited():
    assert answer_tokens("The Eiffel Tower.", "en") == ["eiffel", "tower"]
    assert answer_tokens("Tour Eiffel", "fr") == ["tour", "eiffel"]


def test_answer_tokens_character_level_for_chinese_and_japanese():
    assert answer_tokens("2006年", "zh") == ["2006", "年"]
    assert answer_tokens("玻璃 Candy乐队", "zh") == ["玻", "璃", "candy", "乐", "队"]
    assert answer_tokens("東京タワー", "ja") == ["東", "京", "タ", "ワ", "ー"]
    assert answer_tokens("人々", "zh-CN") == ["人", "々"]


def test_chinese_character_level_f1():
    assert normalized_f1("2006年", "2006年。", "zh") == 1.0
    assert normalized_em("2006年", "2006年。", "zh") == 1.0
    assert normalized_f1("２００６年", "2006年", "zh") == 1.0
    # pred 北京市 vs gold 北京: overlap 2, P = 2/3, R = 1
    assert normalized_f1("北京市", "北京", "zh") == pytest.approx(0.8)
    assert normalized_f1("北京市", "北京", "zh", "legacy_pr") == pytest.approx(2 / 3)
    assert normalized_f1("2007年", "2006年", "zh") == pytest.approx(0.5)


def test_normalized_f1_english():
    # tokens pred [eiffel, tower, paris] vs gold [eiffel, tower]: P = 2/3, R = 1
    assert normalized_f1("The Eiffel Tower, Paris", "Eiffel Tower", "en") == pytest.approx(0.8)
    assert normalized_f1("London", "Paris", "en") == 0.0


def test_aliases_take_the_max():
    golds = ["United States of America", "USA", "U.S."]
    assert normalized_em("usa", golds, "en") == 1.0
    assert normalized_f1("the United States", golds, "en") == pytest.approx(2 * 0.5 / 1.5)
    assert normalized_f1("USA!", golds, "en", "legacy_pr") == 1.0
    assert normalized_em("Canada", golds, "en") == 0.0


def test_no_gold_answers_is_an_error():
    with pytest.raises(ValueError, match="no gold answers"):
        normalized_em("x", [], "en")


def test_metrics_module_does_not_import_torch():
    # Checked on the source, so a package __init__ that imports torch does not hide or fake the result.
    tree = ast.parse(Path(metrics.__file__).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not any(name.split(".")[0] == "torch" for name in imported)
