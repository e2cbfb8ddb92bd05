"""`opd plan CONFIG`: which process holds which model, in which dtype, and how many bytes, before any
weight is loaded; a placement that cannot fit is refused with the fix named.

Shapes come from each model's config.json (a local directory, or the object under an s3:// path); the
parameter count from its safetensors headers when they are local, else from the Llama/Qwen3 formula.
Estimates, per GPU (or the host, on CPU):

- trainer: fp32 master weights + grads + AdamW moments, 16 B/param (FSDP: over the ranks; LoRA: frozen
  weights in their dtype, the adapters' 16 B/param small enough to ignore), under bf16/fp16 autocast the
  16-bit weight copies (2 B/param, whole on every rank: opd.memory.autocast_copy_bytes), plus activations:
  micro_batch x (max prompt + max completion) tokens x layers x bytes held per token-layer under the
  checkpointing policy (opd.memory.LayerDims: full the fp32 input, selective + every matmul output in
  bf16, none 2.5x selective; one layer recomputed at a time on top), plus the LM head: the full logits
  (~3 B per token x vocab under bf16 autocast, ~6.5 B in fp32) or one chunked block. Checked against
  an H200's measured peaks: benchmarks/gpu_update.py;
- a vLLM engine: its gpu_memory_utilization share of each GPU it spans (reserved up front), of which
  its weights / tensor_parallel_size; the rest is KV cache, which must hold one longest sequence;
- the evaluation (after the rounds; the engines stay up, the trainer is gone): each student copy in its dtype on
  the driver's GPU and the KL samples of one prompt (``generate`` decodes at least one; more if they fit); a
  learner group's round-end copy for the eval slice is the same size, loaded after the group exits;
- a transformers copy (hf sampler, hf scorer, a logit loss's teacher): weights in their dtype; the hf sampler
  also the KV cache of the rows it decodes at once (as many as 0.7 of its card besides its weights holds:
  ``opd.generation.prompts_that_fit``), the hf scorer one chunked LM-head block, a logit loss's
  teacher one micro-batch's [rows, tokens, vocab] logits.

A row is an estimate to plan with, not a promise: allocator fragmentation and framework workspaces add
a few GiB, which is why a GPU is judged full at 95%.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from opd.config import RunConfig
from opd.evaluation import eval_max_tokens
from opd.generation import BATCH_PROMPTS, bytes_per_row, kv_bytes_per_token, prompts_that_fit
from opd.lm_head import head_bytes
from opd.memory import LayerDims, activation_bytes, autocast_copy_bytes
from opd.models import config_dtype, count_params

GiB = 2**30
HEADROOM = 0.95  # of a device's memory a plan may fill
CPU_KV_CACHE = 1 * 2**30  # opd.vllm_engine's default VLLM_CPU_KVCACHE_SPACE
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STAGES = ("rounds", "evaluation")  # what holds memory at once: the engines and the trainer, then the engines
# and the evaluation's student copies


class PlanError(ValueError):
    """A model whose shape cannot be read (no config.json where the config points)."""


@dataclass(frozen=True)
class Shape:
    params: int
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype: str  # the checkpoint's own
    heads: int
    intermediate: int

    @property
    def dims(self) -> LayerDims:
        return LayerDims(self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim)

    def weight_bytes(self, dtype: str) -> int:
        return self.params * BYTES[dtype]

    def kv_bytes_per_token(self, dtype: str) -> int:
        return kv_bytes_per_token(self.config(), BYTES[dtype])

    def config(self) -> SimpleNamespace:
        """The config attributes ``opd.generation`` sizes a decoding batch by."""
        return SimpleNamespace(num_hidden_layers=self.layers, hidden_size=self.hidden, num_attention_heads=self.heads,
                               num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
                               intermediate_size=self.intermediate, vocab_size=self.vocab)


def formula_params(c: dict) -> int:
    """Llama/Qwen3 decoder: embeddings, attention (q, k, v, o; Qwen3's q/k norms), SwiGLU MLP, norms, head."""
    h, n_layers, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv, hd = c.get("num_key_value_heads") or heads, c.get("head_dim") or h // heads
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h + (2 * hd if c.get("model_type") == "qwen3" else 0)
    layer = attn + 3 * h * inter + 2 * h
    return vocab * h * (1 if c.get("tie_word_embeddings") else 2) + n_layers * layer + h


def read_shape(path: str, s3=None) -> Shape:
    """The shape of the model at ``path`` (a directory or s3://bucket/prefix) from its config.json."""
    try:
        if path.startswith("s3://"):
            bucket, _, prefix = path[5:].partition("/")
            body = s3.get_object(Bucket=bucket, Key=f"{prefix.rstrip('/')}/config.json")["Body"].read()
            c, local = json.loads(body), None
        else:
            local = Path(path)
            c = json.loads((local / "config.json").read_text())
    except Exception as e:  # noqa: BLE001 - any way of not finding it is the same refusal
        raise PlanError(f"no config.json readable at {path} ({type(e).__name__}): opd plan needs each model's "
                        "config.json (a local directory, or the S3 prefix holding it)") from None
    c = {**c, **(c.get("text_config") or {})}
    params = formula_params(c)
    if local is not None and list(local.glob("*.safetensors")):
        params = count_params(local)
    heads = c["num_attention_heads"]
    return Shape(params, c["num_hidden_layers"], c["hidden_size"], c.get("num_key_value_heads") or heads,
                 c.get("head_dim") or c["hidden_size"] // heads, c["vocab_size"], config_dtype(c), heads,
                 c["intermediate_size"])


@dataclass
class Holding:
    """One process's share of one device: what it holds there."""

    process: str
    device: str  # "cuda:0", "host", "remote"
    holds: str
    parts: dict[str, float] = field(default_factory=dict)  # bytes by kind
    stage: str = "all"  # "all" (the engines: up from SFT to the evaluation), or one of STAGES

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass
class Plan:
    holdings: list[Holding]
    capacity: float  # bytes per device
    problems: list[str]
    notes: list[str]

    def per_device(self, stage: str | None = None) -> dict[str, float]:
        """Bytes per device during ``stage``; None: in the stage that fills it most."""
        if stage is None:
            by_stage = [self.per_device(st) for st in STAGES]
            return {d: max(b.get(d, 0.0) for b in by_stage) for b in by_stage for d in b}
        out: dict[str, float] = {}
        for h in self.holdings:
            if h.device != "remote" and h.stage in ("all", stage):
                out[h.device] = out.get(h.device, 0.0) + h.total
        return out


def _dtype(requested: str, shape: Shape, on_gpu: bool) -> str:
    return requested if requested != "auto" else (shape.dtype if on_gpu else "float32")


def _trainer_parts(cfg: RunConfig, s: Shape, ranks: int) -> dict[str, float]:
    t, o = cfg.training, cfg.opd
    shard = ranks if t.strategy == "fsdp" else 1
    if o.lora is not None:
        state = {"weights (frozen)": s.weight_bytes(_dtype(cfg.student.dtype, s, True)) / shard}
    else:  # autocast's bf16 weight copies, whole on every rank, as an H200 measured them with the cast cache on
        # (under FSDP the gathered weights are cast too); the trainer now turns the cache off: a GPU run to measure
        state = {"weights + grads + Adam (fp32)": 16 * s.params / shard,
                 "bf16 weight copies (autocast)": autocast_copy_bytes(s.params, t.mixed_precision)}
    tokens = o.micro_batch * (cfg.data.max_prompt_tokens + o.max_tokens)
    act = activation_bytes(t.gradient_checkpointing, tokens, s.dims, s.layers)
    head = head_bytes(t.lm_head, tokens, s.vocab, t.mixed_precision)
    return {**state, "activations": act, "LM head": head}


def plan(cfg: RunConfig, student: Shape, teacher: Shape, gpu_gib: float = 80.0, host_gib: float | None = None,
         ) -> Plan:
    on_gpu = cfg.device != "cpu"
    o, t = cfg.opd, cfg.training
    cap = gpu_gib * GiB if on_gpu else (host_gib or 0) * GiB
    gpu = (lambda i: f"cuda:{i}") if on_gpu else (lambda i: "host")
    hs: list[Holding] = []
    problems: list[str] = []
    notes: list[str] = []
    seq = cfg.data.max_prompt_tokens + o.max_tokens
    s_dt, t_dt = _dtype(cfg.student.dtype, student, on_gpu), _dtype(cfg.teacher.dtype, teacher, on_gpu)

    def engine(process: str, shape: Shape, dtype: str, share: float, tp: int, field_: str) -> None:
        for i in range(tp):
            reserved = share * cap if on_gpu else 0
            w = shape.weight_bytes(dtype) / tp
            kv = max(reserved - w, 0) if on_gpu else CPU_KV_CACHE  # vLLM-cpu: VLLM_CPU_KVCACHE_SPACE
            hs.append(Holding(process, gpu(i), f"{'student' if 'sampler' in process else 'teacher'} ({dtype})",
                              {"weights": w, "KV cache": kv}))
            if on_gpu and kv < shape.kv_bytes_per_token(dtype) / tp * seq:
                problems.append(f"{process} on {gpu(i)}: {field_}={share} reserves {reserved / GiB:.1f} GiB, "
                                f"under its weights ({w / GiB:.1f} GiB) plus one {seq}-token sequence's KV cache: "
                                f"raise {field_} or the engine's tensor_parallel_size")
            elif on_gpu and i == 0:
                per_seq = shape.kv_bytes_per_token(dtype) / tp * seq
                notes.append(f"{process}: KV cache for {int(kv // per_seq)} concurrent {seq}-token sequences "
                             f"(a step samples {o.prompts_per_step * o.samples_per_prompt})")

    if o.sampler == "vllm":
        engine("sampler engine (vLLM)", student, s_dt, o.gpu_memory_utilization, o.tensor_parallel_size,
               "opd.gpu_memory_utilization")
    else:
        per_batch = min(BATCH_PROMPTS, o.prompts_per_step)
        if on_gpu:  # generate cuts its batch to the free memory: at most what its card holds besides its weights
            per_batch = prompts_that_fit(student.config(), BYTES[s_dt], cfg.data.max_prompt_tokens, seq,
                                         o.samples_per_prompt, cap - student.weight_bytes(s_dt), per_batch)
            notes.append(f"driver (hf sampler): {per_batch} of the step's {o.prompts_per_step} prompts (x "
                         f"{o.samples_per_prompt} samples) decoded at once, less if its card holds more")
        rows = per_batch * o.samples_per_prompt
        hs.append(Holding("driver (hf sampler)", gpu(0), f"student ({s_dt})",
                          {"weights": student.weight_bytes(s_dt),
                           "KV cache": rows * seq * student.kv_bytes_per_token(s_dt)}))
    logits = o.loss.signal == "logits"
    if cfg.teacher.scorer == "remote":
        hs.append(Holding("teacher server (teacher.endpoint)", "remote", f"teacher ({t_dt})",
                          {"weights": teacher.weight_bytes(t_dt)}))
    elif cfg.teacher.scorer == "vllm":
        engine("teacher engine (vLLM)", teacher, t_dt, cfg.teacher.gpu_memory_utilization,
               cfg.teacher.tensor_parallel_size, "teacher.gpu_memory_utilization")
    elif not logits:  # its head runs in row blocks (opd.logprobs.completion_logprobs, completion_topk)
        hs.append(Holding("driver (hf scorer)", gpu(0), f"teacher ({t_dt})",
                          {"weights": teacher.weight_bytes(t_dt),
                           "LM-head block": head_bytes("chunked", o.micro_batch * seq, teacher.vocab)}))
    ranks = t.num_processes
    devices = t.devices or list(range(ranks))
    for r in range(ranks):
        parts = _trainer_parts(cfg, student, ranks)
        if logits:
            parts["teacher (logit loss)"] = teacher.weight_bytes(t_dt)
            parts["teacher logits"] = o.micro_batch * seq * teacher.vocab * BYTES[t_dt]  # one micro-batch's, whole
        name = "driver (trainer)" if ranks == 1 else f"learner rank {r}"
        hs.append(Holding(name, gpu(devices[r] if ranks > 1 else 0), "student (fp32 master)", parts, "rounds"))
    width = cfg.data.max_prompt_tokens + eval_max_tokens(cfg)
    hs.append(Holding("driver (evaluation)", gpu(0), f"student ({s_dt})",
                      {"weights": student.weight_bytes(s_dt), "one prompt's KL samples": cfg.eval.kl_samples_per_prompt
                       * bytes_per_row(student.config(), BYTES[s_dt], cfg.data.max_prompt_tokens, width)},
                      "evaluation"))
    for stage in STAGES:
        for dev, used in Plan(hs, cap, [], []).per_device(stage).items():
            if cap and used > HEADROOM * cap:
                who = ", ".join(f"{h.process} {h.total / GiB:.1f}" for h in hs
                                if h.device == dev and h.stage in ("all", stage))
                problems.append(f"{dev} in the {stage}: {used / GiB:.1f} GiB planned of {cap / GiB:.0f} ({who}): "
                                + (_fixes(cfg) if stage == "rounds" else _eval_fixes(cfg)))
    return Plan(hs, cap, problems, notes)


def _eval_fixes(cfg: RunConfig) -> str:
    """The evaluation loads each student beside the engines the rounds kept up."""
    fixes = []
    if cfg.opd.sampler == "vllm":
        fixes.append(f"a smaller opd.gpu_memory_utilization (now {cfg.opd.gpu_memory_utilization})")
    if cfg.teacher.scorer == "vllm":
        fixes.append(f"a smaller teacher.gpu_memory_utilization (now {cfg.teacher.gpu_memory_utilization})")
    if cfg.teacher.scorer in ("hf", "vllm"):
        fixes.append("teacher.scorer=remote")
    if cfg.student.dtype == "float32" or (cfg.student.dtype == "auto" and cfg.device == "cpu"):
        fixes.append("student.dtype=bfloat16")
    return "the evaluation's student copy loads beside the engines the rounds kept up: try " + "; ".join(
        fixes or ["a GPU with more memory"])


def _fixes(cfg: RunConfig) -> str:
    t, o = cfg.training, cfg.opd
    fixes = []
    if t.lm_head == "full" and o.loss.signal == "logprobs":
        fixes.append("training.lm_head=chunked")
    if t.gradient_checkpointing != "full":
        fixes.append("training.gradient_checkpointing=full")
    if o.micro_batch > 1:
        fixes.append(f"a smaller opd.micro_batch (now {o.micro_batch})")
    if t.strategy != "fsdp" or t.num_processes == 1:
        fixes.append("training.strategy=fsdp over more training.num_processes")
    if o.sampler == "hf":
        fixes.append("opd.sampler=vllm (a paged KV cache of a fixed size; the hf sampler's grows with every row)")
    if o.sampler == "vllm" and t.num_processes == 1:
        fixes.append("the update on its own GPUs (training.num_processes, training.devices)")
    if cfg.teacher.scorer != "remote":
        fixes.append("teacher.scorer=remote")
    return "try " + "; ".join(fixes)
