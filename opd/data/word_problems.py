"""Multi-step arithmetic word problems whose completions are worked solutions ending in ``\\boxed{N}``.

prompt      ``"Mia has 12 apples. She buys 3 bags of 4 apples each. She gives 5 apples to Tom.
              How many apples does Mia have now?"``
completion  ``"3 bags of 4 apples is 3 * 4 = 12, so 12 + 12 = 24.\\n"``
            ``"After giving away 5: 24 - 5 = 19.\\nThe answer is \\boxed{19}."``

A problem is a start count and 2-4 steps (add, give away, buy groups, multiply); every operand is
small (default 1-20) and every running total stays in ``0..max_value`` so a tiny model can learn
the arithmetic from a few thousand examples. One solution line per step, always in the same form,
keeps the scratchpad regular. ``context_sentences`` puts that many irrelevant sentences about the
characters (no numbers) before the problem, so prompts reach hundreds of tokens while the
completion stays short. Problems are deduplicated on the problem text (``problem_key``), not the
padded prompt, so two different preambles around one problem still count as one: an eval set
built with ``exclude`` never shares a problem with train.
"""
from __future__ import annotations

import random
from functools import lru_cache
from dataclasses import dataclass

from opd.data.task import Example

PREAMBLE_SEPARATOR = "\n\n"
OPS = ("add", "give", "groups", "times")

# (name, subject pronoun, object pronoun)
PEOPLE = (("Mia", "She", "her"), ("Tom", "He", "him"), ("Ana", "She", "her"), ("Leo", "He", "him"),
          ("Zoe", "She", "her"), ("Sam", "He", "him"), ("Ivy", "She", "her"), ("Max", "He", "him"),
          ("Lily", "She", "her"), ("Ben", "He", "him"), ("Emma", "She", "her"), ("Noah", "He", "him"),
          ("Ella", "She", "her"), ("Omar", "He", "him"), ("Rosa", "She", "her"), ("Hugo", "He", "him"))
OBJECTS = ("apples", "pears", "marbles", "stickers", "pencils", "cookies", "stamps", "shells",
           "cards", "books", "coins", "buttons")
CONTAINERS = ("bags", "boxes", "packs", "jars")
QUESTIONS = ("How many {obj} does {name} have now?", "How many {obj} does {name} have in the end?")
ADD_TEMPLATES = ("{P} finds {b} more {obj}.", "{friend} gives {o} {b} {obj}.", "{P} gets {b} more {obj}.")
GIVE_TEMPLATES = ("{P} gives {b} {obj} to {friend}.", "{P} loses {b} {obj}.", "{P} sells {b} {obj}.")
GROUPS_TEMPLATES = ("{P} buys {k} {box} of {m} {obj} each.", "{friend} gives {o} {k} {box} with {m} {obj} in each.")
TIMES_TEMPLATES = ("Then the number of {obj} {P_lower} has becomes {k} times as large.",)
# irrelevant sentences for the long-context option: about the characters, never a number
CONTEXT_TEMPLATES = (
    "{name} lives in a small house near the river.", "{name} likes to read in the garden after lunch.",
    "{name} and {friend} walk to school together on sunny days.", "{name} has a red bike with a bell.",
    "{name} paints pictures of birds and trees.", "{friend} often visits {name} on the weekend.",
    "{name} enjoys singing songs with {friend}.", "{name} keeps a diary in a blue notebook.",
    "{name} wants to be a doctor one day.", "{friend} and {name} play chess in the park.",
    "{name} likes warm soup when it rains.", "{name} waters the plants every morning.",
    "{name} is learning to play the piano.", "{friend} tells {name} a funny story at lunch.",
    "{name} draws maps of places that do not exist.", "{name} feeds the cat before going to bed.",
    "{name} wears a green hat in the winter.", "{friend} and {name} build a tree house in the summer.",
    "{name} likes the smell of fresh bread.", "{name} rides the bus to visit an aunt.",
    "{name} laughs at every joke that {friend} tells.", "{name} collects leaves in the autumn.",
    "{name} is afraid of the dark but not of spiders.", "{friend} helps {name} fix a broken kite.",
    "{name} writes letters to a pen friend far away.", "{name} dreams of sailing across the sea.",
    "{name} bakes a cake for the family on holidays.", "{friend} and {name} watch the stars at night.",
    "{name} plays football with the neighbours after school.", "{name} has a dog that likes to swim.",
    "{name} listens to the radio while cooking dinner.", "{name} visits the library with {friend}.",
)
# preamble sentences that bring every prompt to >= 200 tokens of the word-problem BPE (measured in the tests)
LONG_CONTEXT_SENTENCES = 20


