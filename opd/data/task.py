"""The demo's verifiable task: multi-number addition with a scratchpad of partial sums.

prompt      ``"17+250+3="``
completion  ``"267;270#270"``  (running sums, then the answer after ``#``)

With ``any_order`` the ground truth adds the terms in a random order (``"253;270#270"`` adds
250+3 first), so a teacher trained on it spreads its probability over several correct
scratchpads: the setting where a small student imitating the teacher's samples (forward KL,
SFT) has to cover every path, while OPD's reverse KL lets it commit to one.

The answer is checked exactly, so accuracy is a real verifier, not a proxy.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

ANSWER_DELIMITER = "#"
STEP_DELIMITER = ";"
ALPHABET = "0123456789+=" + STEP_DELIMITER + ANSWER_DELIMITER


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    answer: str
    completion: str  # the ground-truth scratchpad (used only to bootstrap the demo teacher)


def make_example(idx: str, terms: list[int], order: list[int] | None = None) -> Example:
    """``order``: the sequence in which the scratchpad adds the terms (default: as written)."""
    seq = [terms[i] for i in order] if order is not None else terms
    partial, steps = seq[0], []
    for t in seq[1:]:
        partial += t
        steps.append(str(partial))
    prompt = "+".join(str(t) for t in terms) + "="
    answer = str(partial)
    return Example(idx, prompt, answer, STEP_DELIMITER.join(steps) + ANSWER_DELIMITER + answer)


def generate(n: int, num_terms: int, max_digits: int, seed: int, exclude: set[str] | None = None,
             prefix: str = "ex", any_order: bool = False) -> list[Example]:
    """n distinct problems; digit counts are drawn uniformly so short numbers are not rare.

    ``any_order`` draws each scratchpad's summation order uniformly (and only then touches the
    random stream, so fixed-order datasets stay as they were)."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems with num_terms={num_terms}, max_digits={max_digits}")
        terms = [rng.randrange(10 ** (rng.randint(1, max_digits))) for _ in range(num_terms)]
        order = rng.sample(range(num_terms), num_terms) if any_order else None
        ex = make_example(f"{prefix}-{len(out):06d}", terms, order)
        if ex.prompt in seen:
            continue
        seen.add(ex.prompt)
        out.append(ex)
    return out


def extract_answer(completion: str) -> str | None:
    if ANSWER_DELIMITER not in completion:
        return None
    ans = completion.rsplit(ANSWER_DELIMITER, 1)[1].strip()
    return ans or None


def is_correct(completion: str, answer: str) -> bool:
    return extract_answer(completion) == answer.strip()


def answer_parses(answer: str) -> bool:
    return answer.strip().lstrip("-").isdigit()
