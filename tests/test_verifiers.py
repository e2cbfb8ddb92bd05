"""Verifiers: every decision asserted both ways, adversarial answers, bounded time, bad specs refused."""
from __future__ import annotations

import random
import threading
import time

import pytest
import yaml
from opd.data import task
from opd.data import verifiers as v
from opd.data.verifiers import (ExactSpec, IntegerSpec, MathSpec, NoneSpec, RegexSpec, last_boxed, numeral,
                                parse_spec, verifier)
from pydantic import ValidationError

MATH = verifier(MathSpec())

# ---------------------------------------------------------------- specs


@pytest.mark.parametrize("text, cls", [
    ("kind: integer", v.IntegerVerifier),
    ("kind: exact\ncasefold: true", v.ExactVerifier),
    ("kind: math\ntimeout_s: 0.5", v.MathVerifier),
    ("kind: regex\npattern: 'Answer: *(-?[0-9]+)'", v.RegexVerifier),
    ("kind: none", v.NoVerifier),  # YAML reads `none` as a string, not null
])
def test_spec_from_yaml_picks_the_verifier(text, cls):
    assert type(verifier(parse_spec(yaml.safe_load(text)))) is cls


@pytest.mark.parametrize("data, field, words", [
    ({"kind": "regex", "pattern": "(a"}, "regex.pattern", "does not compile"),
    ({"kind": "regex", "pattern": "Answer: -?[0-9]+"}, "regex.pattern", "0 capture groups"),
    ({"kind": "regex", "pattern": "(a)(b)"}, "regex.pattern", "2 capture groups"),
    ({"kind": "integer", "delimiter": "  "}, "integer.delimiter", "blank"),
    ({"kind": "integer", "delimiter": ""}, "integer.delimiter", "at least 1"),
    ({"kind": "exact", "case_fold": True}, "exact.case_fold", "Extra inputs"),
    ({"kind": "math", "timeout_s": float("inf")}, "math.timeout_s", "finite"),
    ({"kind": "math", "timeout_s": 0}, "math.timeout_s", "greater than 0"),
    ({"kind": "math", "max_answer_chars": 10_000}, "math.max_answer_chars", "less than or equal"),
    ({"kind": "regex", "pattern": "(x)", "timeout_s": float("nan")}, "regex.timeout_s", "finite"),
    ({"kind": "sympy"}, "", "'integer', 'exact', 'math', 'regex', 'none'"),
    ({"delimiter": "#"}, "", "kind"),
])
def test_bad_spec_refused_naming_the_field(data, field, words):
    with pytest.raises(ValidationError) as e:
        parse_spec(data)
    err = e.value.errors()[0]
    assert ".".join(map(str, err["loc"])) == field
    assert words in str(e.value)


def test_specs_are_frozen():
    with pytest.raises(ValidationError):
        IntegerSpec().delimiter = ";"  # type: ignore[misc]


# ---------------------------------------------------------------- integer: today's addition rule


def _variants(ex: task.Example) -> list[str]:
    """The ground truth plus the ways a completion goes wrong (or right) around the delimiter."""
    wrong = str(int(ex.answer) + 1)
    return [ex.completion, ex.completion + " ", ex.completion.replace("#", "# "), ex.completion.split("#")[0],
            ex.completion.rsplit("#", 1)[0] + "#" + wrong, ex.completion + "#", ex.completion + "#" + ex.answer,
            "#" + ex.answer + "#" + wrong, ex.answer, "0" + ex.completion.rsplit("#", 1)[0] + "#0" + ex.answer, ""]


def test_integer_reproduces_task_is_correct_on_addition_examples():
    iv = verifier(IntegerSpec())
    exs = task.generate(150, num_terms=3, max_digits=4, seed=7, any_order=True)
    verdicts = []
    for ex in exs:
        for comp in _variants(ex):
            assert iv.is_correct(comp, ex.answer) == task.is_correct(comp, ex.answer), (comp, ex.answer)
            assert iv.extract(comp) == task.extract_answer(comp)
            verdicts.append(iv.is_correct(comp, ex.answer))
        assert iv.answer_ok(ex.answer) and task.answer_parses(ex.answer)
    assert True in verdicts and False in verdicts


