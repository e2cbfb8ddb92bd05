"""`opd.generation.generate` on a real model's shape: the batch it cuts to the free GPU memory, and what the cut
changes in the completions.

    python benchmarks/gpu_generate.py                                     # Qwen3-1.7B shape, bf16, on the GPU
    python benchmarks/gpu_generate.py --device cpu --shape tiny --prompts 6 --prompt-tokens 16   # smoke run

The evaluation decodes a real student's KL samples with ``generate`` (4 samples per prompt at up to the
prompt + completion budget), which sizes its batch by ``opd.generation.prompts_that_fit`` from
``torch.cuda.mem_get_info``; the sixth session wrote that cut and it has not run on a GPU yet. This script
decodes ``--prompts`` random prompts of ``--prompt-tokens`` tokens (``--samples`` each, ``--max-tokens``
new tokens) three ways: greedy at the batch ``generate`` picks, sampled (keyed per row) at that batch, and both
again at ``--small-batch`` prompts per batch. It records the batch picked, the peak memory
(``torch.cuda.max_memory_allocated``) beside what ``bytes_per_row`` predicts for that batch, the seconds of each
decode, and how many completions agree between the two batchings: the keyed draws make sampled rows
independent of the cut, so what differs is the kernels' rounding (bf16: batch-shape-dependent) flipping a
near-tie. The random-init student's LM head is scaled (``--head-scale``) so its next-token distribution is
peaked as a trained model's is, not near-uniform (where every step would be a tie).

Needs only torch and transformers (the bare GPU image lacks vLLM, Prefect, pydantic, datasets, boto3). The
JSON is rewritten after every decode, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.gpu_update import SHAPES, environment, write  # noqa: E402
from opd.generation import BATCH_PROMPTS, bytes_per_row, generate, prompts_that_fit  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_generate.json"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=8192, help="long enough that one batch would not fit")
    p.add_argument("--samples", type=int, default=4, help="per prompt, as the evaluation's KL samples")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--small-batch", type=int, default=8, help="prompts per batch in the second decode")
    p.add_argument("--head-scale", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU here; use --device cpu (with --shape tiny)")
    return a


def build(a, device: torch.device):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**SHAPES[a.shape], max_position_embeddings=a.prompt_tokens + a.max_tokens + 8,
                      pad_token_id=0, eos_token_id=1)
    torch.manual_seed(a.seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(DTYPES[a.dtype])
    with torch.no_grad():
        model.lm_head.weight.mul_(a.head_scale)  # tied to the embeddings in the small shapes: both scaled
    return model.eval()


def decode(a, model, prompts, device, temperature: float, batch_size: int) -> tuple[list[list[int]], dict]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    out = generate(model, prompts, 1, 0, a.max_tokens, temperature=temperature, n=a.samples,
                   batch_size=batch_size, seed=a.seed if temperature > 0 else None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats = {"seconds": time.perf_counter() - t0, "new_tokens": sum(map(len, out))}
    if device.type == "cuda":
        stats["peak_above_weights_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return out, stats


def agreement(x: list[list[int]], y: list[list[int]]) -> dict:
    same = sum(a == b for a, b in zip(x, y))
    first = [next((i for i, (s, t) in enumerate(zip(a, b)) if s != t), None) for a, b in zip(x, y)]
    return {"rows": len(x), "identical": same, "fraction": same / len(x),
            "first_difference_at": sorted(f for f in first if f is not None)[:20]}


def main(argv=None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device)
    model = build(a, device)
    rng = random.Random(a.seed)
    vocab = SHAPES[a.shape]["vocab_size"]
    prompts = [[rng.randrange(2, vocab) for _ in range(a.prompt_tokens)] for _ in range(a.prompts)]
    elem = next(model.parameters()).element_size()
    width = a.prompt_tokens + a.max_tokens
    picked = (prompts_that_fit(model.config, elem, a.prompt_tokens, width, a.samples,
                               torch.cuda.mem_get_info(device)[0]) if device.type == "cuda"
              else min(BATCH_PROMPTS, a.prompts))
    res = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
           "environment": environment(a, device),
           "cut": {"prompts_per_batch": picked, "of": a.prompts,
                   "predicted_gib": picked * a.samples * bytes_per_row(model.config, elem, a.prompt_tokens, width)
                   / 2**30},
           "decodes": {}}
    print(f"{a.shape} {a.dtype} on {a.device}: {a.prompts} prompts x {a.samples} samples of {a.prompt_tokens} + "
          f"{a.max_tokens} tokens; generate cuts to {picked} prompts per batch (predicted "
          f"{res['cut']['predicted_gib']:.1f} GiB above the weights)", flush=True)
    outs = {}
    for name, temperature, batch in (("greedy_cut", 0.0, BATCH_PROMPTS), ("sampled_cut", 1.0, BATCH_PROMPTS),
                                     ("greedy_small", 0.0, a.small_batch), ("sampled_small", 1.0, a.small_batch)):
        outs[name], res["decodes"][name] = decode(a, model, prompts, device, temperature, batch)
        print(f"  {name}: {res['decodes'][name]}", flush=True)
        write(res, a.out)
    res["agreement"] = {"greedy": agreement(outs["greedy_cut"], outs["greedy_small"]),
                        "sampled": agreement(outs["sampled_cut"], outs["sampled_small"])}
    print(f"  identical between the cut and {a.small_batch}-prompt batches: greedy "
          f"{res['agreement']['greedy']['identical']}/{len(outs['greedy_cut'])}, sampled "
          f"{res['agreement']['sampled']['identical']}/{len(outs['sampled_cut'])}")
    write(res, a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
