"""Answer checkers ("verifiers"): which completions count as correct, for evaluation, gates and data checks.

A task's ``verifier`` section is one of the specs below (``kind`` picks it); ``verifier(spec)`` turns it
into an object with ``is_correct(completion, answer)``, ``extract(completion)``, ``answer_ok(answer)`` (does
a ground-truth answer parse: the GX answer expectation) and ``needs_answers``.

Every check takes any text and returns in bounded time; none raises on completion or answer content (a
checker that throws, or hangs, on one odd sample would sink a whole evaluation).

- ``integer``: the addition task's rule, unchanged: the text after the last ``delimiter`` (default
  ``#``), stripped, must equal the stripped answer as a string (``012`` is not ``12``). ``answer_ok``
  accepts ``-?[0-9]+`` only: ASCII digits, where ``str.isdigit`` also took ``²`` and ``١٢``.
- ``exact``: both sides Unicode NFKC-normalised, stripped, runs of whitespace collapsed to one space,
  optionally case-folded; the whole completion, or the text after the last ``delimiter``. NFKC folds
  compatibility forms (full-width ``１２`` is ``12``, ``²`` is ``2``, ``ﬁ`` is ``fi``), as string
  matching wants; it does not map other scripts' digits (``١٢`` stays ``١٢``).
- ``math``: the content of the LAST ``\\boxed{...}`` (nested and escaped braces handled), compared with
  the answer as mathematics. The last ``\\boxed`` decides: if it is not followed by ``{`` or its braces do
  not close (a cut-off completion), there is no answer, even if an earlier box was complete. Plain
  numerals (ASCII integers, decimals, ``a/b``, ``\\frac{a}{b}``, with sign) are compared exactly as
  rationals in this process: ``\\frac{1}{2}`` = ``0.5`` = ``1/2``, ``12`` = ``12.0``; ``0.333`` is not
  ``1/3`` (exact, so a task wanting a tolerance rounds its answers). Anything else (``\\sqrt{4}``,
  ``x+1``, ``1{,}000``, ``50\\%``) goes to math-verify when ``symbolic`` is on. A box holding a non-ASCII
  numeral (``²``, ``١٢``, ``½``) is never correct, and such an answer does not parse: ``3²`` reads as
  ``32`` under NFKC and as ``3`` in math-verify, both wrong, and a model asked for a number in ASCII
  that writes another script has not followed the task's format. A box or answer longer than
  ``max_answer_chars`` is not an answer.
- ``regex``: ``pattern`` (one capture group) is searched in the last ``window_chars`` characters of the
  completion with the ``regex`` module's ``timeout_s`` (a catastrophic-backtracking pattern gives up
  instead of hanging); the LAST match's group, normalised as in ``exact``, must equal the answer.
- ``none``: KL-only runs: no answers needed, nothing is ever correct, callers report no accuracy.

Why math-verify runs in a child process: its own timeouts use ``signal.alarm``, which works only on the
main thread (on any other thread, e.g. a Prefect task runner's, ``parse`` raises ``ValueError``) and only in
whole seconds, and a thread cannot be stopped (sympy's big-integer work holds the GIL). The child is
started on the first non-numeral check (1.5-2 s: sympy and a warm-up), shared by every ``math`` verifier of
the process, and killed when a check overruns ``timeout_s``: that check counts as wrong and the next one
pays the restart. Symbolic verdicts are cached per (answer, box), so a collapsed model repeating one
runaway box pays for it once. Measured here: numerals and 10 kB completions take microseconds, a
symbolic check ~10 ms. The one thing that raises is a child that cannot start (``VerifierUnavailable``,
permanent): a broken install must not read as 0% accuracy.
"""
from __future__ import annotations

import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import unicodedata
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Protocol, Union

