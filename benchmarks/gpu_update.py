"""Memory and speed of the student update: micro-batch x activation checkpointing x full logits vs chunked LM head.

    python benchmarks/gpu_update.py                                  # Qwen3-1.7B shape on the GPU, the issue-15 grid
    python benchmarks/gpu_update.py --micro-batches 8 --policies full,mixed_4 --heads chunked
    python benchmarks/gpu_update.py --memory-limit-gib 80            # as if on an 80 GB card
    python benchmarks/gpu_update.py --device cpu --shape tiny        # smoke run in seconds (tests/test_gpu_update.py)
    python benchmarks/gpu_update.py --replan benchmarks/results/gpu_update*.json  # re-estimate, measurements kept

The update is the engine's own: ``opd.learner.learn_step`` on an ``opd.trainer.StudentTrainer``, with the
default loss (``reverse_kl_is``: the reverse-KL advantage of ``opd.objectives.advantages`` fed to
``importance_sampled_pg``): accelerate's bf16 autocast over fp32 master weights, length-sorted micro-batches
with gradient accumulation weighted by tokens, grad-norm clipping at 1.0, AdamW (betas 0.9/0.98), the
activation checkpointing of ``opd.memory`` and the chunked LM head of ``opd.lm_head``. The student is
random-init with a real model's shape (``--shape``); the rollouts are random tokens: ``--rollouts`` rows of
``--prompt-tokens`` prompt tokens and up to ``--max-completion`` completion tokens (``--lengths uniform``:
drawn from 1..max, seeded; ``max``: all at the maximum).

Each configuration builds the student afresh from the same seed (so every row computes the same first
update: ``first_loss`` / ``first_grad_norm`` must agree across rows), runs ``--warmup`` + ``--steps``
steps and records the peak memory (``torch.cuda.max_memory_allocated`` over all its steps; on CPU the
CPU allocator's peak over one extra profiled step), tokens/s (completion tokens / median timed step) and
the step seconds, beside ``predicted_gib``: what ``opd plan`` would size this update at (fp32 weights,
gradients and AdamW moments, autocast's bf16 weight copies, ``opd.memory.activation_bytes`` of the
largest padded micro-batch, ``opd.lm_head.head_bytes``), so a GPU run checks the planner's arithmetic
(``--replan`` re-estimates a results file after that arithmetic changes). A configuration that runs out
of memory is recorded as ``oom`` and the grid goes on; the JSON is rewritten after every row, so a run
cut short keeps what it measured.

Needs only torch, transformers, accelerate and peft (and this repository's ``opd`` core, which imports
without them): no vLLM, Prefect, pydantic, datasets or boto3, which the bare GPU image lacks. The loss
spec is ``ReverseKLIS`` below, the default of ``opd.config.ReverseKLIS`` without pydantic.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the opd package is the repository's
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import opd.learner  # noqa: E402
from opd.batching import length_buckets  # noqa: E402
from opd.learner import learn_step  # noqa: E402
from opd.lm_head import head_bytes, window_logprobs  # noqa: E402
from opd.memory import (LayerDims, activation_bytes, apply_checkpointing, autocast_copy_bytes,  # noqa: E402
                        cpu_peak_bytes, parse_policy)
from opd.objectives import advantages  # noqa: E402
from opd.rollouts import Rollout, TrainBatch  # noqa: E402
from opd.trainer import StudentTrainer  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_update.json"

# Qwen3 shapes from the released configs (random init here); "tiny" keeps the architecture for CPU runs
SHAPES: dict[str, dict] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-4b": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
HEADS = ("full", "chunked")
LR = 1e-5


@dataclass(frozen=True)
class ReverseKLIS:
    """``opd.config.ReverseKLIS`` at its defaults (the reference report's loss), without pydantic."""
    kind: str = "reverse_kl_is"
    kl_coef: float = 1.0
    clip_ratio: float | None = None
    baseline: str = "none"
    discount: float = 0.0


SPEC = ReverseKLIS()


@dataclass
class Row:
    """One rollout: prompt and completion ids with the sampler's and the teacher's per-token log-probs."""
    prompt_ids: list[int]
    completion_ids: list[int]
    sampler_logprobs: list[float]
    teacher_logprobs: list[float]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    p.add_argument("--vocab", type=int, default=None, help="override the shape's vocabulary size")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--rollouts", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-completion", type=int, default=2048)
    p.add_argument("--lengths", default="uniform", choices=["uniform", "max"],
                   help="completion lengths: uniform in 1..max (seeded), or all at max")
    p.add_argument("--micro-batches", default="2,4,8,16", help="comma-separated rows per forward/backward")
    p.add_argument("--policies", default="none,full,selective,mixed_4",
                   help="comma-separated checkpointing policies (opd.memory: none, full, selective, every_<k>, mixed_<k>)")
    p.add_argument("--heads", default="full,chunked", help="comma-separated: full (logits + sampled_logprobs), "
                                                           "chunked (opd.lm_head.window_logprobs)")
    p.add_argument("--block-rows", type=int, default=None, help="chunked head rows per block (default: by vocab)")
    p.add_argument("--mixed-precision", default="bf16", choices=["bf16", "no"])
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (peft); 0: full")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="cap this process's memory (CUDA: allocator fraction, e.g. 80 for an 80 GB card; "
                        "CPU: writable memory above the level at the start)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no configuration after this many seconds; the rest are recorded as skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    a.micro_batches = [int(x) for x in a.micro_batches.split(",") if x]
    try:
        a.policies = [str(parse_policy(x)) for x in a.policies.split(",") if x]
    except ValueError as e:
        p.error(str(e))
    a.heads = [x for x in a.heads.split(",") if x]
    bad = [h for h in a.heads if h not in HEADS]
    if bad or not a.heads or not a.micro_batches or min(a.micro_batches) < 1:
        p.error(f"--heads from {HEADS}, --micro-batches positive integers (got heads={a.heads}, "
                f"micro-batches={a.micro_batches})")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU here; use --device cpu (with --shape tiny)")
    return a


