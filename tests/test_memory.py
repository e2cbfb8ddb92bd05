"""Activation checkpointing policies (opd.memory): the gradients of every policy equal the gradients without
checkpointing (float64; tiny Llama and Qwen3, peft LoRA, two-process FSDP2), the activations held for
backward and the peak memory drop, and ``selective`` recomputes no matmul while ``full`` does.

Run as a script under torchrun (``_fsdp_worker``), this file is also the FSDP2 rank program."""
import collections
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # as a torchrun script
    sys.path.insert(0, str(ROOT))

from opd.batching import pack  # noqa: E402
from opd.lm_head import window_logprobs  # noqa: E402
from opd.losses import sampled_logprobs  # noqa: E402
from opd.memory import (Checkpointing, UnsupportedCheckpointing, apply_checkpointing, cpu_peak_bytes,  # noqa: E402
                        decoder_layers, parse_policy)

POLICIES = ["none", "full", "selective", "every_2", "mixed_2"]


def _llama(layers=3, width=32):
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2))


def _qwen3(layers=3, width=32, tied=True):
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=97, hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=width // 4, tie_word_embeddings=tied))


MODELS = {"llama": _llama, "qwen3": _qwen3}


PROMPTS = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11, 12, 13, 14]]
COMPLETIONS = [[21, 22, 23], [24, 25, 26, 27, 28, 29], [30], [31, 32]]  # 7 and 5 tokens on the two FSDP ranks


def _batch():
    return pack(PROMPTS, COMPLETIONS, pad_id=0)


def _loss(model, b, head="full"):
    logp = (window_logprobs(model, b) if head == "chunked" else sampled_logprobs(b.logits(model), b.targets))[0]
    return (logp.double() * b.loss_mask).sum() / b.loss_mask.sum()


def _grads(model, b, head="full") -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    _loss(model, b, head).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _fresh(make, seed=0):
    torch.manual_seed(seed)
    return make().double().train()


# ----------------------------------------------------------------------------------- policy parsing

def test_policy_names_and_plans():
    assert parse_policy("full") == Checkpointing("full") and str(parse_policy(" Every_3 ")) == "every_3"
    assert parse_policy("every_2").plan(5) == ["full", "none", "full", "none", "full"]
    assert parse_policy("mixed_3").plan(6) == ["full", "full", "selective"] * 2
    assert parse_policy("mixed_1").plan(2) == ["selective"] * 2 and parse_policy("every_1").plan(2) == ["full"] * 2
    for bad in ("sometimes", "every_0", "every", "mixed_x", "full_2"):
        with pytest.raises(UnsupportedCheckpointing, match="choose one of none, full, selective, every_<k>, mixed_<k>"):
            parse_policy(bad)


def test_only_transformers_decoder_models():
    with pytest.raises(UnsupportedCheckpointing, match="has no transformers GradientCheckpointingLayer"):
        apply_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)), "full")


# ----------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_policy_gives_the_uncheckpointed_gradients(arch):
    b = _batch()
    ref = {head: _grads(_fresh(MODELS[arch]), b, head) for head in ("full", "chunked")}
    for policy in POLICIES:
        model = _fresh(MODELS[arch])
        names = list(model.state_dict())
        plan = apply_checkpointing(model, policy)
        assert plan == parse_policy(policy).plan(3)
        assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [m != "none" for m in plan]
        assert list(model.state_dict()) == names  # flags, not wrappers: parameter names unchanged
        for head in ("full", "chunked"):
            got = _grads(model, b, head)
            for n, g in ref[head].items():
                assert torch.allclose(got[n], g, atol=1e-10, rtol=1e-8), (policy, head, n)


def test_policy_can_be_changed_back():
    model = _fresh(_qwen3)
    apply_checkpointing(model, "full")
    apply_checkpointing(model, "none")
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))


def test_peft_lora_student_under_every_policy():
    from peft import LoraConfig, get_peft_model

    def lora():
        model = get_peft_model(_qwen3(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj",
                                                                                        "down_proj"]))
        for n, p in model.named_parameters():  # B = 0 at init would make every LoRA-A gradient zero
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        return model

    b = _batch()
    ref = {head: _grads(_fresh(lora), b, head) for head in ("full", "chunked")}
    assert len(ref["full"]) == 24 and all(g.abs().sum() > 0 for g in ref["full"].values())
    for policy in POLICIES:
        model = _fresh(lora)
        apply_checkpointing(model, policy)
        for head in ("full", "chunked"):
            got = _grads(model, b, head)
            for n, g in ref[head].items():
                assert torch.allclose(got[n], g, atol=1e-10, rtol=1e-8), (policy, head, n)


