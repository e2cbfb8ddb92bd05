"""A prompt's token ids as every stage sees them: as written, or as a chat turn (opd.prompting)."""
from __future__ import annotations

import pytest

from opd.bpe import END_OF_TURN, TURN_START, train_bpe
from opd.config import load_config
from opd.models import build_char_tokenizer
from opd.prompting import RAW, NoChatTemplate, PromptFormat, prompt_format


@pytest.fixture(scope="module")
def chat_tok():
    texts = [f"{TURN_START}user\nWhat is {i} plus {i + 1}?{END_OF_TURN}\n{TURN_START}assistant\n"
             f"{i} + {i + 1} = {2 * i + 1}. \\boxed{{{2 * i + 1}}}{END_OF_TURN}\n" for i in range(200)]
    return train_bpe(texts, vocab_size=400)


def test_chat_prompts_are_rendered_with_the_template_and_end_at_the_assistant_turn(chat_tok):
    fmt = PromptFormat("chat", system_prompt="Answer in a box.")
    ids = fmt.encode(chat_tok, "What is 2 plus 3?")
    text = chat_tok.decode(ids)
    assert text.startswith(f"{TURN_START}system\nAnswer in a box.{END_OF_TURN}"), text
    assert "What is 2 plus 3?" in text and text.endswith(f"{TURN_START}assistant\n"), text
    assert chat_tok.eos_token == END_OF_TURN  # sampling stops at the end of the assistant's turn
    assert RAW.encode(chat_tok, "What is 2 plus 3?") == chat_tok("What is 2 plus 3?").input_ids
    assert fmt.encode_all(chat_tok, ["a", "b"]) == [fmt.encode(chat_tok, "a"), fmt.encode(chat_tok, "b")]


def test_chat_format_with_a_tokenizer_without_a_template_is_refused_by_name():
    with pytest.raises(NoChatTemplate, match="task.prompt_format=chat, but the tokenizer .* has no chat_template"):
        PromptFormat("chat").encode(build_char_tokenizer(), "1+2=")


def test_the_run_config_picks_the_format(tmp_path):
    cfg = load_config("configs/ci.yaml", ["task.prompt_format=chat", "task.system_prompt=Be brief."])
    assert prompt_format(cfg) == PromptFormat("chat", "Be brief.")
    assert prompt_format(load_config("configs/ci.yaml")) == RAW


def test_the_task_verifier_decides_which_completions_count(chat_tok, tmp_path):
    """The same completions, graded by the run's verifier: math accepts an equivalent form, the addition
    task's integer rule does not, and a KL-only run has no check at all."""
    from opd.evaluation import _share_correct, task_check

    comps = [chat_tok("So the answer is \\boxed{\\frac{1}{2}}.").input_ids, chat_tok("\\boxed{3}").input_ids]
    answers = ["0.5", "4"]
    math = task_check(load_config("configs/ci.yaml", ["task.verifier=math"]))
    integer = task_check(load_config("configs/ci.yaml"))
    assert _share_correct(chat_tok, comps, answers, math) == 0.5
    assert _share_correct(chat_tok, comps, answers, integer) == 0.0
    assert task_check(load_config("configs/ci.yaml", ["task.verifier=none", "eval.gates.min_accuracy=0"])) is None
