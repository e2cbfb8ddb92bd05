"""How a prompt's text becomes the token ids every model sees: as written, or as a chat turn.

One function for the sampler, the teacher's completions, evaluation and the GX length check, so a
prompt is never counted one way and sampled another.
"""
from __future__ import annotations

from dataclasses import dataclass

from opd.errors import PermanentError


class NoChatTemplate(PermanentError):
    """task.prompt_format=chat with a tokenizer that carries no chat template."""


@dataclass(frozen=True)
class PromptFormat:
    kind: str = "raw"  # "raw" | "chat"
    system_prompt: str | None = None

    def encode(self, tokenizer, text: str) -> list[int]:
        if self.kind == "raw":
            return tokenizer(text).input_ids
        if not getattr(tokenizer, "chat_template", None):
            raise NoChatTemplate(
                f"task.prompt_format=chat, but the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no "
                "chat_template: use a tokenizer that carries one, or task.prompt_format=raw")
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
            {"role": "user", "content": text}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))

    def encode_all(self, tokenizer, texts: list[str]) -> list[list[int]]:
        return [self.encode(tokenizer, t) for t in texts]


RAW = PromptFormat()


def prompt_format(cfg) -> PromptFormat:
    """The run's format (``cfg.task``)."""
    return PromptFormat(cfg.task.prompt_format, cfg.task.system_prompt)
