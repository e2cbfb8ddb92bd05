"""The chunked LM-head log-prob (opd.lm_head) against the full-logits path, in float64 and bf16, on real
transformers models (Llama, Qwen3 tied and untied, peft LoRA), and the memory it is for."""
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from opd.batching import pack
from opd.errors import PermanentError
from opd.lm_head import UnsupportedHead, chunked_sampled_logprobs, rows_per_block, window_logprobs, window_topk
from opd.losses import sampled_logprobs
from opd.memory import cpu_peak_bytes

N, H, V = 11, 6, 13


def _inputs(dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    weights = torch.randn(N, generator=g, dtype=torch.float64)  # a loss that weighs every row differently
    return h, w, b, t, weights


def _grads(logp, weights, params):
    return torch.autograd.grad((logp.double() * weights).sum(), [p for p in params if p is not None])


@pytest.mark.parametrize("block_rows", [1, 3, 4, N, 64])  # 3 and 4 leave a ragged last block of 11 rows
def test_float64_equals_exact_log_softmax(block_rows):
    h, w, b, t, weights = _inputs()
    logp, ent = chunked_sampled_logprobs(h, w, t, b, block_rows=block_rows)
    got = _grads(logp, weights, (h, w, b))
    lq = torch.log_softmax(F.linear(h, w, b), -1)
    ref = lq.gather(-1, t[:, None])[:, 0]
    want = _grads(ref, weights, (h, w, b))
    assert logp.dtype == torch.float64 and not ent.requires_grad
    assert torch.allclose(logp, ref, atol=1e-12, rtol=0)
    assert torch.allclose(ent, -(lq.exp() * lq).sum(-1), atol=1e-12, rtol=0)
    for a, c in zip(got, want):
        assert torch.allclose(a, c, atol=1e-12, rtol=0)


@pytest.mark.parametrize("block_rows", [2, 5])
def test_same_values_and_gradients_as_sampled_logprobs(block_rows):
    """The engine's path today: logits = F.linear(h, W, b), then opd.losses.sampled_logprobs (whose
    normaliser is fp32 even for fp64 logits, hence 1e-6)."""
    h, w, b, t, weights = _inputs()
    logp, ent = chunked_sampled_logprobs(h, w, t, b, block_rows=block_rows)
    got = _grads(logp, weights, (h, w, b))
    ref, ref_ent = sampled_logprobs(F.linear(h, w, b)[None], t[None])
    want = _grads(ref[0], weights, (h, w, b))
    assert torch.allclose(logp, ref[0].double(), atol=1e-6)
    assert torch.allclose(ent, ref_ent[0].double(), atol=1e-6)
    for a, c in zip(got, want):
        assert torch.allclose(a, c, atol=1e-6)


def test_scale_and_softcap_match_the_models_formula_and_gradcheck():
    """Cohere/Granite scale the logits, Gemma caps them (cap * tanh(z / cap)): values as the model
    computes them, gradients checked numerically."""
    h, w, b, t, _ = _inputs(seed=1)
    scale, cap = 0.7, 2.0
    logp, _ = chunked_sampled_logprobs(h, w, t, b, block_rows=4, scale=scale, softcap=cap)
    z = cap * torch.tanh(F.linear(h, w, b) * scale / cap)
    assert torch.allclose(logp, torch.log_softmax(z, -1).gather(-1, t[:, None])[:, 0], atol=1e-12)
    fn = lambda h, w, b: chunked_sampled_logprobs(h, w, t, b, block_rows=4, scale=scale, softcap=cap)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_bf16_autocast_matches_the_autocast_full_logits_path():
    """Under bf16 autocast (fp32 master weights), as the trainer runs: the head's matmuls in bf16, the
    softmax in fp32; close to the full-logits path under the same autocast, gradients in fp32."""
    torch.manual_seed(0)
    h = torch.randn(40, 32, requires_grad=True)
    w = (torch.randn(300, 32) / 4).requires_grad_()
    t = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = chunked_sampled_logprobs(h, w, t, block_rows=7)
        ref, ref_ent = sampled_logprobs(F.linear(h, w)[None], t[None])
    assert logp.dtype == torch.float32
    gh, gw = torch.autograd.grad(logp.sum(), (h, w))
    rh, rw = torch.autograd.grad(ref.sum(), (h, w))
    assert gh.dtype == gw.dtype == torch.float32
    assert torch.allclose(logp, ref[0], atol=1e-4) and torch.allclose(ent, ref_ent[0], atol=1e-3)
    for a, c in ((gh, rh), (gw, rw)):
        assert (a - c).norm() / c.norm() < 1e-2
    with torch.no_grad():  # and both are bf16 approximations of the exact value, not something else
        exact = torch.log_softmax(h.double() @ w.double().T, -1).gather(-1, t[:, None])[:, 0]
    assert (logp.double() - exact).abs().max() < 0.1


def test_bf16_tensors_give_bf16_gradients_near_float64():
    h, w, b, t, weights = _inputs(seed=2)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    logp, _ = chunked_sampled_logprobs(hb, wb, t, block_rows=3)
    gh, gw = _grads(logp, weights, (hb, wb))
    ref = torch.log_softmax(F.linear(h, w), -1).gather(-1, t[:, None])[:, 0]
    rh, rw = _grads(ref, weights, (h, w))
    assert logp.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    assert (logp.double() - ref).abs().max() < 0.1
    for a, c in ((gh, rh), (gw, rw)):
        assert (a.double() - c).norm() / c.norm() < 3e-2


def test_the_logits_never_exist_at_once():
    """Peak CPU memory of forward + backward over 4,096 rows x 2,000 vocab: the chunked head stays far
    below one fp32 [N, V] logits tensor (32 MB); the full-logits path needs several."""
    torch.manual_seed(0)
    n, v, d = 4096, 2000, 16
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    t = torch.randint(0, v, (n,))
    logits_bytes = n * v * 4

    def chunked():
        chunked_sampled_logprobs(h, w, t, block_rows=256)[0].sum().backward()

    def full():
        sampled_logprobs(F.linear(h, w)[None], t[None])[0].sum().backward()

    peak_chunked, _ = cpu_peak_bytes(chunked)
    peak_full, _ = cpu_peak_bytes(full)
    print(f"peak: chunked {peak_chunked / 2**20:.1f} MiB, full logits {peak_full / 2**20:.1f} MiB")
    assert peak_full > 2 * logits_bytes
    assert peak_chunked < logits_bytes / 4


def test_argument_errors():
    h, w, b, t, _ = _inputs()
    with pytest.raises(ValueError, match="one target per row"):
        chunked_sampled_logprobs(h, w, t[:-1])
    with pytest.raises(ValueError, match="block_rows=0"):
        chunked_sampled_logprobs(h, w, t, block_rows=0)
    assert rows_per_block(151936) == 883  # 512 MiB of fp32 logits at Qwen3's vocabulary


# ------------------------------------------------------------------------------- transformers models

def _llama(tied: bool):
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


def _qwen3(tied: bool):
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        tie_word_embeddings=tied))


