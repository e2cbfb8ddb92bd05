"""The word-problem task and its BPE chat tokenizer: answers are the problem's arithmetic, worked
solutions are right line by line, eval never shares a problem with train, and the trained tokenizer
round-trips text, frames turns with a single end-of-turn EOS and keeps its template through a reload."""
import operator
import re

import pytest
from transformers import AutoTokenizer

from opd import bpe
from opd.data import word_problems as wp

EQUATION = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
PYTHON_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _recompute(problem: wp.Problem) -> list[int]:
    """Running totals computed here, not by the module: the test's own reading of each op."""
    effect = {"add": lambda t, s: t + s.a, "give": lambda t, s: t - s.a,
              "groups": lambda t, s: t + s.a * s.b, "times": lambda t, s: t * s.a}
    totals, total = [], problem.start
    for step in problem.steps:
        total = effect[step.op](total, step)
        totals.append(total)
    return totals


def _prompt_ids(tok, prompt: str, system: str | None = None) -> list[int]:
    return tok.apply_chat_template(bpe.messages(prompt, system=system), add_generation_prompt=True,
                                   tokenize=True, return_dict=False)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    examples = wp.generate(1500, seed=0) + wp.generate(200, seed=1, context_sentences=wp.LONG_CONTEXT_SENTENCES)
    return list(bpe.chat_corpus(examples, system="Solve the problem step by step."))


@pytest.fixture(scope="module")
def tok(corpus):
    return bpe.train_bpe(corpus, vocab_size=2048)


def test_generate_is_deterministic_distinct_and_seeded():
    a, b = wp.generate(400, seed=3), wp.generate(400, seed=3)
    assert a == b
    assert len({e.prompt for e in a}) == len({e.id for e in a}) == 400
    assert [e.prompt for e in wp.generate(400, seed=4)] != [e.prompt for e in a]
    long_a = wp.generate(50, seed=3, context_sentences=8)
    assert long_a == wp.generate(50, seed=3, context_sentences=8)


def test_answers_and_worked_solutions_are_the_problems_arithmetic():
    seen_ops, n_steps = set(), set()
    for problem, ex in wp.generate_problems(600, seed=5):
        totals = _recompute(problem)
        assert ex.answer == str(totals[-1]) and int(ex.answer) >= 0
        assert all(0 <= t <= 99 for t in totals)
        assert all(1 <= s.a <= 20 and 0 <= s.b <= 20 for s in problem.steps)
        assert ex.prompt.startswith(f"{problem.name} has {problem.start} {problem.obj}.")
        assert ex.prompt.endswith(f"does {problem.name} have now?") or ex.prompt.endswith("in the end?")
        lines = ex.completion.split("\n")
        assert len(lines) == len(problem.steps) + 1
        assert lines[-1] == f"The answer is \\boxed{{{ex.answer}}}." and ex.completion.count("\\boxed") == 1
        running = problem.start
        for line, step, total in zip(lines, problem.steps, totals):
            equations = EQUATION.findall(line)
            for a, op, b, c in equations:  # every equation in the solution is true
                assert PYTHON_OPS[op](int(a), int(b)) == int(c), line
            a, op, b, c = equations[-1]  # and the last one of a line moves the running total
            assert (int(a), int(c)) == (running, total), (line, running, total)
            running = total
        seen_ops.update(s.op for s in problem.steps)
        n_steps.add(len(problem.steps))
    assert seen_ops == set(wp.OPS) and n_steps == {2, 3, 4}


def test_exclude_keeps_every_eval_problem_out_of_train():
    train = wp.generate(300, seed=0)
    unguarded = wp.generate(300, seed=1)
    # excluding exactly what seed 1 would draw: the guard must reject every one of them
    held_out = wp.generate(300, seed=1, exclude={e.prompt for e in unguarded} | {e.prompt for e in train})
    assert not {e.prompt for e in held_out} & ({e.prompt for e in unguarded} | {e.prompt for e in train})
    # a preamble around a train problem does not hide it from the guard
    long_unguarded = wp.generate(300, seed=1, context_sentences=4)
    held_out = wp.generate(300, seed=1, exclude={e.prompt for e in long_unguarded})
    assert not {wp.problem_key(e.prompt) for e in long_unguarded} & {e.prompt for e in held_out}
    with pytest.raises(ValueError, match="min_steps=3, max_steps=2"):
        wp.generate(1, seed=0, min_steps=3, max_steps=2)


