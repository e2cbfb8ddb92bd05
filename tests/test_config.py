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
])
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/ci.yaml", [override])
    assert needle in str(e.value)


def test_override_needs_key_value():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config("configs/ci.yaml", ["opd.rounds"])