# ----------------------------------------------------------------------------------- memory and recompute

class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _measure(policy: str, autocast: bool):
    """(bytes held for backward after the forward, peak bytes over forward + backward, matmuls in backward)."""
    torch.manual_seed(0)
    model = _qwen3(layers=4, width=64).train()
    apply_checkpointing(model, policy)
    ids = torch.randint(1, 97, (4, 128))

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits.sum()

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = forward()
    held = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")  # net bytes
    counter = _CountOps()
    with counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    peak, _ = cpu_peak_bytes(lambda: forward().backward())
    return held, peak, counter.counts["mm"] + counter.counts["addmm"]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_checkpointing_cuts_held_and_peak_memory(autocast):
    m = {p: _measure(p, autocast) for p in ("none", "selective", "mixed_2", "every_2", "full")}
    for p, (held, peak, mms) in m.items():
        print(f"{p:>10}: held after forward {held / 2**20:6.2f} MiB, peak {peak / 2**20:6.2f} MiB, "
              f"backward matmuls {mms}")
    held = {p: v[0] for p, v in m.items()}
    peak = {p: v[1] for p, v in m.items()}
    mms = {p: v[2] for p, v in m.items()}
    assert held["full"] < held["mixed_2"] < held["selective"] < held["none"]
    assert held["every_2"] < held["none"] and held["selective"] < 0.6 * held["none"]
    assert held["full"] < 0.2 * held["none"]
    assert peak["full"] < peak["none"] and peak["selective"] < peak["none"] and peak["mixed_2"] < peak["none"]
    # recompute cost: selective re-runs no matmul (only the elementwise ops between them); full re-runs the layers
    assert mms["selective"] == mms["none"] < mms["mixed_2"] < mms["full"]
    assert mms["every_2"] < mms["full"]


# ----------------------------------------------------------------------------------- FSDP2, two processes

# (policy, head, wrapping): checkpointing set before or after FSDP2 sharding, or under DDP
FSDP_CONFIGS = [(p, h, "before") for p in ("none", "full", "selective", "mixed_2") for h in ("full", "chunked")] + [
    ("selective", "chunked", "after"), ("full", "full", "after"), ("selective", "chunked", "ddp"),
    ("none", "chunked", "ddp")]


def _fsdp_worker(out: str) -> None:
    """One rank: for each (policy, head, wrapping) build the same tiny Qwen3 (tied head), checkpoint it before
    or after FSDP2 ``fully_shard`` per layer + root (or wrap it in DDP), train this rank's 2 of the 4 rows with
    the trainer's weighting (token share of the global batch x world size) and write the full gradients (rank 0)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    b = _batch()
    total = float(b.loss_mask.sum())
    lo, hi = 2 * rank, 2 * rank + 2
    shard = pack(PROMPTS[lo:hi], COMPLETIONS[lo:hi], pad_id=0)
    results = {}
    for policy, head, order in FSDP_CONFIGS:
        model = _fresh(_qwen3)
        if order != "after":
            apply_checkpointing(model, policy)
        if order == "ddp":
            model = DistributedDataParallel(model)
        else:
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        if order == "after":
            apply_checkpointing(model, policy)
        logp = (window_logprobs(model, shard) if head == "chunked"
                else sampled_logprobs(shard.logits(model), shard.targets))[0]
        ((logp.double() * shard.loss_mask).sum() / total * world).backward()
        grads = {n.removeprefix("module."): getattr(p.grad, "full_tensor", lambda g=p.grad: g)().tolist()
                 for n, p in model.named_parameters()}
        if rank == 0:
            results[f"{policy}/{head}/{order}"] = grads
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_and_ddp_two_processes_every_policy_and_head(tmp_path):
    out = tmp_path / "grads.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(Path(__file__)), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    got = json.loads(out.read_text())
    assert sorted(got) == sorted(f"{p}/{h}/{o}" for p, h, o in FSDP_CONFIGS)
    ref = {head: _grads(_fresh(_qwen3), _batch(), head) for head in ("full", "chunked")}
    for key, grads in got.items():
        head = key.split("/")[1]
        assert sorted(grads) == sorted(ref[head]), key
        for n, g in ref[head].items():
            assert torch.allclose(torch.tensor(grads[n], dtype=torch.float64), g, atol=1e-10, rtol=1e-8), (key, n)


if __name__ == "__main__":
    _fsdp_worker(sys.argv[1])
