"""opd.reward: the task verifier's 0/1 reward with a group-mean baseline, beside (or instead of) the
reverse-KL advantage."""
from __future__ import annotations

import uuid

import pytest

from opd.config import ModelSpec, ReverseKLIS, load_config
from opd.errors import PermanentError
from opd.models import build_char_tokenizer, build_llama, save_model
from opd.objectives import score
from opd.rewards import group_baseline, verifier_rewards
from opd.rollouts import Rollout


def test_group_baseline_is_the_reward_minus_its_prompts_mean():
    assert group_baseline([1, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 2]) == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from opd.teachers import HFTeacher

    tok = build_char_tokenizer()
    path = save_model(build_llama(ModelSpec(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=64), tok,
                                  32, 0), tok, tmp_path_factory.mktemp("t"))
    return tok, HFTeacher(str(path), device="cpu", pad_id=tok.pad_token_id)


def _rollouts(tok, texts_by_prompt: list[list[str]]) -> list[Rollout]:
    out = []
    for i, texts in enumerate(texts_by_prompt):
        for t in texts:
            ids = tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
            out.append(Rollout(i, tok("4+5=").input_ids, ids, [-1.0] * len(ids), True))
    return out


def test_the_integer_verifier_rewards_give_the_expected_advantages(teacher):
    """Prompt 0 (answer 9): one right, one wrong; prompt 1 (answer 7): both right. With kl_coef 0 (plain RL)
    every token of a rollout carries weight x (reward - group mean); with the KL it is added on top."""
    from opd.data.verifiers import IntegerSpec, verifier

    tok, t = teacher
    rollouts = _rollouts(tok, [["4;9#9", "4;9#8"], ["3;7#7", "3;7#7"]])
    rewards = verifier_rewards(tok, verifier(IntegerSpec()).is_correct, ["9", "7"])(rollouts)
    assert rewards == [1.0, 0.0, 1.0, 1.0]
    rl, m = score(ReverseKLIS(kl_coef=0.0), t, rollouts, rewards=rewards, reward_weight=2.0)
    assert [set(a) for a in rl.advantages] == [{1.0}, {-1.0}, {0.0}, {0.0}] and m["reward_mean"] == 0.75
    kl, _ = score(ReverseKLIS(), t, rollouts)
    both, _ = score(ReverseKLIS(), t, rollouts, rewards=rewards, reward_weight=2.0)
    for a_both, a_kl, g in zip(both.advantages, kl.advantages, [1.0, -1.0, 0.0, 0.0]):
        assert a_both == pytest.approx([x + g for x in a_kl])


def test_reward_settings_are_checked_up_front():
    cfg = load_config("configs/ci.yaml", ["opd.reward={weight: 0.5}", "opd.loss.kl_coef=0"])
    assert cfg.opd.reward.weight == 0.5 and cfg.opd.loss.kl_coef == 0
    for bad, why in ((["opd.loss.kl_coef=0"], "leaves nothing to learn from without opd.reward"),
                     (["opd.reward={}", "opd.loss=gkd_jsd"], "opd.reward adds to reverse_kl_is's per-token"),
                     (["opd.reward={}", "task.verifier=none", "eval.gates.min_accuracy=0"], "opd.reward needs a verifier")):
        with pytest.raises(PermanentError, match=why):
            load_config("configs/ci.yaml", bad)


@pytest.mark.slow  # ~40 s: a round of the flow's own code; the advantages themselves are tested above
def test_a_plain_rl_round_runs_and_reports_its_reward(opd_home, tmp_path):
    from opd.data.prepare import prepare_data, validate_data
    from opd.engines import Engines
    from opd.records import RunLayout
    from opd.rounds import opd_round
    from opd.warmup import bootstrap_teacher, sft_warmup

    base = load_config("configs/ci.yaml", [f"home={opd_home}"])
    student = save_model(build_llama(base.student.model, build_char_tokenizer(), 64, seed=3), build_char_tokenizer(),
                         tmp_path / "student")
    cfg = load_config("configs/ci.yaml", [f"home={opd_home}", "sft=null", f"student.path={student}",
                                          "student.model=null", "opd.sampler=hf", "opd.steps_per_round=2",
                                          "opd.reward={weight: 1.0}", "opd.loss.kl_coef=0"])
    layout = RunLayout.of(cfg.home, f"rl-{uuid.uuid4().hex[:6]}")
    _, data = validate_data(cfg, prepare_data(cfg, layout.data))
    teacher = bootstrap_teacher(cfg, data, log=lambda *_: None)
    start = sft_warmup(cfg, data, teacher, layout.sft, log=lambda *_: None)
    with Engines(cfg) as engines:
        r = opd_round(cfg, 1, data, teacher, start, layout, engines, log=lambda *_: None)
    assert r.metrics["reward_mean"] is not None and 0.0 <= r.metrics["reward_mean"] <= 1.0, r.metrics
    assert r.metrics["reverse_kl"] > 0  # still measured against the teacher, only not trained on
