"""teacher.scorer=vllm (or remote): the driver never instantiates the teacher. Its SFT completions, its
accuracy and the students' reverse KL all come from the teacher's engine; only the demo bootstrap,
which trains the teacher here, ever holds its weights in this process."""
from __future__ import annotations

import uuid

import transformers

from opd.config import load_config


def test_the_driver_never_loads_a_served_teacher(opd_home, monkeypatch):
    from opd.data.prepare import prepare_data, validate_data
    from opd.engines import Engines
    from opd.evaluation import evaluate_models
    from opd.records import RunLayout, read_done
    from opd.warmup import bootstrap_teacher, sft_warmup

    cfg = load_config("configs/ci.yaml", [f"home={opd_home}", "teacher.scorer=vllm", "sft.num_prompts=256",
                                          "sft.train.steps=20", "eval.max_examples=64"])
    layout = RunLayout.of(cfg.home, f"served-{uuid.uuid4().hex[:6]}")
    _, data = validate_data(cfg, prepare_data(cfg, layout.data))
    teacher = bootstrap_teacher(cfg, data, log=lambda *_: None)  # trained here (demo bootstrap), cached
    boot_acc = read_done(teacher.path)["accuracy"]

    loaded: list[str] = []  # every transformers model this process instantiates from here on
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        loaded.append(str(path))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    sft = sft_warmup(cfg, data, teacher, layout.sft, log=lambda *_: None)
    with Engines(cfg) as engines:
        results = evaluate_models(cfg, data, teacher, {"sft_student": sft.path}, engines)
    assert loaded and str(teacher.path) not in loaded, loaded  # students were loaded; the teacher never
    assert results["teacher"]["params"] == teacher.params
    assert abs(results["teacher"]["accuracy"] - boot_acc) <= 0.1, (results["teacher"], boot_acc)
    assert results["sft_student"]["reverse_kl"] > 0 and sft.data_cost["teacher_tokens"] > 0