def test_bpe_training_is_deterministic(corpus, tok):
    again = bpe.train_bpe(corpus, vocab_size=2048)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()  # vocab, merges, pipeline
    assert 300 < len(tok) <= 2048


def test_tokenizer_round_trips_and_splits_digits(corpus, tok):
    for text in corpus[:50] + ["Straße ١٢ ² 😀\ttabs\n\n  spaces {\\boxed{1/2}}"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    digits = tok.convert_ids_to_tokens(tok.encode("12345 + 678", add_special_tokens=False))
    assert [t for t in digits if any(c.isdigit() for c in t)] == list("12345678")
    # no merge was spent on pieces of the special tokens
    assert {t for t in tok.get_vocab() if "<|" in t or "|>" in t} == set(bpe.SPECIAL_TOKENS)


def test_chat_template_and_end_of_turn_survive_a_reload(tok, tmp_path):
    bpe.save_tokenizer(tok, tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    eot = loaded.convert_tokens_to_ids("<|im_end|>")
    assert loaded.encode("<|im_end|>", add_special_tokens=False) == [eot] == [loaded.eos_token_id]
    assert loaded.pad_token == "<|endoftext|>" and loaded.pad_token_id != eot
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Mia has 2 pears."}]
    text = loaded.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nMia has 2 pears.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert text == bpe.render_chat(turns, add_generation_prompt=True)  # the corpus is rendered the same way
    no_prompt = loaded.apply_chat_template(turns[1:], add_generation_prompt=False, tokenize=False)
    assert no_prompt == "<|im_start|>user\nMia has 2 pears.<|im_end|>\n"
    ids = _prompt_ids(loaded, "Mia has 2 pears.")
    assert loaded.decode(ids) == bpe.render_chat(bpe.messages("Mia has 2 pears."), True)
    assert ids.count(eot) == 1 and loaded.decode(ids, skip_special_tokens=True) == "user\nMia has 2 pears.\nassistant\n"
    assert bpe.load_tokenizer(tmp_path / "tok").chat_template == bpe.CHAT_TEMPLATE


def test_a_tokenizer_that_cannot_frame_turns_is_refused_and_not_written(tok, tmp_path):
    bare = bpe.wrap(tok.backend_tokenizer)
    bare.chat_template = None
    with pytest.raises(bpe.TokenizerError, match="no chat_template"):
        bpe.save_tokenizer(bare, tmp_path / "bare")
    assert not (tmp_path / "bare").exists()
    with pytest.raises(bpe.TokenizerError, match="vocab_size=100"):
        bpe.train_bpe(["a b c"], vocab_size=100)


def test_long_context_prompts_reach_200_tokens_and_completions_stay_short(tok):
    long = wp.generate(200, seed=9, context_sentences=wp.LONG_CONTEXT_SENTENCES)
    short = wp.generate(200, seed=9)
    long_lens = [len(_prompt_ids(tok, e.prompt)) for e in long]
    completion_lens = [len(tok.encode(e.completion + bpe.END_OF_TURN, add_special_tokens=False)) for e in long]
    assert min(long_lens) >= 200, min(long_lens)
    assert max(len(_prompt_ids(tok, e.prompt)) for e in short) < 100
    assert max(completion_lens) < 150, max(completion_lens)
    assert all(wp.problem_key(e.prompt) in e.prompt and "\n\n" in e.prompt for e in long)


# ---------------------------------------------------------------- the task as a config section

WP = {"kind": "word_problems", "n_train": 300, "n_eval": 40, "context_sentences": wp.LONG_CONTEXT_SENTENCES}


def test_the_word_problem_task_is_a_synthetic_kind_and_addition_stays_the_default():
    from pydantic import ValidationError

    from opd.config import DataConfig, SyntheticTask, WordProblemTask

    assert isinstance(DataConfig().synthetic, SyntheticTask)
    assert isinstance(DataConfig(synthetic={"num_terms": 2}).synthetic, SyntheticTask)  # no kind: addition
    assert isinstance(DataConfig(synthetic=WP).synthetic, WordProblemTask)
    for bad, says in (({"kind": "chess"}, "'addition', 'word_problems'"),
                      ({**WP, "num_terms": 3}, "num_terms"),  # an addition knob on word problems
                      ({**WP, "min_steps": 4, "max_steps": 2}, "min_steps=4 > max_steps=2"),
                      ({**WP, "max_operand": 50, "max_value": 20}, "max_value=20 < max_operand=50")):
        with pytest.raises(ValidationError, match=re.escape(says)):
            DataConfig(synthetic=bad)


def test_synthetic_word_problem_splits_are_disjoint_long_and_boxed():
    from opd.config import DataConfig
    from opd.data import dataset as ds

    d = ds.synthetic(DataConfig(synthetic=WP), seed=3)
    assert (len(d["train"]), len(d["eval"])) == (300, 40)
    train_problems = {wp.problem_key(p) for p in d["train"]["prompt"]}
    assert not train_problems & {wp.problem_key(p) for p in d["eval"]["prompt"]}
    for row in d["eval"]:
        assert row["completion"].endswith(f"\\boxed{{{row['answer']}}}.") and int(row["answer"]) >= 0
    assert ds.fingerprint(d) == ds.fingerprint(ds.synthetic(DataConfig(synthetic=WP), seed=3))


def test_the_task_tokenizer_is_the_same_for_every_run_and_frames_chat_turns(tmp_path):
    from opd.config import load_config
    from opd.models import tokenizer_for, tokenizer_summary
    from opd.prompting import prompt_format

    cfg = load_config("configs/word-problems.yaml", [f"home={tmp_path}"])
    a, b = tokenizer_for(cfg), tokenizer_for(cfg)
    assert a is not b and a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert a.eos_token == bpe.END_OF_TURN and a.chat_template == bpe.CHAT_TEMPLATE
    ids = prompt_format(cfg).encode(a, "Mia has 3 apples. How many apples does Mia have now?")
    assert a.decode(ids).startswith("<|im_start|>system\nSolve the problem step by step")
    assert a.decode(ids).endswith("<|im_start|>assistant\n")
    a.save_pretrained(str(tmp_path / "tok"))
    summary = tokenizer_summary(tmp_path / "tok")
    assert summary["chat_template"] == bpe.CHAT_TEMPLATE and summary["eos_token"] == bpe.END_OF_TURN
    assert "tokenizer.json" in summary["files"] and summary["vocab_size"] == len(a)


def test_word_problem_models_are_qwen3_with_vllm_cpu_head_dims(tmp_path):
    from opd.config import load_config
    from opd.models import build_model, tokenizer_for

    cfg = load_config("configs/word-problems.yaml", [f"home={tmp_path}"])
    tok = tokenizer_for(cfg)
    for spec in (cfg.teacher.bootstrap.model, cfg.student.model):
        m = build_model(spec, tok, cfg.data.max_prompt_tokens + cfg.opd.max_tokens, seed=0)
        assert m.config.model_type == "qwen3" and m.config.head_dim == 64
        assert m.config.vocab_size == len(tok) and m.config.eos_token_id == tok.eos_token_id


def test_a_directory_without_a_tokenizer_has_no_tokenizer_summary(tmp_path):
    from opd.models import tokenizer_summary

    (tmp_path / "model.safetensors").write_bytes(b"weights only")
    assert tokenizer_summary(tmp_path) is None