import regex
from opd.errors import PermanentError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, field_validator

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- specs (the config's task.verifier)


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("is blank; use a visible marker such as '#' or 'Answer:'")
    return v


Delimiter = Annotated[str, Field(min_length=1, max_length=32), AfterValidator(_not_blank)]


class IntegerSpec(_Spec):
    kind: Literal["integer"] = "integer"
    delimiter: Delimiter = "#"


class ExactSpec(_Spec):
    kind: Literal["exact"] = "exact"
    casefold: bool = False
    delimiter: Delimiter | None = None  # None: the whole completion


class MathSpec(_Spec):
    kind: Literal["math"] = "math"
    symbolic: bool = True  # False: numerals only, no math-verify child
    timeout_s: float = Field(1.0, gt=0, le=60)
    max_answer_chars: int = Field(512, ge=1, le=4000)  # 4000: under Python's 4300-digit int limit


class RegexSpec(_Spec):
    kind: Literal["regex"] = "regex"
    pattern: str = Field(min_length=1, max_length=2000)
    casefold: bool = False
    window_chars: int = Field(4096, ge=1, le=1_000_000)
    timeout_s: float = Field(0.1, gt=0, le=10)

    @field_validator("pattern")
    @classmethod
    def _one_group(cls, v: str) -> str:
        try:
            groups = regex.compile(v).groups
        except Exception as e:  # regex.error, and the odd OverflowError on huge repeat counts
            raise ValueError(f"does not compile ({e}); fix the pattern, e.g. 'Answer: *(-?[0-9]+)'") from None
        if groups != 1:
            raise ValueError(f"has {groups} capture groups; it needs exactly one (the answer): write the "
                             "others as (?:...), e.g. 'Answer: *(-?[0-9]+)'")
        return v


class NoneSpec(_Spec):
    kind: Literal["none"] = "none"


VerifierSpec = Annotated[Union[IntegerSpec, ExactSpec, MathSpec, RegexSpec, NoneSpec], Field(discriminator="kind")]
_SPEC = TypeAdapter(VerifierSpec)


def parse_spec(data: object) -> IntegerSpec | ExactSpec | MathSpec | RegexSpec | NoneSpec:
    """A spec from config data; pydantic's ValidationError names the field (e.g. ``regex.pattern``)."""
    return _SPEC.validate_python(data)


# ---------------------------------------------------------------- the interface


class Verifier(Protocol):
    needs_answers: bool

    def extract(self, completion: str) -> str | None: ...

    def is_correct(self, completion: str, answer: str) -> bool: ...

    def answer_ok(self, answer: str) -> bool: ...


class VerifierUnavailable(PermanentError):
    """The math-verify child could not start: a broken install, not a bad completion."""


def _after(text: str, delimiter: str | None) -> str | None:
    """The text after the last ``delimiter`` (all of it when None); None when the delimiter is absent."""
    if delimiter is None:
        return text
    if delimiter not in text:
        return None
    return text.rsplit(delimiter, 1)[1]


def normalise(text: str, casefold: bool = False) -> str:
    """NFKC, whitespace runs collapsed to one space, stripped, optionally case-folded."""
    out = " ".join(unicodedata.normalize("NFKC", text).split())
    return out.casefold() if casefold else out


@dataclass(frozen=True)
class IntegerVerifier:
    spec: IntegerSpec
    needs_answers: ClassVar[bool] = True

    def extract(self, completion: str) -> str | None:
        if not isinstance(completion, str):
            return None
        ans = _after(completion, self.spec.delimiter)
        return (ans.strip() or None) if ans is not None else None

    def is_correct(self, completion: str, answer: str) -> bool:
        return isinstance(answer, str) and self.extract(completion) == answer.strip()

    def answer_ok(self, answer: str) -> bool:
        return isinstance(answer, str) and re.fullmatch(r"-?[0-9]+", answer.strip()) is not None


class _StringMatch:
    """``exact`` and ``regex``: the extracted text, normalised, equals the normalised answer."""

    spec: ExactSpec | RegexSpec
    needs_answers: ClassVar[bool] = True

    def extract(self, completion: str) -> str | None:
        raise NotImplementedError

    def is_correct(self, completion: str, answer: str) -> bool:
        got = self.extract(completion)
        return got is not None and isinstance(answer, str) and got == normalise(answer, self.spec.casefold)

    def answer_ok(self, answer: str) -> bool:
        return isinstance(answer, str) and bool(normalise(answer))


@dataclass(frozen=True)
class ExactVerifier(_StringMatch):
    spec: ExactSpec

    def extract(self, completion: str) -> str | None:
        if not isinstance(completion, str):
            return None
        ans = _after(completion, self.spec.delimiter)
        return (normalise(ans, self.spec.casefold) or None) if ans is not None else None


@dataclass(frozen=True)
class RegexVerifier(_StringMatch):
    spec: RegexSpec

    def extract(self, completion: str) -> str | None:
        if not isinstance(completion, str):
            return None
        last = None
        try:
            for m in regex.finditer(self.spec.pattern, completion[-self.spec.window_chars:],
                                    timeout=self.spec.timeout_s):
                last = m
        except TimeoutError:
            log.warning("regex verifier: the pattern ran past %.2fs on one completion (counted wrong)",
                        self.spec.timeout_s)
            return None
        got = last.group(1) if last is not None else None
        return (normalise(got, self.spec.casefold) or None) if got is not None else None


@dataclass(frozen=True)
class NoVerifier:
    """KL-only runs: there is no answer to check, so nothing is correct and every answer is fine."""

    spec: NoneSpec
    needs_answers: ClassVar[bool] = False

    def extract(self, completion: str) -> str | None:
        return None

    def is_correct(self, completion: str, answer: str) -> bool:
        return False

    def answer_ok(self, answer: str) -> bool:
        return True


# ---------------------------------------------------------------- math: the last box, numerals, math-verify


def last_boxed(text: str, max_chars: int) -> str | None:
    """The stripped content of the last ``\\boxed{...}``; None when there is none, it does not close, it
    is empty, or it runs past ``max_chars`` (the scan stops there, so time is bounded)."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth, j, end = 0, i, min(len(text), i + max_chars + 2)
    while j < end:
        c = text[j]
        if c == "\\":
            j += 2  # an escaped character (\{, \}, \\) never opens or closes the box
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                inner = text[i + 1:j].strip()
                return inner if inner and len(inner) <= max_chars else None
        j += 1
    return None


def _has_foreign_numeral(text: str) -> bool:
    return any(not c.isascii() and c.isnumeric() for c in text)


_NUM = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_FRAC = re.compile(rf"([+-]?)\\[dt]?frac\s*\{{\s*({_NUM})\s*\}}\s*\{{\s*({_NUM})\s*\}}")
_SLASH = re.compile(rf"({_NUM})\s*/\s*({_NUM})")


def numeral(text: str) -> Fraction | None:
    """An exact value for a plain numeral (``12``, ``-0.5``, ``1/2``, ``\\frac{1}{2}``, in ``$``), else None."""
    s = text.strip().strip("$").strip()
    try:
        if re.fullmatch(_NUM, s):
            return Fraction(s)
        if m := _FRAC.fullmatch(s):
            value = Fraction(m[2]) / Fraction(m[3])
            return -value if m[1] == "-" else value
        if m := _SLASH.fullmatch(s):
            return Fraction(m[1]) / Fraction(m[2])
    except (ValueError, ZeroDivisionError):  # a zero denominator; digits past the int-size limit
        return None
    return None


def _serve() -> None:
    """The math-verify child: one JSON request per stdin line, one JSON bool per stdout line.

    ``{"op": "equal"|"parses", "gold": ..., "pred": ...}``; the first line out is ``"ready"`` or
    ``{"error": ...}`` (math-verify missing). Library output goes to stderr, never into the protocol."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)  # its 'timeout is disabled' warning: we time it
    try:
        from math_verify import parse, verify
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), file=out, flush=True)
        return

    def answer(op: str, gold: str, pred: str) -> bool:
        g = parse(f"${gold}$", parsing_timeout=None)
        if op == "parses":
            return any(not isinstance(x, str) for x in g)
        return bool(g) and verify(g, parse(f"${pred}$", parsing_timeout=None), timeout_seconds=None)

    answer("equal", "1", "\\frac{\\sqrt{4}}{2}")  # warm the parser, so a first real check is not slow
    print(json.dumps("ready"), file=out, flush=True)
    for line in sys.stdin:
        try:
            req = json.loads(line)
            ok = answer(req["op"], req["gold"], req["pred"])
        except Exception:
            ok = False
        print(json.dumps(bool(ok)), file=out, flush=True)


