"""Great Expectations rejects bad datasets and names the offending rows."""
import pandas as pd
import pytest

from opd.data.validate import validate
from opd.models import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _frames(train_rows, eval_rows):
    cols = ["id", "prompt", "answer"]
    return pd.DataFrame(train_rows, columns=cols), pd.DataFrame(eval_rows, columns=cols)


def test_clean_dataset_passes(tok):
    tr, ev = _frames([("a", "1+2=", "3"), ("b", "3+4=", "7")], [("e", "5+6=", "11")])
    rep = validate(tr, ev, tok, 1, 32)
    assert rep.success, rep.message()


def test_duplicate_id_is_rejected_with_rows(tok):
    tr, ev = _frames([("a", "1+2=", "3"), ("dup", "3+4=", "7"), ("dup", "5+5=", "10")], [("e", "5+6=", "11")])
    rep = validate(tr, ev, tok, 1, 32)
    assert not rep.success
    msg = rep.message()
    assert "expect_column_values_to_be_unique on 'id'" in msg
    assert "row train:2 (id='dup'" in msg and "row train:3 (id='dup'" in msg


def test_train_eval_overlap_is_rejected_with_rows(tok):
    tr, ev = _frames([("a", "1+2=", "3"), ("b", "3+4=", "7")], [("e1", "3+4=", "7"), ("e2", "9+9=", "18")])
    rep = validate(tr, ev, tok, 1, 32)
    assert not rep.success
    msg = rep.message()
    assert "in_both_splits" in msg and "leakage" in msg
    assert "row train:2 (id='b', prompt='3+4=')" in msg and "row eval:1 (id='e1', prompt='3+4=')" in msg
    assert "e2" not in msg


def test_too_long_prompt_and_bad_answer(tok):
    tr, ev = _frames([("a", "1+2=", "3"), ("long", "1" * 40 + "=", "1")], [("e", "5+6=", "eleven")])
    rep = validate(tr, ev, tok, 1, 16)
    msg = rep.message()
    assert not rep.success
    assert "prompt_tokens" in msg and "id='long'" in msg
    assert "answer_parses" in msg and "id='e'" in msg


def test_shown_prompts_are_trimmed(tok):
    secret = "7" * 200
    tr, ev = _frames([("a", secret + "=", "1"), ("a", "1+1=", "2")], [("e", "5+6=", "11")])
    msg = validate(tr, ev, tok, 1, 16).message()
    assert secret not in msg


def test_missing_values_show_as_missing_not_nan(tok):
    """pandas turns a null into NaN; a person must read <missing>, not 'nan'."""
    tr = pd.DataFrame({"id": ["a", None], "prompt": [None, "3+4="], "answer": ["3", "7"]})
    _, ev = _frames([], [("e", "5+6=", "11")])
    msg = validate(tr, ev, tok, 1, 32).message()
    assert "row train:1 (id='a', prompt=<missing>)" in msg and "row train:2 (id=<missing>" in msg
    assert "nan" not in msg.lower().replace("expect_column_values_to_not_be_null", "")


def test_rows_are_named_by_their_file_line(tok):
    """With a `line` column (from the JSONL), failures name file:line, not the position after the shuffle."""
    tr = pd.DataFrame({"id": ["a", "dup", "dup"], "prompt": ["1+2=", "3+4=", "5+5="], "line": [9, 4, 17]})
    ev = pd.DataFrame({"id": ["e"], "prompt": ["5+6="], "line": [2]})
    msg = validate(tr, ev, tok, 1, 32, sources={"train": "data/train.jsonl", "eval": "data/eval.jsonl"}).message()
    assert "data/train.jsonl:4 (id='dup', prompt='3+4=')" in msg and "data/train.jsonl:17 (id='dup'" in msg


def test_rows_without_answers_pass(tok):
    tr = pd.DataFrame({"id": ["a", "b"], "prompt": ["1+2=", "3+4="]})
    ev = pd.DataFrame({"id": ["e"], "prompt": ["5+6="]})
    rep = validate(tr, ev, tok, 1, 32)
    assert rep.success, rep.message()