MODELS = {"llama": _llama, "qwen3": _qwen3}


def _batch():
    """Prompts of different lengths (the window starts inside the longer prompts) and padding."""
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    completions = [[11, 12, 13], [14, 15, 16, 17, 18, 19], [20]]
    return pack(prompts, completions, pad_id=0)


def _reference(model, b):
    return sampled_logprobs(b.logits(model), b.targets)


def _param_grads(model, logp, mask):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad((logp.double() * mask).sum(), params)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("tied", [True, False])
def test_window_logprobs_equal_the_full_logits_path(arch, tied):
    torch.manual_seed(0)
    model = MODELS[arch](tied).double()
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    b = _batch()
    mask = b.loss_mask.double()
    logp, ent = window_logprobs(model, b, block_rows=4)
    got = _param_grads(model, logp, mask)
    ref, ref_ent = _reference(model, b)
    want = _param_grads(model, ref, mask)
    m = b.loss_mask.bool()
    assert logp.shape == ref.shape == b.targets.shape
    assert torch.allclose(logp[m], ref[m].double(), atol=1e-6) and torch.allclose(ent[m], ref_ent[m].double(),
                                                                                    atol=1e-6)
    assert (logp[~m] == 0).all()  # only completion rows go through the head
    for (name, _), a, c in zip(model.named_parameters(), got, want):
        assert torch.allclose(a, c, atol=1e-6), name
    emb = dict(zip([n for n, _ in model.named_parameters()], got))["model.embed_tokens.weight"]
    head_rows = torch.unique(b.targets[m])  # with a tied head, the LM head's gradient reaches the embedding
    if tied:
        assert emb[head_rows].abs().sum() > 0 and emb[torch.tensor([50, 60])].abs().sum() > 0


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("tied", [True, False])
def test_window_topk_equals_the_full_logits_topk(arch, tied):
    """The teacher's top-k grade (reverse_kl_topk's input) by row blocks: the full logits' top-k ids in
    order, their log-probs and the sampled token's, at completion positions only."""
    torch.manual_seed(0)
    model = MODELS[arch](tied).double()
    b, k = _batch(), 5
    tok, ids, vals = window_topk(model, b, k, block_rows=4)
    with torch.no_grad():
        logits = b.logits(model)
    lse = torch.logsumexp(logits, -1, keepdim=True)
    ref_vals, ref_ids = logits.topk(k, dim=-1)
    m = b.loss_mask.bool()
    assert ids.shape == vals.shape == (*b.targets.shape, k) and tok.shape == b.targets.shape
    assert torch.equal(ids[m], ref_ids[m])
    assert torch.allclose(vals[m], (ref_vals - lse)[m], atol=1e-9)
    assert torch.allclose(tok[m], (logits.gather(-1, b.targets[..., None]) - lse)[..., 0][m], atol=1e-9)
    assert (ids[~m] == 0).all() and (vals[~m] == 0).all() and (tok[~m] == 0).all()
    with pytest.raises(ValueError, match="k=0"):
        window_topk(model, b, 0)


