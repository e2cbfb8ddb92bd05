"""Activation checkpointing for the student's decoder layers, as a policy: what to keep, what to recompute.

Why these policies. Bytes held for backward per token per decoder layer, measured on CPU (torch.profiler
memory events) with Qwen3-1.7B-shaped layers (hidden 2,048, MLP 6,144, 16 x 128 query heads, 8 KV heads)
under bf16 autocast over fp32 weights, by differencing 1- and 3-layer models at 128 and 512 tokens:

  policy      held per token-layer                            recomputed in backward
  none        130 kB (fp32 norm inputs/outputs, bf16 casts,    nothing
              q/k/v, RoPE'd q/k, attention out, gate, up,
              SiLU(gate), SiLU*up, ...) + the layer's bf16
              weight copies (96 MiB per layer, any length)
  selective    52 kB: the layer's fp32 input + every matmul    the elementwise ops between them (RMSNorms,
              and attention output (q, k, v, o, gate, up,       q/k-norm, RoPE, SiLU, the products, the
              down) in bf16; no weight copies                   casts): memory-bound, no matmul
  full          8 kB: the layer's fp32 input                   the layer's forward (6 of its 7 matmuls: the
                                                              recompute stops once down_proj's input exists)

At the issue's micro-batch of 8 x 2,304 tokens and 28 layers that is 67 GB (none), 27 GB (selective)
and 4.1 GB (full), next to ~27.5 GB of fp32 weights, gradients and AdamW moments.

Checked on an H200 (``benchmarks/gpu_update.py``, results/gpu_update*.json): at Qwen3-1.7B's widths the
measured peak grows per token of micro-batch by 65.6 (none), 26.7 (selective), 10.2 (mixed_4) and 4.9
(full) B per layer per hidden unit (with one layer recomputed at a time), on top of a constant that the
fp32 state and autocast's bf16 weight copies explain to within 1.5 GiB (``autocast_copy_bytes``). What a
layer holds scales with its widths, not with ``hidden`` alone (Qwen3-4B's MLP is 3.8x its hidden size,
0.6B's query heads 2x): ``LayerDims`` counts them.

Ranking what to recompute by "bytes freed per FLOP recomputed" (the arithmetic that decides what pays):
the elementwise ops free 60% of the layer's per-token bytes (and all its weight copies) and cost no
matmul, i.e. a few percent of the layer's time on a GPU (they are memory-bound); recomputing only the
MLP frees its gate/up/SiLU/product tensors (under half of the 130 kB) for 3/4 of the layer's matmul
FLOPs (gate, up and down are 37.7M of its 50.3M weights), the worst ratio; the attention core frees
~4 kB (its output) for the attention FLOPs. So ``selective`` (torch's selective activation checkpointing, saving matmul and
attention outputs, the policy torchtitan calls "op" SAC) is the first thing to try, and the only way
to go lower is to recompute whole layers: ``mixed_<k>`` is full checkpointing with every k-th layer
selective instead, spending spare memory where it buys the most time back. ``every_<k>`` (full on every
k-th layer, nothing on the others, transformers' ``every_n_layers``) is here for comparison: each
un-checkpointed layer costs ~16x a checkpointed one in memory for ~1/4 of a layer's time.
``tests/test_memory.py`` checks the ordering of held and peak memory on a small model, and that
``selective`` re-runs no matmul in backward while ``full`` re-runs them.

How: transformers' decoder layers are ``GradientCheckpointingLayer``s; a layer with
``gradient_checkpointing = True`` runs its ``__call__`` (hooks included) through ``_gradient_checkpointing_func``,
exactly what ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``
sets on every layer. Setting them per layer (instead of wrapping modules) leaves the module tree, the
parameter names and the state dicts untouched, so peft (LoRA adapters live inside the layers' Linears),
``save_pretrained``, DCP state dicts and the vLLM sync see the same model. Non-reentrant checkpointing
needs no ``enable_input_require_grads`` under peft (only the reentrant variant loses the gradient when the
layer's input does not require grad).

FSDP2: torch's ``checkpoint_wrapper`` wraps a block *before* ``fully_shard(block)`` (torchtitan's
parallelize: apply_ac, then compile, then FSDP; FSDP1's tutorial had it after FSDP init), so the all-gather hooks sit outside the recomputed region. With the flag used here the
FSDP hooks run *inside* the checkpointed ``__call__``; FSDP2 supports that explicitly: its pre-/post-forward
hooks return at once in the PRE_BACKWARD state ("when composing with module-hook-based activation
checkpointing, the pre-backward hook is responsible for the unshard", torch/distributed/fsdp/_fully_shard/
_fsdp_state.py), so the recompute neither all-gathers again nor reshards. Either order of
``apply_checkpointing`` and ``fully_shard`` works (flags, not wrappers); ``tests/test_memory.py`` checks
the gradients of every policy under two-process FSDP2 against one process without checkpointing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from opd.errors import PermanentError

LAYER_MODES = ("none", "full", "selective")
POLICY_FORMS = ("none", "full", "selective", "every_<k>", "mixed_<k>")
NONE_OVER_SELECTIVE = 2.52  # "none" holds this many times what "selective" does (H200, Qwen3-1.7B: 134 kB / 53 kB)


class UnsupportedCheckpointing(PermanentError, ValueError):
    """A policy name or a model this module cannot checkpoint."""


@dataclass(frozen=True)
class Checkpointing:
    """``policy``: none | full | selective | every (full on every k-th layer, none elsewhere) |
    mixed (selective on every k-th layer, full elsewhere)."""

    policy: str = "none"
    k: int = 1

    def plan(self, n_layers: int) -> list[str]:
        """The mode of each decoder layer (one of ``LAYER_MODES``); layer 0 first."""
        if self.policy in LAYER_MODES:
            return [self.policy] * n_layers
        if self.policy == "every":
            return ["full" if i % self.k == 0 else "none" for i in range(n_layers)]
        return ["selective" if i % self.k == self.k - 1 else "full" for i in range(n_layers)]  # mixed

    def __str__(self) -> str:
        return self.policy if self.policy in LAYER_MODES else f"{self.policy}_{self.k}"


def parse_policy(text: str) -> Checkpointing:
    """``none``, ``full``, ``selective``, ``every_<k>`` or ``mixed_<k>`` (k >= 1) -> ``Checkpointing``."""
    name = str(text).strip().lower()
    if name in LAYER_MODES:
        return Checkpointing(name)
    m = re.fullmatch(r"(every|mixed)_(\d+)", name)
    if not m or int(m.group(2)) < 1:
        raise UnsupportedCheckpointing(f"gradient_checkpointing={text!r}: choose one of {', '.join(POLICY_FORMS)} "
                                       "(k >= 1, e.g. every_2 or mixed_4)")
    return Checkpointing(m.group(1), int(m.group(2)))


def autocast_copy_bytes(params: int, mixed_precision: str) -> float:
    """Bytes of the 16-bit weight copies autocast caches during a forward: it casts each fp32 parameter
    (a leaf that requires grad) once and keeps the copy until the autocast region exits, so at the end
    of the forward, where activations peak, every trained weight has one (2 B per parameter). Measured on
    an H200 (Qwen3-1.7B shape, bf16): the peak's constant part is 3.5-4.7 GiB above the fp32 weights,
    gradients and AdamW moments; this copy is 3.2 GiB of it. Since then the trainer turns the cache off
    (``opd.trainer.make_accelerator``): on CPU that takes ~60% of the copies off a checkpointed peak (none
    off an unchecked one, whose backward needs them); counted whole here until a GPU measures it."""
    return 2.0 * params if mixed_precision in ("bf16", "fp16") else 0.0


@dataclass(frozen=True)
class LayerDims:
    """The widths of one decoder layer that decide what it holds for backward."""

    hidden: int
    intermediate: int
    q_dim: int  # attention heads x head_dim
    kv_dim: int  # key/value heads x head_dim

    @classmethod
    def of(cls, config) -> "LayerDims":
        """From a transformers config (or its dict): Llama, Qwen3 and their kin."""
        c = config if isinstance(config, dict) else config.to_dict()
        c = {**c, **(c.get("text_config") or {})}
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        return cls(c["hidden_size"], c["intermediate_size"], heads * head_dim,
                   (c.get("num_key_value_heads") or heads) * head_dim)

    def held_per_token(self, mode: str) -> float:
        """Bytes one layer holds per token under ``mode`` (bf16 autocast): ``full`` its fp32 input;
        ``selective`` that plus every matmul and attention output in bf16 (q, k, v, attention, o, gate,
        up, down: an exact count of what the policy saves, 52 kB at Qwen3-1.7B's widths, as profiled);
        ``none`` ``NONE_OVER_SELECTIVE`` times ``selective`` (the elementwise intermediates, measured)."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        full = 4.0 * h
        selective = full + 2.0 * (2 * q + 2 * kv + 2 * h + 2 * i)
        return {"full": full, "selective": selective, "none": NONE_OVER_SELECTIVE * selective}[mode]


def activation_bytes(policy: Checkpointing | str, tokens: int, dims: LayerDims, layers: int) -> float:
    """Bytes one micro-batch of ``tokens`` (padded positions, prompts included) holds for backward under
    ``policy``, plus one layer's worth being recomputed at a time: the estimate ``opd plan`` sizes the
    trainer with and ``benchmarks/gpu_update.py`` checks against the GPU's measured peak."""
    modes = (parse_policy(policy) if isinstance(policy, str) else policy).plan(layers)
    recomputed = dims.held_per_token("none") if any(m != "none" for m in modes) else 0.0
    return tokens * (sum(dims.held_per_token(m) for m in modes) + recomputed)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks (transformers ``GradientCheckpointingLayer``s), under DDP/peft/FSDP too."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise UnsupportedCheckpointing(f"{type(model).__name__} has no transformers GradientCheckpointingLayer: "
                                       "activation checkpointing covers transformers decoder models; use "
                                       "gradient_checkpointing=none for this model")
    return layers


