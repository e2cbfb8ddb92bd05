"""training.gradient_checkpointing and training.lm_head change what an update holds, not what it computes:
the same OPD step (reverse_kl_is) with every setting gives the same loss, gradient norm and new weights."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from opd.config import ModelSpec, ReverseKLIS, load_config
from opd.errors import PermanentError
from opd.learner import learn_step
from opd.memory import apply_checkpointing
from opd.models import build_char_tokenizer, build_llama
from opd.rollouts import Rollout, TrainBatch
from opd.trainer import StudentTrainer

VOCAB = 3000  # the chunked head runs in several row blocks at this width


def _batch(seed=0):
    rng = random.Random(seed)
    rollouts = []
    for i in range(6):
        p = [1] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 9))]
        c = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 12))]
        rollouts.append(Rollout(i, p, c, [-8.0 + rng.random() for _ in c], False))
    adv = [[rng.uniform(-1, 1) for _ in r.completion_ids] for r in rollouts]
    return TrainBatch(rollouts, advantages=adv)


@pytest.mark.parametrize("policy,head", [("none", "chunked"), ("full", "full"), ("selective", "chunked"),
                                         ("mixed_2", "chunked")])
def test_checkpointing_and_the_chunked_head_leave_the_update_unchanged(policy, head):
    torch.manual_seed(0)
    base = build_llama(ModelSpec(num_layers=3, hidden_size=64, num_heads=2, intermediate_size=128),
                       build_char_tokenizer(), 64, 0, vocab_size=VOCAB)
    ref_model, model = copy.deepcopy(base).train(), copy.deepcopy(base).train()
    batch = _batch()
    ref = learn_step(StudentTrainer(ref_model, 1e-3), batch, ReverseKLIS(), 0, micro_batch=4)
    if policy != "none":
        apply_checkpointing(model, policy)
    got = learn_step(StudentTrainer(model, 1e-3), batch, ReverseKLIS(), 0, micro_batch=4, lm_head=head)
    for key in ("loss", "grad_norm", "student_entropy"):
        assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (key, got[key], ref[key])
    for (name, a), b in zip(ref_model.named_parameters(), model.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name


def test_memory_settings_are_config():
    cfg = load_config("configs/ci.yaml", ["training.gradient_checkpointing=mixed_4", "training.lm_head=chunked"])
    assert (cfg.training.gradient_checkpointing, cfg.training.lm_head) == ("mixed_4", "chunked")
    with pytest.raises(PermanentError, match="training.gradient_checkpointing"):
        load_config("configs/ci.yaml", ["training.gradient_checkpointing=sometimes"])
    with pytest.raises(PermanentError, match="training.lm_head=chunked computes only the sampled token's log-prob"):
        load_config("configs/ci.yaml", ["training.lm_head=chunked", "opd.loss=gkd_jsd"])


def test_length_buckets_cut_micro_batches_of_similar_length_on_balanced_ranks():
    from opd.batching import length_buckets, padded_tokens

    rng = random.Random(0)
    lengths = [256 + rng.randint(1, 2048) for _ in range(64)]  # a 256-token prompt, 1..2,048 completion tokens
    assert length_buckets(lengths, 1, 64) == list(range(64))  # one micro-batch: the order is kept
    order = length_buckets(lengths, 2, 8)
    assert sorted(order) == list(range(64))
    shards = [[lengths[i] for i in order[:32]], [lengths[i] for i in order[32:]]]
    assert all(s == sorted(s) for s in shards)
    assert abs(sum(shards[0]) - sum(shards[1])) < 0.05 * sum(lengths)  # each rank the same work
    saved = 1 - padded_tokens(lengths, order, 8) / padded_tokens(lengths, list(range(64)), 8)
    assert saved > 0.25, saved  # padding of a random micro-batch of 8 to its longest row, mostly gone


@pytest.mark.parametrize("micro_batch", [2, 4])
def test_length_sorted_micro_batches_leave_the_update_unchanged(micro_batch):
    """Rows reordered for the micro-batches keep their own advantages: the step equals the whole-batch one."""
    base = build_llama(ModelSpec(num_layers=2, hidden_size=64, num_heads=2, intermediate_size=128),
                       build_char_tokenizer(), 64, 0, vocab_size=VOCAB)
    whole_model, model = copy.deepcopy(base).train(), copy.deepcopy(base).train()
    batch = _batch(seed=3)
    whole = learn_step(StudentTrainer(whole_model, 1e-3), batch, ReverseKLIS(), 0, micro_batch=6)
    got = learn_step(StudentTrainer(model, 1e-3), batch, ReverseKLIS(), 0, micro_batch=micro_batch)
    for key in ("loss", "grad_norm", "student_entropy"):
        assert got[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), (key, got[key], whole[key])
    # AdamW's first step moves every weight by ~lr x sign(grad): summation-order noise in near-zero gradients
    # shows as ~3e-5 (the same without the reordering); a row paired with another row's advantages moves ~lr
    for (name, a), b in zip(whole_model.named_parameters(), model.parameters()):
        assert torch.allclose(a, b, atol=2e-4, rtol=0), name


_COPIES_PROBE = """
import hashlib, json, sys, torch
sys.path[:0] = [sys.argv[2], sys.argv[3]]
from accelerate.utils import AutocastKwargs
from opd.config import ModelSpec, ReverseKLIS
from opd.learner import learn_step
from opd.memory import apply_checkpointing, cpu_peak_bytes
from opd.models import build_char_tokenizer, build_llama
from opd.trainer import StudentTrainer
from test_update_memory import VOCAB, _batch

