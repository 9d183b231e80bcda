"""Hand-worked examples for tasks/_metrics.py (LongBench and SCBench scoring).

Every expected value is derived by hand in the comment next to it, from the metric's definition.
"""
import math

import pytest

from kvbench.tasks import _metrics as M


# ---------------------------------------------------------------- qa_f1 (SQuAD normalisation)

def test_qa_f1():
    # "The Eiffel Tower" -> "eiffel tower" (article dropped) == "eiffel tower" -> F1 = 1
    assert M.qa_f1("The Eiffel Tower", "Eiffel Tower") == 1.0
    # pred [in, paris, france], gold [paris]: overlap 1, P = 1/3, R = 1, F1 = 2*(1/3)/(4/3) = 0.5
    assert M.qa_f1("in Paris, France", "Paris") == pytest.approx(0.5)
    # pred [cat, cat] ("the" dropped), gold [cat]: overlap min(2,1) = 1, P = 1/2, R = 1, F1 = 2/3
    assert M.qa_f1("the cat cat", "cat") == pytest.approx(2 / 3)
    # no common token -> 0
    assert M.qa_f1("red car", "blue bike") == 0.0
    # punctuation only -> empty token list -> 0 (no division by zero)
    assert M.qa_f1("...", "Paris") == 0.0


def test_best_of_takes_max_over_answers():
    # F1("Paris", "London") = 0, F1("Paris", "Paris") = 1 -> max 1
    assert M.best_of(M.qa_f1, "Paris", ["London", "Paris"]) == 1.0
    # F1 vs "in Paris, France" = 0.5 (above), vs "Lyon" = 0 -> 0.5
    assert M.best_of(M.qa_f1, "Paris", ["Lyon", "in Paris, France"]) == pytest.approx(0.5)
    # no answers -> 0
    assert M.best_of(M.qa_f1, "Paris", []) == 0.0


# ---------------------------------------------------------------- qa_f1_zh (jieba words)

def test_qa_f1_zh():
    # jieba splits "北京和上海" into 北京 / 和 / 上海 (checked explicitly so the arithmetic below is grounded)
    assert M.jieba_cut("北京和上海") == ["北京", "和", "上海"]
    # pred words [北京, 和, 上海], gold [上海]: overlap 1, P = 1/3, R = 1 -> F1 = 0.5
    assert M.qa_f1_zh("北京和上海", "上海") == pytest.approx(0.5)
    # identical words; the trailing "。" normalises to "" and is dropped -> F1 = 1
    assert M.qa_f1_zh("林若溪。", "林若溪") == 1.0
    # disjoint words -> 0
    assert M.qa_f1_zh("北京", "上海") == 0.0


def test_normalize_zh_answer():
    # lower-case, Chinese and English punctuation removed, all spaces removed
    assert M.normalize_zh_answer("Hello， 世界！ (ok)") == "hello世界ok"


# ---------------------------------------------------------------- LongBench rouge-L (`rouge` package semantics)

def test_rouge_l_identical():
    # distinct words: hyp {the, cat, sat, on, mat} n = 5, ref same m = 5, LCS words union = 5
    # P = R = 1, F = 2*1*1 / (1 + 1 + 1e-8)
    assert M.rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(2 / (2 + 1e-8), abs=1e-12)


def test_rouge_l_partial_and_duplicates():
    # LCS(the cat sat, the cat ran) = "the cat" -> 2 of 3 distinct words each side: P = R = 2/3,
    # F = 2 * (4/9) / (4/3 + 1e-8)
    assert M.rouge_l("the cat ran", "the cat sat") == pytest.approx(2 * (4 / 9) / (4 / 3 + 1e-8))
    # words are counted as sets: hyp {the} n = 1, ref {the, cat} m = 2, hits {the} = 1: P = 1, R = 1/2,
    # F = 2 * 0.5 / (1.5 + 1e-8)
    assert M.rouge_l("the the the", "the cat") == pytest.approx(1 / (1.5 + 1e-8))


