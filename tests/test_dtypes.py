"""dtype per model, engine settings from config, and a teacher counted without being loaded."""
from __future__ import annotations

import json

import pytest
import torch

from opd.config import ModelSpec, load_config
from opd.errors import PermanentError
from opd.models import (build_char_tokenizer, build_llama, count_params, load_model, num_params, resolve_dtype,
                        save_model)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_char_tokenizer()
    model = build_llama(ModelSpec(num_layers=2, hidden_size=64, num_heads=2, intermediate_size=128), tok, 48, 0)
    return save_model(model, tok, tmp_path_factory.mktemp("m")), num_params(model)


def test_parameters_are_counted_from_the_safetensors_headers_without_loading(model_dir, tmp_path):
    path, n = model_dir
    assert count_params(path) == n
    # a checkpoint transformers cannot even build is still counted: nothing is instantiated
    alien = tmp_path / "alien"
    alien.mkdir()
    for f in path.iterdir():
        (alien / f.name).write_bytes(f.read_bytes())
    conf = json.loads((alien / "config.json").read_text())
    conf.update(model_type="no-such-architecture", architectures=["NoSuchForCausalLM"])
    (alien / "config.json").write_text(json.dumps(conf))
    with pytest.raises(Exception):
        load_model(alien)
    assert count_params(alien) == n


def test_auto_dtype_is_the_checkpoints_on_gpu_and_float32_on_cpu(model_dir, tmp_path):
    path, _ = model_dir
    conf = json.loads((path / "config.json").read_text())
    for key, value in (("torch_dtype", "bfloat16"), ("dtype", "float16"), ("torch_dtype", "torch.bfloat16")):
        d = tmp_path / f"{key}-{value}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**{k: v for k, v in conf.items() if "dtype" not in k}, key: value}))
        assert resolve_dtype("auto", d, torch.device("cuda")) == value.removeprefix("torch.")
        assert resolve_dtype("auto", d, torch.device("cpu")) == "float32"
    assert resolve_dtype("bfloat16", path, torch.device("cpu")) == "bfloat16"  # asked for: as asked


def test_a_model_loads_in_the_dtype_asked_for(model_dir):
    path, _ = model_dir
    assert next(load_model(path, dtype="bfloat16").parameters()).dtype == torch.bfloat16
    assert next(load_model(path).parameters()).dtype == torch.float32


def test_engine_settings_and_dtypes_are_config(tmp_path):
    cfg = load_config("configs/ci.yaml", [f"home={tmp_path}"])
    assert (cfg.student.dtype, cfg.teacher.dtype) == ("auto", "auto")
    assert (cfg.opd.gpu_memory_utilization, cfg.teacher.gpu_memory_utilization) == (0.5, 0.3)
    cfg = load_config("configs/ci.yaml", ["teacher.dtype=bfloat16", "opd.enforce_eager=false",
                                          "teacher.gpu_memory_utilization=0.2"])
    assert cfg.teacher.dtype == "bfloat16" and cfg.opd.enforce_eager is False
    with pytest.raises(PermanentError, match="teacher.dtype"):
        load_config("configs/ci.yaml", ["teacher.dtype=fp8"])
    with pytest.raises(PermanentError, match=r"= 1.10 of one GPU.*teacher.scorer=remote"):
        load_config("configs/ci.yaml", ["teacher.scorer=vllm", "device=cuda", "opd.gpu_memory_utilization=0.8"])


def test_evaluation_has_its_own_completion_budget():
    from opd.evaluation import eval_max_tokens

    assert eval_max_tokens(load_config("configs/ci.yaml")) == load_config("configs/ci.yaml").opd.max_tokens
    assert eval_max_tokens(load_config("configs/ci.yaml", ["eval.max_tokens=512"])) == 512


def test_a_trained_copy_keeps_the_dtype_its_checkpoint_declares(tmp_path):
    """The trainer loads a bf16 student as float32 master weights; its round checkpoint keeps those float32
    weights (an update bf16 cannot hold survives into the next round) but declares the bf16 the student is
    served in, so ``dtype: auto`` (a restarted sampler, the evaluation copies, the registry's consumers) does not
    double its memory after the first round."""
    from safetensors import safe_open

    from opd.models import checkpoint_dtype

    tok = build_char_tokenizer()
    model = build_llama(ModelSpec(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=128), tok, 48, 0)
    src = save_model(model.to(torch.bfloat16), tok, tmp_path / "bf16")
    assert checkpoint_dtype(src) == "bfloat16"

    trained = load_model(src)  # float32 master weights, as the trainer holds them
    with torch.no_grad():
        trained.model.norm.weight.add_(1e-4)  # 1.0001: under bf16's resolution at 1.0
    out = save_model(trained, tok, tmp_path / "round-1")
    assert checkpoint_dtype(out) == "bfloat16"
    assert resolve_dtype("auto", out, torch.device("cuda")) == "bfloat16"
    assert resolve_dtype("auto", out, torch.device("cpu")) == "float32"
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.float32
    assert torch.equal(load_model(out).model.norm.weight, trained.model.norm.weight)  # nothing rounded
    assert next(load_model(out, dtype=resolve_dtype("auto", out, torch.device("cuda"))).parameters()).dtype == \
        torch.bfloat16
    # a model built here (no checkpoint behind it) declares what it holds, as before
    assert checkpoint_dtype(save_model(build_llama(ModelSpec(num_layers=1, hidden_size=64, num_heads=2,
                                                             intermediate_size=128), tok, 48, 0), tok,
                                       tmp_path / "built")) == "float32"


def test_a_trained_copy_keeps_its_checkpoints_generation_config(model_dir, tmp_path):
    """A user's generation_config.json (Qwen3 chat: EOS ids <|im_end|> and <|endoftext|>, sampling defaults that
    `vllm serve` applies) survives every round's save and the registry: it is written as it was read, even one
    transformers' strict save-time check would refuse (a temperature beside do_sample false). A model we built
    gets the tokenizer's special tokens, as before; the model in memory keeps its own config through a save."""
    path, _ = model_dir
    user = tmp_path / "user"
    user.mkdir()
    for f in path.iterdir():
        (user / f.name).write_bytes(f.read_bytes())
    shipped = json.dumps({"eos_token_id": [2, 7], "pad_token_id": 0, "temperature": 0.6, "top_p": 0.95,
                          "do_sample": False, "transformers_version": "4.51.0"}, indent=1) + "\n"
    (user / "generation_config.json").write_text(shipped)
    model = load_model(user)
    assert model.generation_config.eos_token_id == [2, 7]
    first = save_model(model, build_char_tokenizer(), tmp_path / "round-1")
    assert (first / "generation_config.json").read_text() == shipped
    assert model.generation_config.eos_token_id == [2, 7]  # not swapped for the tokenizer's by the save
    again = save_model(load_model(first), build_char_tokenizer(), tmp_path / "round-2")
    assert (again / "generation_config.json").read_text() == shipped
    built = json.loads((path / "generation_config.json").read_text())
    tok = build_char_tokenizer()
    assert (built["eos_token_id"], built.get("pad_token_id")) == (tok.eos_token_id, tok.pad_token_id)