torch.set_num_threads(1)
torch.manual_seed(0)
model = build_llama(ModelSpec(num_layers=6, hidden_size=256, num_heads=4, intermediate_size=768),
                    build_char_tokenizer(), 96, 0, vocab_size=VOCAB).train()
copies = 2 * sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
apply_checkpointing(model, "full")
trainer = StudentTrainer(model, 1e-3, mixed_precision="bf16", device="cpu")
if sys.argv[1] == "cache":  # what torch.autocast does by default
    trainer.accelerator.autocast_handler = AutocastKwargs(cache_enabled=True)
batch = _batch()
step = lambda: learn_step(trainer, batch, ReverseKLIS(), 0, micro_batch=3)
step(), step()  # AdamW state and the allocator's first-step buffers exist before anything is measured
cpu_peak_bytes(step)
peak, metrics = cpu_peak_bytes(step)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
print(json.dumps({"peak": peak, "copies": copies, "grad_norm": metrics["grad_norm"], "weights": digest}))
"""


def test_bf16_update_keeps_no_weight_copies_past_the_forward():
    """autocast's cast cache would hold a bf16 copy of every weight until the forward ends (2 B/param;
    under FSDP the whole gathered model per rank). The trainer turns it off: under full checkpointing the
    steady-state peak drops by most of those bytes (a probe at hidden 512: 68.0 -> 37.6 MiB of 48 MiB of
    copies; without checkpointing backward needs the copies and nothing changes), and the step is the same
    to the bit. One process per setting: accelerate keeps one precision per process."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent

    def probe(mode):
        proc = subprocess.run([sys.executable, "-c", _COPIES_PROBE, mode, str(here.parent), str(here)],
                              capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                                                                                 "PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    cached, trainer = probe("cache"), probe("trainer")
    assert cached["peak"] - trainer["peak"] > 0.4 * cached["copies"], (cached, trainer)
    assert (trainer["grad_norm"], trainer["weights"]) == (cached["grad_norm"], cached["weights"])


def test_scoring_forward_keeps_no_kv_cache():
    """PackedBatch.logits (the hf scorer, the logit losses' teacher, the update) must not build a KV cache:
    released configs say use_cache=True, and a no-grad scoring forward would then hold every layer's K/V
    (here 8 layers x 2 x 8,008 tokens x 64 x 4 B = 33 MB) until it returns."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opd.batching import pack
    from opd.memory import cpu_peak_bytes

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                                         num_attention_heads=4, num_key_value_heads=4, head_dim=16)).eval()
    assert model.config.use_cache
    b = pack([[1, 2, 3]] * 8, [[5] * 1000] * 8, 0)
    kv = 8 * 2 * b.input_ids.numel() * 64 * 4
    keep = torch.arange(b.start, b.input_ids.shape[1] - 1)
    with torch.no_grad():
        b.logits(model)
        cached, _ = cpu_peak_bytes(lambda: model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                                 logits_to_keep=keep).logits)
        peak, logits = cpu_peak_bytes(lambda: b.logits(model))
    assert cached - peak > 0.9 * kv, (cached, peak, kv)
    assert logits.shape == (8, b.input_ids.shape[1] - 1 - b.start, 128)


def test_topk_scoring_holds_one_block_of_logits():
    """The hf teacher's top-k grade (reverse_kl_topk) runs the chunked head: the full-logits path's numbers
    while holding one block instead of the micro-batch's [rows, tokens, vocab] logits."""
    from opd.batching import pack
    from opd.logprobs import completion_topk
    from opd.memory import cpu_peak_bytes

    torch.manual_seed(0)
    model = build_llama(ModelSpec(num_layers=2, hidden_size=64, num_heads=2, intermediate_size=128),
                        build_char_tokenizer(), 640, 0, vocab_size=VOCAB).eval()
    rng = random.Random(2)
    prompts = [[1] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 40))] for _ in range(6)]
    comps = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (500, 0, 3, 580, 1, 250)]
    b = pack(prompts, comps, 0)
    model._opd_full_head = True  # the fallback: the full logits' top-k
    full_peak, (tok_f, ids_f, vals_f) = cpu_peak_bytes(lambda: completion_topk(model, b, 8))
    del model._opd_full_head
    chunked_peak, (tok, ids, vals) = cpu_peak_bytes(lambda: completion_topk(model, b, 8))
    m = b.loss_mask.bool()
    assert torch.equal(ids[m], ids_f[m])
    assert torch.allclose(vals[m], vals_f[m], atol=1e-5) and torch.allclose(tok[m], tok_f[m], atol=1e-5)
    logits_bytes = b.input_ids.shape[0] * (b.input_ids.shape[1] - 1 - b.start) * VOCAB * 4
    assert full_peak - chunked_peak > 0.5 * logits_bytes, (full_peak, chunked_peak, logits_bytes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scoring_runs_the_chunked_head_and_matches_the_full_logits(dtype):
    """score_completions (the hf scorer, evaluation's reverse KL) gives the full-logits log-probs, empty
    completions included, while holding one block of logits instead of the micro-batch's [rows, tokens,
    vocab]; a model whose forward rewrites the head's output falls back to the full logits."""
    from opd.batching import completion_values, pack
    from opd.logprobs import score_completions, token_logprobs
    from opd.memory import cpu_peak_bytes

    torch.manual_seed(0)
    model = build_llama(ModelSpec(num_layers=2, hidden_size=64, num_heads=2, intermediate_size=128),
                        build_char_tokenizer(), 640, 0, vocab_size=VOCAB).to(dtype).eval()
    rng = random.Random(1)
    prompts = [[1] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 40))] for _ in range(6)]
    comps = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (500, 0, 3, 580, 1, 250)]
    with torch.no_grad():
        b = pack(prompts, comps, 0)
        full = completion_values(token_logprobs(model, b), b)
        full_peak, _ = cpu_peak_bytes(lambda: token_logprobs(model, b))
    got = score_completions(model, prompts, comps, 0, micro_batch=6)
    chunked_peak, _ = cpu_peak_bytes(lambda: score_completions(model, prompts, comps, 0, micro_batch=6))
    assert [len(x) for x in got] == [len(c) for c in comps]
    tol = 1e-5 if dtype == torch.float32 else 0.07  # bf16: one rounding of a logit (|logit| < 8: 2^-5)
    for g, f in zip(got, full):
        assert torch.allclose(torch.tensor(g), torch.tensor(f), atol=tol, rtol=0), max(abs(a - c) for a, c in zip(g, f))
    logits_bytes = b.input_ids.shape[0] * (b.input_ids.shape[1] - 1 - b.start) * VOCAB * dtype.itemsize
    assert full_peak - chunked_peak > 0.5 * logits_bytes, (full_peak, chunked_peak, logits_bytes)

    class Rescaled(torch.nn.Module):  # a wrapper whose forward rewrites its head's output (as soft-capping does)
        def __init__(self, module):
            super().__init__()
            self.module, self.config = module, module.config

        def forward(self, **kw):
            out = self.module(**kw)
            out.logits = out.logits * 0.5
            return out

    wrapped = Rescaled(model)
    halved = score_completions(wrapped, prompts, comps, 0, micro_batch=3)
    assert wrapped._opd_full_head
    with torch.no_grad():
        ref = completion_values(torch.log_softmax(b.logits(model).float() * 0.5, -1).gather(
            -1, b.targets.unsqueeze(-1)).squeeze(-1), b)
    for g, f in zip(halved, ref):
        assert torch.allclose(torch.tensor(g), torch.tensor(f), atol=tol, rtol=0)