def test_rouge_l_is_summary_level():
    # sentences split on ".": hyp [a b, c d], ref [c d, a b]. Union of per-pair LCS words = {a, b, c, d}
    # -> P = R = 1 (a plain LCS over the flat token lists would only give 2/4).
    assert M.rouge_l("a b. c d", "c d. a b") == pytest.approx(2 / (2 + 1e-8), abs=1e-12)
    # which LCS is read back matters: ref sentences [a b], [a]; hyp [b a]. For "a b" vs "b a" both "a" and "b"
    # are an LCS; the package's read-back (ties move back in the hypothesis) picks "b", and "a" comes from the
    # second sentence -> union {a, b}: P = R = 1 (picking "a" twice would give 1/2 each)
    assert M.rouge_l("b a", "a b. a") == pytest.approx(2 / (2 + 1e-8), abs=1e-12)
    # empty prediction has no sentence -> the package raises and LongBench scores 0
    assert M.rouge_l("", "a b") == 0.0
    assert M.rouge_l("...", "a b") == 0.0


def test_rouge_l_zh():
    # "北京和上海" -> "北京 和 上海" (n = 3 distinct), gold "上海" (m = 1), hit 上海: P = 1/3, R = 1,
    # F = 2*(1/3) / (4/3 + 1e-8) ~= 0.5
    assert M.rouge_l_zh("北京和上海", "上海") == pytest.approx(0.5, abs=1e-7)
    assert M.rouge_l_zh("上海", "上海") == pytest.approx(1.0, abs=1e-7)
    assert M.rouge_l_zh("北京", "上海") == 0.0


# ---------------------------------------------------------------- classification

CLASSES = ["Sport", "Sports news", "Finance"]


def test_classification_overlapping_class_names():
    # found {Sport, Sports news}; "Sport" is a substring of the right class "Sports news" -> not counted
    # -> found {Sports news}, right class among 1 -> 1.0
    assert M.classification("Sports news", "Sports news", all_classes=CLASSES) == 1.0
    # right class "Sport": "Sports news" is not a substring of "Sport", so both count -> 1/2
    assert M.classification("Sports news", "Sport", all_classes=CLASSES) == 0.5


def test_classification_plain():
    # two classes named, one right -> 1/2
    assert M.classification("Finance or Sport", "Sport", all_classes=CLASSES) == 0.5
    # right class not named -> 0
    assert M.classification("Weather", "Sport", all_classes=CLASSES) == 0.0
    # only the right class -> 1
    assert M.classification("Finance", "Finance", all_classes=CLASSES) == 1.0


def test_classification_rule_applies_to_every_overlapping_match():
    # Both "Sport" and "Sports news" are substrings of the right class "Sports news today": neither counts
    # -> 1.0. (LongBench's list.remove inside its loop skips the second one and would give 1/2.)
    classes = ["Sport", "Sports news", "Sports news today"]
    assert M.classification("Sports news today", "Sports news today", all_classes=classes) == 1.0


# ---------------------------------------------------------------- count / retrieval

def test_count_score():
    assert M.count_score("3", "3") == 1.0                                          # [3] -> 1/1
    assert M.count_score("There are 3 unique paragraphs out of 5", "3") == 0.5      # [3, 5] -> 1/2
    assert M.count_score("13", "3") == 0.0                                         # whole number 13 != 3
    assert M.count_score("none", "3") == 0.0                                       # no number -> 0


def test_retrieval_en_zh():
    assert M.retrieval("Paragraph 12", "Paragraph 12") == 1.0                      # [12] -> 1
    assert M.retrieval("Paragraph 1 or Paragraph 12", "Paragraph 12") == 0.5       # [1, 12] -> 1/2
    assert M.retrieval("paragraph twelve", "Paragraph 12") == 0.0                  # no digits
    assert M.retrieval_zh("段落3", "段落3") == 1.0
    assert M.retrieval_zh("段落3和段落30", "段落3") == 0.5                           # [3, 30] -> 1/2
    assert M.retrieval_zh("不知道", "段落3") == 0.0


# ---------------------------------------------------------------- code similarity (fuzzywuzzy ratio)

def test_fuzz_ratio():
    # "abcd" vs "abce": matching block "abc" (3 chars), ratio = 2*3/8 = 0.75 -> 75
    assert M.fuzz_ratio("abcd", "abce") == 75
    # "kitten" vs "sitting": longest block "itt" (3), then "n" in the right parts ("en" / "ing") -> 4 matches,
    # ratio = 2*4/13 = 0.615 -> 62
    assert M.fuzz_ratio("kitten", "sitting") == 62
    assert M.fuzz_ratio("", "") == 100   # equal strings, even empty
    assert M.fuzz_ratio("", "x") == 0    # one empty string