def _ops(*names: str) -> frozenset:
    """The aten overloads among ``names`` that this torch has (attention kernels differ by version and device)."""
    out = set()
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            out.update(getattr(packet, o) for o in packet.overloads())
    return frozenset(out)


# outputs kept by ``selective``: the matmuls and the attention kernels (their outputs + log-sum-exp); what
# lies between them (norms, RoPE, SiLU, products, dtype casts, views) is recomputed
SAVED_OPS = _ops("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward")


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_fn(mode: str) -> Callable | None:
    """The ``_gradient_checkpointing_func`` for a layer mode (None for ``none``): non-reentrant
    ``torch.utils.checkpoint.checkpoint``, with the selective policy for ``selective``."""
    if mode == "none":
        return None
    if mode == "full":
        return partial(checkpoint, use_reentrant=False)
    if mode == "selective":
        return partial(checkpoint, use_reentrant=False,
                       context_fn=partial(create_selective_checkpoint_contexts, _save_matmuls))
    raise UnsupportedCheckpointing(f"layer mode {mode!r}: choose one of {LAYER_MODES}")


def apply_checkpointing(model, policy: Checkpointing | str) -> list[str]:
    """Set each decoder layer's checkpointing by ``policy`` (replacing any earlier setting); returns the
    per-layer plan. Call it on the student before or after DDP/FSDP2 wrapping, with or without peft.
    Takes effect in training mode only (transformers skips checkpointing under ``model.eval()``)."""
    pol = parse_policy(policy) if isinstance(policy, str) else policy
    layers = decoder_layers(model)
    plan = pol.plan(len(layers))
    for layer, mode in zip(layers, plan):
        fn = checkpoint_fn(mode)
        layer.gradient_checkpointing = fn is not None
        if fn is not None:
            layer._gradient_checkpointing_func = fn
    return plan


# ------------------------------------------------------------------------------------------------------
# Measuring it on CPU (a GPU run reads torch.cuda.max_memory_allocated instead)
# ------------------------------------------------------------------------------------------------------

def cpu_peak_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """(peak bytes allocated on the CPU above the level at the call, fn's result): every allocation and
    free that torch's CPU allocator sees while ``fn`` runs, replayed in time order (torch.profiler's
    memory events). Slow (the profiler), so for small models: tests and ``--device cpu`` smoke runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak, result
