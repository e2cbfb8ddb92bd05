import pytest

from opd.config import ConfigError, load_config


def test_shipped_configs_load():
    from pathlib import Path

    names = sorted(p.stem for p in Path("configs").glob("*.yaml"))
    assert {"demo", "ci", "qwen3-8b-from-32b"} <= set(names)
    for name in names:
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.opd.rounds >= 1 and cfg.name == name


def test_override_sets_nested_value():
    cfg = load_config("configs/ci.yaml", ["opd.rounds=3", "opd.lr=1e-4"])
    assert cfg.opd.rounds == 3 and cfg.opd.lr == 1e-4


@pytest.mark.parametrize("override, needle", [
    ("opd.roundz=3", "opd.roundz: unknown key"),
    ("opd.rounds=0", "opd.rounds: Input should be greater than or equal to 1"),
    ("opd.lr=-1", "opd.lr: Input should be greater than 0"),
    ("opd.temperature=0.7", "opd: Value error, importance ratios need samples"),
    ("student.model.num_heads=8", "head_dim = hidden_size/num_heads = 8"),
    ("registry.model_name=../etc", "registry.model_name: Value error, model name '../etc' is invalid"),
    ("training.num_processes=3", "256 rollouts per step cannot be split evenly over training.num_processes=3"),
    ("training.devices=[0, 1]", "training.devices lists 2 GPUs for training.num_processes=1"),
    ("training.strategy=zero3", "training.strategy: Input should be 'ddp' or 'fsdp'"),
    ("training.mixed_precision=fp8", "training.mixed_precision: Input should be 'no', 'bf16' or 'fp16'"),
    ("sft.train.micro_batch=0", "sft.train.micro_batch: Input should be greater than or equal to 1"),
    ("opd.discount=1.5", "opd.discount: Input should be less than or equal to 1"),
    ("opd.tensor_parallel_size=0", "opd.tensor_parallel_size: Input should be greater than or equal to 1"),
    ("teacher.tensor_parallel_size=2", "teacher.tensor_parallel_size applies to teacher.scorer=vllm: set"),
])
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/ci.yaml", [override])
    assert needle in str(e.value)


def test_discount_is_for_the_sampled_token_loss():
    with pytest.raises(ConfigError, match="opd.discount applies to opd.loss=reverse_kl_is"):
        load_config("configs/ci.yaml", ["opd.discount=0.9", "opd.loss=reverse_kl_full"])
    assert load_config("configs/ci.yaml", ["opd.discount=0.9"]).opd.discount == 0.9


def test_parallelism_settings():
    cfg = load_config("configs/qwen3-8b-from-32b.yaml")
    assert cfg.training.num_processes == 4 and cfg.training.strategy == "fsdp"
    assert cfg.training.mixed_precision == "bf16"
    assert cfg.opd.tensor_parallel_size == 2 and set(cfg.training.devices).isdisjoint(range(2))
    with pytest.raises(ConfigError, match="opd.tensor_parallel_size > 1 needs opd.sampler=vllm"):
        load_config("configs/ci.yaml", ["opd.tensor_parallel_size=2", "opd.sampler=hf"])
    with pytest.raises(ConfigError, match="repeats a GPU"):
        load_config("configs/ci.yaml", ["training.num_processes=2", "training.devices=[1, 1]"])


def test_override_needs_key_value():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config("configs/ci.yaml", ["opd.rounds"])


def test_cli_runs_as_a_module():
    """`python -m opd.cli` (spawn-safe entry without the console script) sees every command."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "opd.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "registry" in out.stdout and "run" in out.stdout