def test_code_sim():
    # leading newlines dropped, first line "    return x" equals the answer -> 1.0
    assert M.code_sim("\n    return x\nfoo()", "    return x") == 1.0
    # comment line skipped; "return y" vs "return x": 7 matching chars "return ", ratio 14/16 = 0.875
    # -> round(87.5) = 88 (round half to even) -> 0.88
    assert M.code_sim("# comment\nreturn y", "return x") == 0.88
    # fence and comment lines skipped, the next line is "" -> ratio("", "a") = 0
    assert M.code_sim("```python\n# x\n", "a") == 0.0
    # "//" comment skipped -> "b" == "b"
    assert M.code_sim("a // c\nb", "b") == 1.0
    # indentation matters: "return ranked[:n]" (17 chars) vs 8 spaces + the same (25): 2*17/42 = 0.8095 -> 81
    assert M.code_sim("return ranked[:n]", "        return ranked[:n]") == 0.81


# ---------------------------------------------------------------- SCBench simple matchers

def test_label_in_prediction():
    assert M.label_in_prediction("It was the Albatross.", ["the Albatross"]) == 1.0   # upper-cased substring
    assert M.label_in_prediction("Jonas", ["Jonas Okafor"]) == 0.0                    # label longer than pred
    assert M.label_in_prediction("eleven sailors", ["Eleven", "11"]) == 1.0            # any label


def test_kv_match():
    assert M.kv_match("The value is abc-123.", "abc-123") == 1.0
    assert M.kv_match("The value is ABC-123.", "abc-123") == 0.0   # case-sensitive
    assert M.kv_match("", "abc-123") == 0.0


def test_string_match_all():
    # "x" and "y" found in "x = 1, y = 2", "z" not -> 2/3 rounded to 0.67
    assert M.string_match_all("X = 1, Y = 2", ["x", "y", "z"]) == 0.67
    assert M.string_match_all("X = 1", ["x"]) == 1.0
    assert M.string_match_all("X = 1", ["q", "r"]) == 0.0


def test_passkey_and_first_number():
    assert M.passkey_match("The pass key is 71432.", "71432") == 1.0
    assert M.passkey_match("7 1432", "71432") == 0.0            # first digit run is "7"
    assert M.passkey_match("no number", "71432") == 0.0
    assert M.first_number_match("The largest number is 98, then 97", 98) == 1.0
    assert M.first_number_match("98.6", 98) == 1.0              # int label: int(float("98.6")) = 98
    assert M.first_number_match("-5", "5") == 1.0               # signs are not read, as in InfiniteBench
    assert M.first_number_match("3.50", "3.5") == 1.0           # float label: 3.50 == 3.5
    assert M.first_number_match("none", 98) == 0.0


def test_choice_match():
    labels = ["Three weeks", "C"]
    assert M.choice_match("C. Three weeks", labels) == 1.0          # first character C
    assert M.choice_match("Three weeks", labels) == 1.0             # whole prediction is a label
    assert M.choice_match("The answer is: C", labels) == 1.0        # text after "answer is:" starts with C
    assert M.choice_match("The correct option is D", labels) == 0.0  # after "option is" comes D
    assert M.choice_match("I think it is B", labels) == 0.0         # first word inside "ABCD" is B
    assert M.choice_match("A", labels) == 0.0
    assert M.choice_match("  ", labels) == 0.0


def test_char_f1_zh():
    assert M.char_f1_zh("五年。", "五年") == 1.0
    # chars [在 城 里 教 书] vs [城 里 教 书]: overlap 4, P = 4/5, R = 1 -> F1 = 1.6/1.8 = 8/9
    assert M.char_f1_zh("在城里教书", "城里教书") == pytest.approx(8 / 9)
    # [张 家 村] vs [李 家 村]: overlap 2, P = R = 2/3 -> 2/3
    assert M.char_f1_zh("张家村", "李家村") == pytest.approx(2 / 3)


