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