@dataclass(frozen=True)
class Step:
    """One operation on the running total: ``add b``, ``give b``, ``groups k*m`` or ``times k``."""
    op: str
    a: int
    b: int = 0

    def apply(self, total: int) -> int:
        if self.op == "add":
            return total + self.a
        if self.op == "give":
            return total - self.a
        if self.op == "groups":
            return total + self.a * self.b
        if self.op == "times":
            return total * self.a
        raise ValueError(f"unknown step op {self.op!r}; expected one of {OPS}")


@dataclass(frozen=True)
class Problem:
    """The structured problem behind a prompt: what the answer is computed from."""
    name: str
    obj: str
    box: str  # the container of every ``groups`` step: "bags", "boxes", ...
    start: int
    steps: tuple[Step, ...]

    def totals(self) -> list[int]:
        """Running total after each step."""
        out, total = [], self.start
        for step in self.steps:
            total = step.apply(total)
            out.append(total)
        return out

    @property
    def answer(self) -> int:
        return self.totals()[-1]


def _draw_step(rng: random.Random, total: int, max_operand: int, max_value: int) -> Step | None:
    """A step that keeps the total in 0..max_value, or None when the drawn op cannot."""
    op = rng.choice(OPS)
    if op == "add":
        b = rng.randint(1, max_operand)
        return Step("add", b) if total + b <= max_value else None
    if op == "give":
        return Step("give", rng.randint(1, min(max_operand, total))) if total >= 1 else None
    if op == "groups":
        k, m = rng.randint(2, 5), rng.randint(2, min(10, max_operand))
        return Step("groups", k, m) if total + k * m <= max_value else None
    k = rng.randint(2, 3)
    return Step("times", k) if 1 <= total <= max_operand and total * k <= max_value else None


def draw_problem(rng: random.Random, min_steps: int = 2, max_steps: int = 4, max_operand: int = 20,
                 max_value: int = 99) -> Problem:
    """A random problem with ``min_steps..max_steps`` steps; redraws a step that would leave 0..max_value."""
    name = rng.choice(PEOPLE)[0]
    start, steps = rng.randint(1, max_operand), []
    total, n_steps = start, rng.randint(min_steps, max_steps)
    while len(steps) < n_steps:
        step = _draw_step(rng, total, max_operand, max_value)
        if step is not None:
            steps.append(step)
            total = step.apply(total)
    return Problem(name, rng.choice(OBJECTS), rng.choice(CONTAINERS), start, tuple(steps))


def _person(name: str) -> tuple[str, str, str]:
    return next(p for p in PEOPLE if p[0] == name)


def _friend(rng: random.Random, name: str) -> str:
    return rng.choice([p[0] for p in PEOPLE if p[0] != name])


def _step_sentence(rng: random.Random, problem: Problem, step: Step) -> str:
    name, subj, obj_pron = _person(problem.name)
    templates = {"add": ADD_TEMPLATES, "give": GIVE_TEMPLATES, "groups": GROUPS_TEMPLATES,
                 "times": TIMES_TEMPLATES}[step.op]
    return rng.choice(templates).format(
        P=subj, P_lower=subj.lower(), o=obj_pron, friend=_friend(rng, name), obj=problem.obj,
        b=step.a, k=step.a, m=step.b, box=problem.box)


def problem_text(rng: random.Random, problem: Problem) -> str:
    """The story and question, phrasing drawn from ``rng``."""
    sentences = [f"{problem.name} has {problem.start} {problem.obj}."]
    sentences += [_step_sentence(rng, problem, s) for s in problem.steps]
    sentences.append(rng.choice(QUESTIONS).format(obj=problem.obj, name=problem.name))
    return " ".join(sentences)


def context_text(rng: random.Random, name: str, n: int) -> str:
    """``n`` distinct irrelevant sentences about ``name`` and friends (n is capped by the template pool)."""
    picks = rng.sample(CONTEXT_TEMPLATES, min(n, len(CONTEXT_TEMPLATES)))
    return " ".join(t.format(name=name, friend=_friend(rng, name)) for t in picks)