# ---------------------------------------------------------------- rougeLsum (rouge_score semantics)

def test_rouge_lsum():
    assert M.rouge_lsum("the cat sat", "the cat sat") == 1.0
    # ref one line [the cat sat on the mat] (m = 6); prediction lines [the cat], [sat on mat] (n = 5).
    # union of LCS positions in ref: {0,1} and {2,3,5} -> the cat sat on mat, all within counts -> 5 hits.
    # P = 5/5, R = 5/6, F = 2*(5/6)/(11/6) = 10/11
    assert M.rouge_lsum("the cat\nsat on mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    # tokenizer lower-cases and drops punctuation -> identical
    assert M.rouge_lsum("The CAT!", "the cat") == 1.0
    # ref [the cat], pred [the the the]: one LCS hit "the": P = 1/3, R = 1/2, F = 2*(1/6)/(5/6) = 0.4
    assert M.rouge_lsum("the the the", "the cat") == pytest.approx(0.4)
    assert M.rouge_lsum("", "the cat") == 0.0
    # read-back ties move up in the reference: ref [a b] vs line [b a] yields position 0 ("a"), and line [a]
    # also position 0 -> union {0}: 1 hit. P = 1/3, R = 1/2, F = 0.4 (the other tie rule would give 0.8)
    assert M.rouge_lsum("b a\na", "a b") == pytest.approx(0.4)


# ---------------------------------------------------------------- BLEU with smoothing 4, RepoQA

def test_sentence_bleu():
    a = "a b c d".split()
    # all n-gram precisions 1, BP = exp(1 - 4/4) = 1
    assert M.sentence_bleu(a, a) == pytest.approx(1.0)
    # hyp a b c d e vs ref a b c d f: p = 4/5, 3/4, 2/3, 1/2; BP = 1 -> (0.8*0.75*(2/3)*0.5)^(1/4) = 0.2^(1/4)
    assert M.sentence_bleu("a b c d f".split(), "a b c d e".split()) == pytest.approx(0.2 ** 0.25)
    # hyp = ref = a b c: p1..p3 = 1, no 4-gram -> smoothed p4 = 1 / (2 * 5 / ln 3) = ln(3)/10; BP = 1
    assert M.sentence_bleu("a b c".split(), "a b c".split()) == pytest.approx((math.log(3) / 10) ** 0.25)
    # hyp a b vs ref a b c d: p1 = p2 = 1, p3 -> ln2/10, p4 -> ln2/20; BP = exp(1 - 4/2)
    expected = math.exp(-1) * ((math.log(2) / 10) * (math.log(2) / 20)) ** 0.25
    assert M.sentence_bleu("a b c d".split(), "a b".split()) == pytest.approx(expected)
    # no unigram in common -> 0
    assert M.sentence_bleu("a b".split(), "x y".split()) == 0.0


def test_extract_code():
    out = "Here it is:\n```python\ndef f():\n    return 1\n```\nand\n```\nx = 2\n```"
    assert M.extract_code(out) == "def f():\n    return 1\n"          # first fenced block's body
    assert M.extract_code("  def g(): pass  ") == "def g(): pass"     # no block: whole output, stripped


F1 = "def parse_version(text):\n    parts = text.strip().split('.')\n    return tuple(int(p) for p in parts)"
F2 = "def chunked(items, size):\n    return [items[i:i + size] for i in range(0, len(items), size)]"


def test_repoqa_match():
    needles = [("parse_version", F1), ("chunked", F2)]
    pred = f"```python\n{F1}\n```"
    # identical function -> BLEU 1 with parse_version, lower with chunked -> best is the asked one, >= 0.8
    assert M.code_bleu(M.extract_code(pred), F1) == pytest.approx(1.0)
    assert M.repoqa_match(pred, "parse_version", needles) == 1.0
    # the same output asked about "chunked": best match is parse_version -> 0
    assert M.repoqa_match(pred, "chunked", needles) == 0.0
    # only the signature (2 tokens): best needle is parse_version (11 tokens), but the brevity penalty
    # alone is exp(1 - 11/2) ~= 0.011 < 0.8 -> 0
    assert M.repoqa_match("def parse_version(text):", "parse_version", needles) == 0.0