class _MathVerifyChild:
    """One math-verify child per process, started on demand, killed and restarted when it overruns.

    A plain subprocess (``python -c``), not multiprocessing: spawn re-runs the parent's ``__main__``
    (an unguarded script, ``<stdin>``), fork copies a CUDA/vLLM parent."""

    START_S = 120.0  # import + warm-up on a loaded 2-core machine

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def ask(self, op: str, gold: str, pred: str, timeout_s: float) -> bool:
        with self._lock:
            proc = self._proc or self._start()
            try:
                proc.stdin.write(json.dumps({"op": op, "gold": gold, "pred": pred}) + "\n")
                proc.stdin.flush()
                reply = self._read(proc, timeout_s)
                if reply is not None:
                    return reply is True
                log.warning("math verifier: a check ran past %.2fs (counted wrong); restarting math-verify",
                            timeout_s)
            except (OSError, ValueError):
                log.warning("math verifier: the math-verify child died (counted wrong); restarting it")
            self._stop()
            return False

    @staticmethod
    def _read(proc: subprocess.Popen, timeout_s: float) -> object:
        """The child's next reply, or None when none comes within ``timeout_s``."""
        if not select.select([proc.stdout], [], [], timeout_s)[0]:
            return None
        line = proc.stdout.readline()
        if not line:
            raise OSError("the child closed its output")
        return json.loads(line)

    def _start(self) -> subprocess.Popen:
        root = str(Path(__file__).resolve().parents[2])
        code = f"import sys; sys.path.insert(0, {root!r}); from opd.data.verifiers import _serve; _serve()"
        try:
            proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True, encoding="utf-8", bufsize=1)
        except OSError as e:
            raise VerifierUnavailable(f"math verifier: cannot start the math-verify child ({e}); "
                                      "set symbolic: false to compare numerals only") from None
        self._proc = proc
        try:
            first = self._read(proc, self.START_S)
        except (OSError, ValueError):
            first = None
        if first == "ready":
            return proc
        if isinstance(first, dict):
            why = str(first.get("error"))
        else:
            try:
                why = f"it exited with code {proc.wait(2)}"
            except subprocess.TimeoutExpired:
                why = f"no answer within {self.START_S:.0f}s"
        self._stop()
        raise VerifierUnavailable(
            f"math verifier: the math-verify child did not start ({why}); install it with "
            "pip install 'math-verify[antlr4_13_2]', or set symbolic: false to compare numerals only")

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.kill()  # SIGKILL: sympy deep in a big-integer power ignores nothing else sooner
        proc.wait(5)
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass


_CHILD = _MathVerifyChild()


@lru_cache(maxsize=4096)
def _symbolic(op: str, gold: str, pred: str, timeout_s: float) -> bool:
    """Cached: a collapsed model repeats one bad box, and an overrun must not be paid once per sample."""
    return _CHILD.ask(op, gold, pred, timeout_s)


@dataclass(frozen=True)
class MathVerifier:
    spec: MathSpec
    needs_answers: ClassVar[bool] = True

    def extract(self, completion: str) -> str | None:
        return last_boxed(completion, self.spec.max_answer_chars) if isinstance(completion, str) else None

    def _gold(self, answer: str) -> str | None:
        """The answer as given, or its last box if it comes boxed; None when it cannot be an answer."""
        if not isinstance(answer, str):
            return None
        gold = last_boxed(answer, self.spec.max_answer_chars) if "\\boxed" in answer else answer.strip()
        if not gold or len(gold) > self.spec.max_answer_chars or _has_foreign_numeral(gold):
            return None
        return gold

    def is_correct(self, completion: str, answer: str) -> bool:
        gold, got = self._gold(answer), self.extract(completion)
        if gold is None or got is None or _has_foreign_numeral(got):
            return False
        g, p = numeral(gold), numeral(got)
        if g is not None and p is not None:
            return g == p
        return self.spec.symbolic and _symbolic("equal", gold, got, self.spec.timeout_s)

    def answer_ok(self, answer: str) -> bool:
        gold = self._gold(answer)
        if gold is None:
            return False
        return numeral(gold) is not None or (self.spec.symbolic and
                                             _symbolic("parses", gold, "", self.spec.timeout_s))


_BY_KIND = {IntegerSpec: IntegerVerifier, ExactSpec: ExactVerifier, MathSpec: MathVerifier,
            RegexSpec: RegexVerifier, NoneSpec: NoVerifier}


def verifier(spec: IntegerSpec | ExactSpec | MathSpec | RegexSpec | NoneSpec) -> Verifier:
    """The checker a task's ``verifier`` section describes."""
    return _BY_KIND[type(spec)](spec)