@pytest.mark.parametrize("answer, ok", [("12", True), ("-3", True), (" 7 ", True), ("007", True),
                                        ("1.5", False), ("+4", False), ("", False), ("--1", False),
                                        ("²", False), ("١٢", False), ("１２", False)])
def test_integer_answer_ok_is_ascii_integers(answer, ok):
    assert verifier(IntegerSpec()).answer_ok(answer) is ok


def test_integer_custom_delimiter_and_exact_string_rule():
    iv = verifier(IntegerSpec(delimiter="Answer:"))
    assert iv.is_correct("3+4 is 7. Answer: 7", "7")
    assert not iv.is_correct("3+4 is 7. Answer: 07", "7")  # a string rule, as the addition task's
    assert not iv.is_correct("3+4 is 7. Answer: 7.0", "7")
    assert not iv.is_correct("3+4 is 7 # 7", "7")


# ---------------------------------------------------------------- exact


def test_exact_normalises_nfkc_whitespace_and_optional_case():
    ev = verifier(ExactSpec())
    assert ev.is_correct("  New\u00a0 York\n", "New York")
    assert ev.is_correct("１２", "12")  # full-width digits are compatibility forms of ASCII
    assert ev.is_correct("x²", "x2")  # NFKC folds the superscript, as documented
    assert not ev.is_correct("١٢", "12")  # another script's digits are not folded
    assert not ev.is_correct("new york", "New York")
    assert verifier(ExactSpec(casefold=True)).is_correct("NEW YORK", "new york")
    assert not ev.is_correct("   ", "")
    assert not ev.answer_ok(" \n ") and ev.answer_ok("x")


def test_exact_with_delimiter_reads_after_the_last_one():
    ev = verifier(ExactSpec(delimiter="####"))
    assert ev.is_correct("work #### wrong #### Paris ", "Paris")
    assert not ev.is_correct("Paris", "Paris")  # no delimiter: no answer
    assert ev.extract("a #### ") is None


# ---------------------------------------------------------------- math


@pytest.mark.parametrize("completion, answer", [
    (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"so \boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{1/2}", r"\dfrac{1}{2}"),
    (r"\boxed{\frac{\sqrt{4}}{2}}", "1"),  # nested braces, symbolic
    (r"first \boxed{3}, then correcting: \boxed{4}", "4"),
    (r"\boxed{ 12 }", "12"),
    (r"\boxed{12.0}", "12"),
    (r"The answer is \boxed{46}.", "46"),
    (r"The answer is $\boxed{-\frac{3}{4}}$", "-0.75"),
    (r"\boxed {7}", "7"),
    (r"\boxed{x+1}", "1+x"),
    (r"\boxed{1{,}000}", "1000"),
    (r"\boxed{12}", r"\boxed{12}"),  # a boxed answer is unboxed
])
def test_math_accepts_equivalent_forms(completion, answer):
    assert MATH.is_correct(completion, answer)


@pytest.mark.parametrize("completion, answer", [
    (r"\boxed{12}", "21"),
    (r"\boxed{-3}", "3"),
    (r"\boxed{3}", "-3"),
    (r"first \boxed{4}, then \boxed{3}", "4"),  # the last box counts
    ("the answer is 12", "12"),  # no box
    (r"\boxed{}", "0"),
    (r"\boxed{12", "12"),  # cut off
    (r"\boxed{4} and then \boxed{4", "4"),  # the last box is cut off: no answer, not the earlier one
    (r"\boxed 4", "4"),  # only the braced form
    (r"\boxed{\sqrt{4}}", "3"),
    (r"\boxed{0.333}", r"\frac{1}{3}"),  # numerals compare exactly
    (r"\boxed{\frac{1}{0}}", "0"),
    (r"\boxed{²}", "2"),  # non-ASCII numerals are never an answer
    (r"\boxed{3²}", "3"),  # math-verify alone would read this as 3
    (r"\boxed{3²}", "9"),
    (r"\boxed{١٢}", "12"),
    (r"\boxed{١٢}", "١٢"),
    (r"\boxed{½}", "0.5"),
])
def test_math_refuses_wrong_or_missing_answers(completion, answer):
    assert not MATH.is_correct(completion, answer)


