"""`opd plan`: per process, which models it holds, in which dtype, and the memory; refusals name the fix.
The Qwen3 shapes are the published configs of Qwen3-8B and Qwen3-32B (config.json only: no weights)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QWEN = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 128, "num_key_value_heads": 8,
        "vocab_size": 151936, "torch_dtype": "bfloat16", "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen")
    for name, shape in (("Qwen3-8B", dict(hidden_size=4096, num_hidden_layers=36, intermediate_size=12288,
                                          num_attention_heads=32)),
                        ("Qwen3-32B", dict(hidden_size=5120, num_hidden_layers=64, intermediate_size=25600,
                                           num_attention_heads=64))):
        (d / name).mkdir()
        (d / name / "config.json").write_text(json.dumps({**QWEN, **shape}))
    return [f"--set=student.path={d / 'Qwen3-8B'}", f"--set=teacher.path={d / 'Qwen3-32B'}"]


def _plan(*args):
    p = subprocess.run([sys.executable, "-m", "opd_ops.cli", "plan", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "COLUMNS": "250"})
    return p.returncode, p.stdout + p.stderr


def test_the_qwen_config_fits_with_only_the_server_holding_the_teacher(qwen):
    rc, out = _plan("configs/qwen3-8b-from-32b.yaml", *qwen)
    assert rc == 0 and out.rstrip().endswith("fits"), out
    teacher_rows = [ln for ln in out.splitlines() if "teacher (" in ln]
    assert len(teacher_rows) == 1 and "teacher server" in teacher_rows[0] and "remote" in teacher_rows[0], out
    assert "61.0" in teacher_rows[0]  # 32.8B params in bf16, never on our GPUs
    assert "weights 7.6" in out  # 8.19B params in bf16: the sampler's copy, half on each of its two GPUs
    assert "cuda:2: 66.4 of 80 GiB" in out, out
    assert "cuda:0: 59.5 of 80 GiB" in out, out  # in the evaluation: the sampler's 40 + the student's 15.3 + 4.2


def test_a_placement_that_cannot_fit_is_refused_with_the_fix(qwen):
    rc, out = _plan("configs/qwen3-8b-from-32b.yaml", *qwen, "--set", "training.gradient_checkpointing=none",
                    "--set", "training.lm_head=full")
    assert rc == 2 and "does not fit" in out, out
    assert "learner rank 0" in out and "training.gradient_checkpointing=full" in out and \
        "training.lm_head=chunked" in out, out
    # the hf scorer holds its weights and one chunked LM-head block; a logit loss's teacher, one micro-batch's
    # logits whole (4 x 6,144 x 151,936 x 2 B)
    rc, out = _plan("configs/qwen3-8b-from-32b.yaml", *qwen, "--set", "teacher.scorer=hf")
    assert rc == 2 and "driver (hf scorer)" in out and "weights 61.0, LM-head block 1.2" in out, out
    rc, out = _plan("configs/qwen3-8b-from-32b.yaml", *qwen, "--set", "teacher.scorer=hf", "--set",
                    "opd.loss=reverse_kl_full", "--set", "training.lm_head=full")
    rank = next(ln for ln in out.splitlines() if "learner rank 0" in ln)
    # 30.5 fp32 state + 15.3 bf16 copies + 19.4 activations + 10.4 student logits + 61.0 teacher + 7.0 its logits
    assert rc == 2 and "teacher (logit loss) 61.0" in rank and " 143.6 " in rank, out
    # the hf sampler decodes as many of the step's 64 prompts x 4 samples as its card holds (all at once: 216 GiB
    # of KV cache): 10 prompts in 0.7 of 80 - 15.3 GiB at ~1.05 GiB per 6,144-token row, 33.8 GiB of KV cache
    rc, out = _plan("configs/qwen3-8b-from-32b.yaml", *qwen, "--set", "opd.sampler=hf",
                    "--set", "opd.tensor_parallel_size=1")
    assert rc == 0 and "weights 15.3, KV cache 33.8" in out and "10 of the step's 64 prompts" in out, out
    rc, out = _plan("configs/qwen3-8b-from-32b.yaml", *qwen, "--set", "opd.sampler=hf",
                    "--set", "opd.tensor_parallel_size=1", "--gpu-gib", "16")  # weights alone nearly fill the card
    sampler = next(ln for ln in out.splitlines() if "cuda:0 in the rounds:" in ln)  # 1 prompt: 15.3 + 3.4
    assert rc == 2 and "driver (hf sampler) 18.6" in sampler and "opd.sampler=vllm" in sampler, out
    # the evaluation loads the student (bf16) beside the engines the rounds kept up: with the sampler's share at
    # 0.8 the rounds fit (learners on GPUs 2-5), its 64 GiB + 15.3 GiB of weights + 4 KL samples do not
    rc, out = _plan("configs/qwen3-8b-from-32b.yaml", *qwen, "--set", "opd.gpu_memory_utilization=0.8")
    ev = next(ln for ln in out.splitlines() if "driver (evaluation)" in ln and "cuda:0" in ln)
    assert rc == 2 and "weights 15.3, one prompt's KL samples 4.2" in ev, out
    assert "cuda:0 in the evaluation: 83.5 GiB" in out and "opd.gpu_memory_utilization (now 0.8)" in out, out
    assert "in the rounds" not in out, out
    rc, out = _plan("configs/qwen3-8b-from-32b.yaml", *qwen, "--set", "teacher.scorer=vllm")
    assert rc == 2 and "teacher engine (vLLM) on cuda:0: teacher.gpu_memory_utilization=0.3 reserves 24.0 GiB" in out


def test_a_cpu_run_is_planned_against_the_host(tmp_path):
    from opd.config import ModelSpec
    from opd.models import build_char_tokenizer, build_llama, save_model

    tok = build_char_tokenizer()
    spec = ModelSpec(num_layers=2, hidden_size=64, num_heads=2, intermediate_size=128)
    s = save_model(build_llama(spec, tok, 48, 0), tok, tmp_path / "s")
    t = save_model(build_llama(spec, tok, 48, 1), tok, tmp_path / "t")
    rc, out = _plan("configs/ci.yaml", "--set", f"student.path={s}", "--set", "student.model=null",
                    "--set", f"teacher.path={t}", "--set", "device=cpu", "--host-gib", "24")
    assert rc == 0 and "CPU, 24 GiB" in out and "host" in out and out.rstrip().endswith("fits"), out


def test_a_model_without_a_config_is_named(tmp_path):
    rc, out = _plan("configs/qwen3-8b-from-32b.yaml", "--set", f"student.path={tmp_path}",
                    "--set", f"teacher.path={tmp_path}")
    assert rc == 2 and f"no config.json readable at {tmp_path}" in out, out