def test_every_window_position_when_asked():
    torch.manual_seed(0)
    model = _qwen3(True).double()
    b = _batch()
    logp, ent = window_logprobs(model, b, only_completion=False, block_rows=5)
    ref, ref_ent = _reference(model, b)
    assert torch.allclose(logp, ref.double(), atol=1e-6) and torch.allclose(ent, ref_ent.double(), atol=1e-6)


def test_window_logprobs_under_bf16_autocast():
    torch.manual_seed(0)
    model = _qwen3(True)
    b = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _ = window_logprobs(model, b)
        ref, _ = _reference(model, b)
    m = b.loss_mask.bool()
    assert logp.dtype == torch.float32
    assert (logp[m] - ref[m]).abs().max() < 1e-3
    g = torch.autograd.grad((logp * b.loss_mask).sum(), model.lm_head.weight)[0]
    r = torch.autograd.grad((ref * b.loss_mask).sum(), model.lm_head.weight)[0]
    assert (g - r).norm() / r.norm() < 1e-2


def test_peft_lora_student():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_qwen3(True).double(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                                "down_proj"]))
    for n, p in model.named_parameters():  # B = 0 at init would make every LoRA-A gradient zero
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    b = _batch()
    logp, _ = window_logprobs(model, b, block_rows=3)
    got = _param_grads(model, logp, b.loss_mask.double())
    want = _param_grads(model, _reference(model, b)[0], b.loss_mask.double())
    assert len(got) == 12 and all(g.abs().sum() > 0 for g in got)
    for a, c in zip(got, want):
        assert torch.allclose(a, c, atol=1e-6)


def test_models_whose_head_it_cannot_replace_are_refused():
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM

    b = _batch()
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    with pytest.raises(UnsupportedHead, match="final_logit_softcapping=30.0"):
        window_logprobs(gemma, b)
    lora_head = get_peft_model(_qwen3(False), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(UnsupportedHead, match="LoRA on lm_head"):
        window_logprobs(lora_head, b)

    class Doubling(Qwen3ForCausalLM):  # post-processing no config attribute announces
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    odd = Doubling(_qwen3(True).config)
    with pytest.raises(UnsupportedHead, match="changed the LM head's output"):
        window_logprobs(odd, b)
    assert issubclass(UnsupportedHead, PermanentError)
    assert type(odd.lm_head).forward is torch.nn.Linear.forward and "forward" not in vars(odd.lm_head)  # restored