def solution_line(step: Step, total: int, new_total: int, problem: Problem) -> str:
    """One short line per step, always the same form for the same op."""
    if step.op == "add":
        return f"After getting {step.a} more: {total} + {step.a} = {new_total}."
    if step.op == "give":
        return f"After giving away {step.a}: {total} - {step.a} = {new_total}."
    if step.op == "groups":
        made = step.a * step.b
        return (f"{step.a} {problem.box} of {step.b} {problem.obj} is {step.a} * {step.b} = {made}, "
                f"so {total} + {made} = {new_total}.")
    return f"{step.a} times as many: {total} * {step.a} = {new_total}."


def solution(problem: Problem) -> str:
    """The worked solution: a line per step, then ``The answer is \\boxed{N}.``"""
    totals = [problem.start] + problem.totals()
    lines = [solution_line(s, totals[i], totals[i + 1], problem) for i, s in enumerate(problem.steps)]
    return "\n".join(lines + [f"The answer is \\boxed{{{problem.answer}}}."])


def problem_key(prompt: str) -> str:
    """The problem part of a prompt (after any preamble): what train/eval overlap is judged on."""
    return prompt.rsplit(PREAMBLE_SEPARATOR, 1)[-1]


def generate_problems(n: int, seed: int, exclude: set[str] | None = None, prefix: str = "wp",
                      min_steps: int = 2, max_steps: int = 4, max_operand: int = 20, max_value: int = 99,
                      context_sentences: int = 0) -> list[tuple[Problem, Example]]:
    """``n`` examples with distinct problems, each with the structured problem it was rendered from.

    ``exclude``: prompts (with or without preamble) whose problems must not be drawn again."""
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}")
    if max_operand < 2 or max_value < max_operand:
        raise ValueError(f"need 2 <= max_operand <= max_value, got max_operand={max_operand}, max_value={max_value}")
    rng = random.Random(seed)
    seen = {problem_key(p) for p in exclude or ()}
    out: list[tuple[Problem, Example]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct word problems with max_operand={max_operand}, "
                             f"max_value={max_value}, steps {min_steps}-{max_steps}")
        problem = draw_problem(rng, min_steps, max_steps, max_operand, max_value)
        text = problem_text(rng, problem)
        if text in seen:
            continue
        seen.add(text)
        prompt = text
        if context_sentences > 0:
            prompt = context_text(rng, problem.name, context_sentences) + PREAMBLE_SEPARATOR + text
        out.append((problem, Example(f"{prefix}-{len(out):06d}", prompt, str(problem.answer), solution(problem))))
    return out


def generate(n: int, seed: int, exclude: set[str] | None = None, prefix: str = "wp", min_steps: int = 2,
             max_steps: int = 4, max_operand: int = 20, max_value: int = 99,
             context_sentences: int = 0) -> list[Example]:
    """``n`` distinct word problems, deterministic per ``seed`` (see ``generate_problems``)."""
    return [ex for _, ex in generate_problems(n, seed, exclude, prefix, min_steps, max_steps, max_operand,
                                              max_value, context_sentences)]


TOKENIZER_SEED = 7919  # the tokenizer's corpus is drawn apart from every run's data seeds
TOKENIZER_CORPUS = 2000  # conversations; enough for every word and number form of the task (tested)


def tokenizer(spec):
    """The task's byte-level BPE with the ChatML template (opd.bpe), trained by our code on a corpus of this
    task drawn with a fixed seed: every run of a recipe, on any machine, gets the same vocabulary (BPE
    training is deterministic given the corpus), so the teacher's key can name it by its recipe."""
    import copy

    # a copy: callers may set padding or truncation on theirs
    return copy.deepcopy(_tokenizer(spec.min_steps, spec.max_steps, spec.max_operand, spec.max_value,
                                    spec.context_sentences, spec.vocab_size))


@lru_cache(maxsize=4)
def _tokenizer(min_steps: int, max_steps: int, max_operand: int, max_value: int, context_sentences: int,
               vocab_size: int):
    from opd import bpe

    corpus = generate(TOKENIZER_CORPUS, TOKENIZER_SEED, prefix="tok", min_steps=min_steps, max_steps=max_steps,
                      max_operand=max_operand, max_value=max_value, context_sentences=context_sentences)
    return bpe.train_bpe(bpe.chat_corpus(corpus), vocab_size=vocab_size)
