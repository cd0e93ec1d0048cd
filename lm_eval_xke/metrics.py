"""Answer metrics: token F1 and exact match, raw (Bi-ZsRE reference) and normalised (generation protocol).

Definitions
-----------
Multiset overlap. ``multiset_overlap(pred, gold)`` walks through ``pred``; each predicted item removes one
equal item from the bag of ``gold`` items, if one is left, and counts one. The result equals
``sum(min(count_pred(t), count_gold(t)))`` over all distinct items ``t``. Items are any hashable values:
tokenizer ids for the teacher-forced protocol, strings from ``answer_tokens`` for the generation protocol.

Token F1. ``token_f1(pred, gold, formula)`` with ``o = multiset_overlap(pred, gold)``,
``P = o / len(pred)`` and ``R = o / len(gold)``:

- both sequences empty: 1.0; exactly one empty: 0.0; ``o == 0``: 0.0 (never a division by zero);
- ``formula="harmonic"``: ``2PR / (P + R)``, the usual F1 (Bi-ZsRE ``evaluate.py`` at HEAD ``254f830``);
- ``formula="legacy_pr"``: ``P * R = o**2 / (len(pred) * len(gold))``, the formula of ``evaluate.py`` before
  ``254f830``, which the Bi-ZsRE ACL 2024 tables most likely used. It is never above the harmonic F1.

Every reported F1 must name its formula.

Exact match. ``exact_match(pred, gold)`` is 1.0 when the two strings are equal character for character,
else 0.0. Nothing is normalised (no case folding, no whitespace stripping), as in Bi-ZsRE ``evaluate.py``.

Answer normalisation (generation protocol). ``normalize_answer(text, lang)`` applies, in order:

1. Unicode NFKC, which also maps full-width forms to their ASCII counterparts (``"２００６"`` -> ``"2006"``);
2. case folding (``str.casefold``);
3. for English (``lang`` "en"), the articles "a", "an" and "the" are dropped: a whitespace-separated word is
   dropped if it is an article once punctuation and symbols at its two ends are removed (``"(The"`` is dropped,
   the "a" of ``"B/E/A/T"`` is not);
4. every character whose Unicode category is punctuation (``P*``) or a symbol (``S*``) becomes a space, so
   ``"2006年。"`` -> ``"2006年"`` and ``"B/E/A/T"`` -> ``"b e a t"``;
5. runs of whitespace become one space, and leading and trailing whitespace is removed.

If a step empties a non-blank text (an answer that is only punctuation, like ``"?"``, or only an article, like
``"The"``), that step is undone, so such answers still have to be matched exactly rather than matching anything
that normalises to the empty string.

``lang`` is a language code; only its primary subtag counts (``"zh-CN"`` and ``"zh_Hans"`` are ``"zh"``).

Answer tokens. ``answer_tokens(text, lang)`` splits ``normalize_answer(text, lang)``:

- Chinese and Japanese (``zh``, ``ja``): each CJK character (Han, kana, Hangul, and CJK marks like 々 and 〇)
  is one token; each maximal run of other non-space characters (ASCII or Latin words, numbers) is one token.
  ``"2006年"`` -> ``["2006", "年"]``, ``"玻璃 Candy"`` -> ``["玻", "璃", "candy"]``;
- every other language: the whitespace-separated words.

Normalised metrics. ``normalized_em(pred, golds, lang)`` is 1.0 if ``normalize_answer(pred, lang)`` equals
``normalize_answer(g, lang)`` for some gold alias ``g``, else 0.0. ``normalized_f1(pred, golds, lang, formula)``
is the maximum over gold aliases of ``token_f1(answer_tokens(pred, lang), answer_tokens(g, lang), formula)``.
``golds`` is one string or a non-empty sequence of aliases.

Contains-match (MLaKE). ``contains_match(pred, golds, lang)`` is 1.0 if the ``answer_tokens`` of some gold
alias occur as a contiguous run in the ``answer_tokens`` of ``pred``, else 0.0: whole words for whitespace
languages (``"Italy"`` is in ``"It is Italy."`` but ``"ita"`` is not in ``"Italian"``), characters for zh/ja
(``"意大利"`` is in ``"是意大利。"``). The first gold (the answer itself) always counts; further aliases count only
when they normalise to at least ``CONTAINS_MIN_ALIAS_CHARS`` characters (3; 2 for zh/ja), so that short aliases
such as "IT" (Italy) or "CU" do not match every "it" of a generated sentence. EM uses every alias.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Hashable, Sequence

F1_FORMULAS = ("harmonic", "legacy_pr")
CHAR_LEVEL_LANGS = ("zh", "ja")
CONTAINS_MIN_ALIAS_CHARS = {"zh": 2, "ja": 2}  # other languages: 3

ARTICLES_EN = frozenset({"a", "an", "the"})
_WHITESPACE = re.compile(r"\s+")
# Han (BMP, compatibility and supplementary planes), kana, Hangul, and the CJK marks 々 〆 〇.
_CJK = (
    "\u1100-\u11ff\u3005-\u3007\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f"
)
_CHAR_LEVEL_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


def multiset_overlap(pred: Sequence[Hashable], gold: Sequence[Hashable]) -> int:
    """Number of predicted items that each remove one matching item from the bag of gold items."""
    gold_bag = Counter(gold)
    return sum(min(count, gold_bag[item]) for item, count in Counter(pred).items())


def token_f1(pred: Sequence[Hashable], gold: Sequence[Hashable], formula: str = "harmonic") -> float:
    """Token F1 of two token sequences; ``formula`` is "harmonic" (2PR/(P+R)) or "legacy_pr" (P*R)."""
    if formula not in F1_FORMULAS:
        raise ValueError(f"unknown F1 formula {formula!r}; valid formulas: {', '.join(F1_FORMULAS)}")
    # A str would silently be scored per character; callers must tokenize first.
    if isinstance(pred, str) or isinstance(gold, str):
        raise TypeError("token_f1 takes token sequences, not strings: tokenize first (e.g. with answer_tokens)")
    if not pred and not gold:
        return 1.0
    if not pred or not gold:
        return 0.0
    overlap = multiset_overlap(pred, gold)
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred)
    recall = overlap / len(gold)
    if formula == "legacy_pr":
        return precision * recall
    return 2 * precision * recall / (precision + recall)


def exact_match(pred: str, gold: str) -> float:
    """1.0 if the raw strings are identical, else 0.0 (no normalisation)."""
    return float(pred == gold)


def base_lang(lang: str) -> str:
    """Primary language subtag, lower case: "zh-CN" -> "zh"."""
    return re.split(r"[-_]", lang.strip().lower(), maxsplit=1)[0]


def _is_punctuation_or_symbol(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PS"


def _strip_punctuation_and_symbols(text: str) -> str:
    return "".join(" " if _is_punctuation_or_symbol(ch) else ch for ch in text)


def _is_article(word: str) -> bool:
    """True for "the", "(the", "a," ...: an English article with punctuation or symbols only at its ends."""
    start, end = 0, len(word)
    while start < end and _is_punctuation_or_symbol(word[start]):
        start += 1
    while end > start and _is_punctuation_or_symbol(word[end - 1]):
        end -= 1
    return word[start:end] in ARTICLES_EN


def _collapse(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def normalize_answer(text: str, lang: str) -> str:
    """NFKC, casefold, English articles dropped, punctuation/symbols to spaces, whitespace collapsed."""
    folded = _collapse(unicodedata.normalize("NFKC", text).casefold())
    stripped = _collapse(_strip_punctuation_and_symbols(folded))
    if not stripped:
        # Only punctuation or symbols: keep them, so "?" does not match "!" or "".
        return folded
    if base_lang(lang) == "en":
        without_articles = " ".join(w for w in folded.split() if not _is_article(w))
        # An answer that is only articles ("The") keeps them.
        return _collapse(_strip_punctuation_and_symbols(without_articles)) or stripped
    return stripped


def answer_tokens(text: str, lang: str) -> list[str]:
    """Tokens of the normalised answer: CJK characters for zh/ja, whitespace words otherwise."""
    normalized = normalize_answer(text, lang)
    if base_lang(lang) in CHAR_LEVEL_LANGS:
        return _CHAR_LEVEL_TOKEN.findall(normalized)
    return normalized.split()


def _aliases(golds: str | Sequence[str]) -> list[str]:
    aliases = [golds] if isinstance(golds, str) else list(golds)
    if not aliases:
        raise ValueError("no gold answers given: pass one string or a non-empty list of aliases")
    return aliases


def normalized_em(pred: str, golds: str | Sequence[str], lang: str) -> float:
    """Exact match after ``normalize_answer``, maximised over gold aliases."""
    norm_pred = normalize_answer(pred, lang)
    return max(float(norm_pred == normalize_answer(g, lang)) for g in _aliases(golds))


def normalized_f1(pred: str, golds: str | Sequence[str], lang: str, formula: str = "harmonic") -> float:
    """Token F1 over ``answer_tokens``, maximised over gold aliases."""
    pred_tokens = answer_tokens(pred, lang)
    return max(token_f1(pred_tokens, answer_tokens(g, lang), formula) for g in _aliases(golds))


def _contains_run(tokens: Sequence[str], run: Sequence[str]) -> bool:
    """True if ``run`` (non-empty) occurs as a contiguous sub-sequence of ``tokens``."""
    n = len(run)
    return n > 0 and any(list(tokens[i : i + n]) == list(run) for i in range(len(tokens) - n + 1))


def contains_match(pred: str, golds: str | Sequence[str], lang: str) -> float:
    """1.0 if the answer, or an alias long enough, occurs as whole tokens in ``pred`` (see module docstring)."""
    aliases = _aliases(golds)
    min_chars = CONTAINS_MIN_ALIAS_CHARS.get(base_lang(lang), 3)
    pred_tokens = answer_tokens(pred, lang)
    for position, gold in enumerate(aliases):
        gold_tokens = answer_tokens(gold, lang)
        if position > 0 and len("".join(gold_tokens)) < min_chars:
            continue
        if _contains_run(pred_tokens, gold_tokens):
            return 1.0
    return 0.0