def test_math_checks_the_word_problem_task():
    """The shipped word-problem solutions end in \\boxed{N}: each is right for its answer, wrong for a neighbour."""
    from opd.data import word_problems

    for ex in word_problems.generate(100, seed=3):
        assert MATH.answer_ok(ex.answer)
        assert MATH.is_correct(ex.completion, ex.answer)
        assert not MATH.is_correct(ex.completion, str(int(ex.answer) + 1))
        assert not MATH.is_correct(ex.completion.replace("\\boxed", "boxed"), ex.answer)


def test_last_boxed_handles_nesting_escapes_and_caps():
    assert last_boxed(r"\boxed{\frac{\sqrt{4}}{2}}", 100) == r"\frac{\sqrt{4}}{2}"
    assert last_boxed(r"\boxed{\{1, 2\}}", 100) == r"\{1, 2\}"  # escaped braces neither open nor close
    assert last_boxed(r"\boxed{\}", 100) is None
    assert last_boxed(r"\boxed{a}}}", 100) == "a"
    assert last_boxed(r"\boxed{" + "1" * 50 + "}", 50) == "1" * 50
    assert last_boxed(r"\boxed{" + "1" * 51 + "}", 50) is None
    assert last_boxed("\\", 10) is None and last_boxed("\\boxed", 10) is None


@pytest.mark.parametrize("text, value", [("12", 12), (" -0.5 ", -0.5), ("$1/2$", 0.5), (r"-\frac{3}{4}", -0.75),
                                         (r"\tfrac{ 1 }{ 8 }", 0.125), (".5", 0.5), ("12.", 12),
                                         ("١٢", None), ("1 2", None), ("1/0", None), ("x", None), ("", None)])
def test_numeral(text, value):
    got = numeral(text)
    assert (got is None) if value is None else (got == value)


def test_math_symbolic_off_compares_numerals_only():
    strict = verifier(MathSpec(symbolic=False))
    assert strict.is_correct(r"\boxed{\frac{1}{2}}", "0.5")
    assert not strict.is_correct(r"\boxed{\frac{\sqrt{4}}{2}}", "1")
    assert strict.answer_ok("0.5") and not strict.answer_ok(r"\sqrt{2}")


@pytest.mark.parametrize("answer, ok", [("0.5", True), (r"\frac{1}{2}", True), (r"\sqrt{2}", True), ("x^2+1", True),
                                        ("", False), ("  ", False), ("{", False), ("²", False), ("١٢", False),
                                        ("1" * 10_000, False)])
def test_math_answer_ok(answer, ok):
    assert MATH.answer_ok(answer) is ok


def test_math_10kb_completion_is_checked_fast():
    prose = ("We add the numbers step by step, carrying where needed. " * 200)[:10_000]
    cases = [(prose + r" The answer is \boxed{46}.", "46", True),
             (prose + r" The answer is \boxed{47}.", "46", False),
             (r"\boxed{" + "1" * 10_000 + "}", "1" * 10_000, False),  # a 10 kB answer is no answer
             (prose + r"\boxed{" + "x+" * 5_000 + "1}", "1", False),  # 10 kB of algebra: capped, not parsed
             ("{" * 10_000 + r"\boxed{" + "{" * 10_000, "1", False),
             ((r"\boxed{" * 2_000) + "2" + ("}" * 2_000), "2", True)]  # box in box: the innermost is last
    for completion, answer, want in cases:
        t0 = time.perf_counter()
        got = MATH.is_correct(completion, answer)
        took = time.perf_counter() - t0
        assert got is want and took < 0.1, (completion[:40], got, took)


@pytest.mark.timeout(120)  # a regression hangs: fail, do not wait for the suite's 20 min
def test_math_runaway_expression_times_out_and_the_checker_recovers():
    """9^(9^(9^9)) would run sympy for ever: the child is killed at timeout_s, the check counts wrong,
    and the next check (on another thread, where math-verify's own signal timeout cannot run) works."""
    quick = verifier(MathSpec(timeout_s=0.5))
    t0 = time.perf_counter()
    assert not quick.is_correct(r"\boxed{9^{9^{9^{9}}}}", "5")
    assert time.perf_counter() - t0 < 5
    out: list[bool] = []
    th = threading.Thread(target=lambda: out.append(quick.is_correct(r"\boxed{\sqrt{16}}", "4")))
    th.start()
    th.join(120)
    assert out == [True]