def make_rows(a, vocab: int) -> list[Row]:
    """Seeded random rollouts: token ids in [1, vocab) (0 pads), log-probs in the range real ones take."""
    rng = random.Random(a.seed)
    rows = []
    for _ in range(a.rollouts):
        n = a.max_completion if a.lengths == "max" else rng.randint(1, a.max_completion)
        rows.append(Row([rng.randrange(1, vocab) for _ in range(a.prompt_tokens)],
                        [rng.randrange(1, vocab) for _ in range(n)],
                        [-rng.uniform(0.0, 4.0) for _ in range(n)], [-rng.uniform(0.0, 4.0) for _ in range(n)]))
    return rows


def build_student(a, device: torch.device):
    """The random-init student in fp32 (master weights), on ``device``, from ``--seed``; LoRA if asked."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shape = dict(SHAPES[a.shape], **({"vocab_size": a.vocab} if a.vocab else {}))
    cfg = Qwen3Config(**shape, max_position_embeddings=a.prompt_tokens + a.max_completion + 8, pad_token_id=0)
    torch.manual_seed(a.seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg)
    if a.lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=a.lora_rank, lora_alpha=2 * a.lora_rank, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"]))
    return model.train()


def train_batch(rows: list[Row]) -> TrainBatch:
    """The rollouts with the default loss's advantages, fixed at scoring time as the engine fixes them."""
    adv_P, _kl = advantages(SPEC, [r.sampler_logprobs for r in rows], [r.teacher_logprobs for r in rows])
    return TrainBatch([Rollout(i, r.prompt_ids, r.completion_ids, r.sampler_logprobs, True)
                       for i, r in enumerate(rows)], adv_P)


def largest_micro_batch(rows: list[Row], micro_batch: int) -> int:
    """Padded positions of the largest micro-batch the learner cuts (rows sorted by length as
    ``learn_step`` sorts them): what one forward holds for backward."""
    lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in rows]
    order = length_buckets(lengths, 1, micro_batch)
    return max(max(lengths[i] for i in order[s:s + micro_batch]) * len(order[s:s + micro_batch])
               for s in range(0, len(order), micro_batch))


def predicted(a, rows: list[Row], micro_batch: int, policy: str, head: str) -> dict:
    """``opd plan``'s estimate of this update (its trainer row on one process), from the student built on
    the meta device (no memory, any shape): for every row, the ones that run out of memory included."""
    model = build_student(a, torch.device("meta"))
    cfg = model.config
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    tokens = largest_micro_batch(rows, micro_batch)
    parts = {"weights + grads + Adam (fp32)": 16 * trainable + 4 * frozen,
             "bf16 weight copies (autocast)": autocast_copy_bytes(trainable, a.mixed_precision),
             "activations": activation_bytes(policy, tokens, LayerDims.of(cfg), cfg.num_hidden_layers),
             "LM head": head_bytes(head, tokens, cfg.vocab_size, a.mixed_precision, a.block_rows)}
    return {"micro_batch_tokens": tokens, "predicted_gib": sum(parts.values()) / 2**30,
            "predicted_parts_gib": {k: v / 2**30 for k, v in parts.items()}}


def replan(path: Path) -> dict:
    """Rewrite the estimate of every row of a results file with this checkout's ``opd plan`` arithmetic,
    the measurements untouched: the rollouts are seeded, so the micro-batches are rebuilt exactly. How a
    GPU run keeps checking the planner after its constants change, with no GPU."""
    result = json.loads(path.read_text())
    a = argparse.Namespace(**{**result["settings"], "out": Path(result["settings"]["out"])})
    rows = make_rows(a, a.vocab or SHAPES[a.shape]["vocab_size"])
    for r in result["rows"]:
        r.update(predicted(a, rows, r["micro_batch"], r["checkpointing"], r["head"]))
    write(result, path)
    return result


