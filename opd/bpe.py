"""A byte-level BPE tokenizer trained by our code, with Qwen-style special tokens and a ChatML template.

Real student/teacher pairs talk in chat turns: the prompt is rendered with the tokenizer's chat
template and generation stops on the end-of-turn token. This module gives the word-problem pair
exactly that shape: ``<|endoftext|>`` pads, ``<|im_start|>``/``<|im_end|>`` frame turns and
``<|im_end|>`` is the EOS; the template (optional system message, ``add_generation_prompt``)
travels in the saved tokenizer, so ``AutoTokenizer.from_pretrained(dir)`` restores it.

Digits are split one by one before BPE (as Qwen does) so ``12`` and ``21`` share their digit
tokens and the arithmetic stays learnable. Special tokens are cut out of the training text, so no
merge is spent on pieces like ``.<|``. Training is deterministic given the corpus.
"""
from __future__ import annotations

import re
from functools import lru_cache
from collections.abc import Iterable, Iterator
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from opd.data.task import Example
from opd.errors import PermanentError

PAD_TOKEN = "<|endoftext|>"
TURN_START = "<|im_start|>"
END_OF_TURN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, TURN_START, END_OF_TURN]

# ChatML as Qwen writes it, minus Qwen's default system prompt: a system turn only when given
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


class TokenizerError(PermanentError, ValueError):
    """A tokenizer that cannot serve chat-formatted distillation; the message names the fix."""


def messages(prompt: str, completion: str | None = None, system: str | None = None) -> list[dict[str, str]]:
    """The chat turns of one example: optional system, the user's prompt, optional assistant reply."""
    turns = [{"role": "system", "content": system}] if system else []
    turns.append({"role": "user", "content": prompt})
    if completion is not None:
        turns.append({"role": "assistant", "content": completion})
    return turns


@lru_cache(maxsize=1)
def _compiled_template():
    # the environment transformers renders chat templates in
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE)


def render_chat(turns: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """``CHAT_TEMPLATE`` rendered without a tokenizer (for the training corpus), as transformers renders it."""
    return _compiled_template().render(messages=turns, add_generation_prompt=add_generation_prompt)


def chat_corpus(examples: Iterable[Example], system: str | None = None) -> Iterator[str]:
    """Each example as the full conversation the models will see (prompt and worked solution)."""
    for ex in examples:
        yield render_chat(messages(ex.prompt, ex.completion, system))


def _without_specials(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        yield from (piece for piece in _SPECIAL_SPLIT.split(text) if piece)


def train_bpe(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2,
              model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """A byte-level BPE of at most ``vocab_size`` tokens (specials included) trained on ``texts``.

    Every byte is in the base alphabet, so any text encodes and decodes back exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    base = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size < base:
        raise TokenizerError(f"vocab_size={vocab_size} is below the {base} byte and special tokens; use >= {base}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_without_specials(texts), trainer)
    return wrap(tok, model_max_length)


def wrap(tok, model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """The ``tokenizers`` object as a transformers tokenizer with the chat template and Qwen's specials."""
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END_OF_TURN, pad_token=PAD_TOKEN,
                                   extra_special_tokens=[TURN_START], chat_template=CHAT_TEMPLATE,
                                   padding_side="left", model_max_length=model_max_length)


def check_chat_tokenizer(tok: PreTrainedTokenizerFast) -> None:
    """Refuse a tokenizer that cannot frame turns: no template, or an end-of-turn that is not one EOS token."""
    if not tok.chat_template:
        raise TokenizerError("tokenizer has no chat_template: set one (e.g. opd.bpe.CHAT_TEMPLATE) before saving")
    ids = tok.convert_tokens_to_ids(END_OF_TURN)
    if tok.encode(END_OF_TURN, add_special_tokens=False) != [ids] or tok.eos_token_id != ids:
        raise TokenizerError(f"{END_OF_TURN} must be one token and the eos_token (eos is {tok.eos_token!r}); "
                             f"build the tokenizer with opd.bpe.wrap")


def save_tokenizer(tok: PreTrainedTokenizerFast, out_dir: Path) -> Path:
    """Check, then write with ``save_pretrained`` (tokenizer.json, config and template) into ``out_dir``."""
    check_chat_tokenizer(tok)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return out_dir


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """A saved chat tokenizer, checked as on save."""
    tok = AutoTokenizer.from_pretrained(str(path))
    check_chat_tokenizer(tok)
    return tok