def test_math_child_that_cannot_start_is_a_permanent_error(monkeypatch):
    monkeypatch.setattr(v.sys, "executable", "/bin/false")
    with pytest.raises(v.VerifierUnavailable, match="exited with code 1.*symbolic: false"):
        v._MathVerifyChild().ask("equal", "1", "1", 1.0)


# ---------------------------------------------------------------- regex


def test_regex_takes_the_last_match_in_the_window():
    rv = verifier(RegexSpec(pattern=r"Answer: *(-?[0-9]+)"))
    assert rv.is_correct("Answer: 3 ... no wait. Answer: 4", "4")
    assert not rv.is_correct("Answer: 3 ... no wait. Answer: 4", "3")
    assert not rv.is_correct("the answer is 4", "4")
    far = "Answer: 4" + " " * 5000
    assert not rv.is_correct(far, "4")  # past the 4096-character window
    assert verifier(RegexSpec(pattern=r"Answer: *(-?[0-9]+)", window_chars=6000)).is_correct(far, "4")


def test_regex_normalises_and_casefolds_the_capture():
    rv = verifier(RegexSpec(pattern=r"(?s)Final: *(.*)$", casefold=True))
    assert rv.is_correct("Final:  NEW\n  York ", "new york")
    assert not verifier(RegexSpec(pattern=r"Final: *(\w+)?;")).is_correct("Final: ;", "")  # group unset


@pytest.mark.timeout(120)  # a regression hangs: fail, do not wait for the suite's 20 min
def test_regex_catastrophic_backtracking_is_cut_off():
    rv = verifier(RegexSpec(pattern=r"((?:a|aa)+)c", timeout_s=0.05))
    t0 = time.perf_counter()
    assert not rv.is_correct("a" * 60 + "b", "a")
    assert time.perf_counter() - t0 < 2
    assert rv.is_correct("aaac", "aaa")


# ---------------------------------------------------------------- none, and junk for every kind


def test_none_needs_no_answers_and_scores_nothing():
    nv = verifier(NoneSpec())
    assert nv.needs_answers is False and nv.answer_ok("anything") and nv.extract("#12") is None
    assert not nv.is_correct(r"\boxed{12}", "12")
    assert all(verifier(s).needs_answers for s in (IntegerSpec(), ExactSpec(), MathSpec(), RegexSpec(pattern="(x)")))


def _junk(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    atoms = ["\\boxed{", "{", "}", "\\", "#", "$", "\\frac", "1", "-", ".", "/", " ", "\n", "\x00", "\ud800",
             "²", "١٢", "½", "é", "\u202e", "\ufeff", "Answer:", "9^{9^{9}}", "\xff\xfe"]
    return [bytes(range(256)).decode("latin-1"), "\ud800\udfff", ""] + [
        "".join(rng.choice(atoms) for _ in range(rng.randint(1, 60))) for _ in range(n)]


@pytest.mark.parametrize("spec", [IntegerSpec(), ExactSpec(casefold=True), MathSpec(symbolic=False),
                                  RegexSpec(pattern=r"Answer:(.*)"), NoneSpec()], ids=lambda s: s.kind)
def test_junk_never_raises(spec):
    vv = verifier(spec)
    junk = _junk(300, seed=1)
    t0 = time.perf_counter()
    for c in junk:
        for a in ("12", c):
            assert vv.is_correct(c, a) in (True, False)
        assert vv.extract(c) is None or isinstance(vv.extract(c), str)
        assert vv.answer_ok(c) in (True, False)
        assert vv.is_correct(None, "1") is False and vv.is_correct(c, None) is False  # type: ignore[arg-type]
    assert time.perf_counter() - t0 < 5


def test_junk_through_math_verify_never_raises():
    """A few junk boxes reach the math-verify child (symbolic on)."""
    for c in _junk(15, seed=2):
        assert MATH.is_correct(c, "12") in (True, False)
        assert MATH.answer_ok(c) in (True, False)