def is_oom(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's refusal (a RuntimeError)."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e)))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(a, rows: list[Row], device, micro_batch: int, policy: str, head: str) -> dict:
    """Build, checkpoint, and time one configuration of the engine's update; the caller handles OOM."""
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # > 0: an earlier row leaked
    model = build_student(a, device)
    plan = apply_checkpointing(model, policy)
    trainer = StudentTrainer(model, LR, mixed_precision=a.mixed_precision, device=a.device)
    batch = train_batch(rows)

    def step():
        return learn_step(trainer, batch, SPEC, pad_id=0, micro_batch=micro_batch, lm_head=head)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, metrics = [], []
    for i in range(a.warmup + a.steps):
        _sync(device)
        t = time.perf_counter()
        metrics.append(step())
        _sync(device)
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak, m = cpu_peak_bytes(step)  # one more step under the profiler (Adam state already allocated)
        metrics.append(m)
    tokens = sum(len(r.completion_ids) for r in rows)
    step_s = statistics.median(times) if times else math.nan
    return {"status": "ok", "peak_gib": peak / 2**30, "allocated_before_gib": before / 2**30,
            "tokens_per_s": tokens / step_s,
            "step_s": step_s, "step_s_all": times, "first_loss": metrics[0]["loss"],
            "first_grad_norm": metrics[0]["grad_norm"], "last_loss": metrics[-1]["loss"], "plan": plan}


def cap_memory(a, device) -> None:
    """Emulate a smaller card (CUDA: the caching allocator's fraction of the device) or a memory-bounded host
    (CPU: RLIMIT_DATA, the process's writable private memory, at today's level + the limit)."""
    if a.memory_limit_gib is None:
        return
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.memory_limit_gib * 2**30 / total), device)
        return
    import resource

    data = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmData"))
    limit = data + int(a.memory_limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(a, device) -> dict:
    import transformers

    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def run_grid(a) -> dict:
    device = torch.device(a.device)
    if a.block_rows:  # the engine's chunked head takes its default block; a smaller one shows the mechanism on CPU
        opd.learner.window_logprobs = partial(window_logprobs, block_rows=a.block_rows)
    vocab = a.vocab or SHAPES[a.shape]["vocab_size"]
    rows = make_rows(a, vocab)
    cap_memory(a, device)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    result = {"settings": settings, "environment": environment(a, device),
              "tokens_per_step": sum(len(r.completion_ids) for r in rows), "rows": []}
    t0 = time.perf_counter()
    for mb in a.micro_batches:
        for policy in a.policies:
            for head in a.heads:
                row = {"shape": a.shape, "micro_batch": mb, "checkpointing": policy, "head": head,
                       **predicted(a, rows, mb, policy, head)}
                if a.max_seconds is not None and time.perf_counter() - t0 > a.max_seconds:
                    row.update(status="skipped", error=f"--max-seconds {a.max_seconds} spent")
                else:
                    row.update(_guarded(a, rows, device, mb, policy, head))
                result["rows"].append(row)
                print(format_row(row), flush=True)
                write(result, a.out)
    return result


def _guarded(a, rows, device, mb, policy, head) -> dict:
    """run_config, with an OOM (or any failure) recorded instead of ending the grid."""
    error = None
    try:
        return run_config(a, rows, device, mb, policy, head)
    except Exception as e:  # noqa: BLE001 - one configuration's failure is a result, not the end of the run
        error = ("oom" if is_oom(e) else "error", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        del e  # the traceback holds the step's tensors: drop it before freeing
    finally:
        _free(device)
    return {"status": error[0], "error": error[1]}


HEADER = (f"{'micro':>5} {'checkpointing':>13} {'head':>8} {'status':>7} {'peak GiB':>9} {'planned':>8} "
          f"{'tokens/s':>10} {'step s':>8}")


def format_row(r: dict) -> str:
    def num(k, fmt):
        v = r.get(k)
        return format(v, fmt) if isinstance(v, (int, float)) else format("-", ">" + fmt.split(".")[0])

    return (f"{r['micro_batch']:>5} {r['checkpointing']:>13} {r['head']:>8} {r['status']:>7} "
            f"{num('peak_gib', '9.2f')} {num('predicted_gib', '8.2f')} {num('tokens_per_s', '10.0f')} "
            f"{num('step_s', '8.3f')}")


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--replan"]:  # --replan RESULTS.json...: no GPU needed
        for path in argv[1:]:
            result = replan(Path(path))
            print(f"{path}: {result['settings']['shape']}\n{HEADER}")
            for r in result["rows"]:
                print(format_row(r))
        return 0
    a = parse_args(argv)
    print(f"shape={a.shape} device={a.device} rollouts={a.rollouts} prompt={a.prompt_tokens} "
          f"completion<={a.max_completion} ({a.lengths}) precision={a.mixed_precision}"
          + (f" lora r={a.lora_rank}" if a.lora_rank else ""), flush=True)
    print(HEADER, flush=True)
    result = run_grid(a)
    print(f"wrote {a.out}")
    return 0 if all(r["status"] in ("ok", "oom", "skipped") for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
