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
    ("opd.temperature=0.7", "opd: importance ratios need samples"),
    ("student.model.num_heads=8", "head_dim = hidden_size/num_heads = 8"),
    ("registry.model_name=../etc", "registry.model_name: model name '../etc' is invalid"),
    ("training.num_processes=3", "256 rollouts per step cannot be split evenly over training.num_processes=3"),
    ("training.devices=[0, 1]", "training.devices lists 2 GPUs for training.num_processes=1"),
    ("training.strategy=zero3", "training.strategy: Input should be 'ddp' or 'fsdp'"),
    ("training.mixed_precision=fp8", "training.mixed_precision: Input should be 'no', 'bf16' or 'fp16'"),
    ("sft.train.micro_batch=0", "sft.train.micro_batch: Input should be greater than or equal to 1"),
    ("opd.loss.discount=1.5", "opd.loss.discount: Input should be less than or equal to 1"),
    ("opd.discount=0.5", "opd.discount is now opd.loss.discount"),  # a key of the old flat loss settings
    ("opd.tensor_parallel_size=0", "opd.tensor_parallel_size: Input should be greater than or equal to 1"),
    ("teacher.tensor_parallel_size=2", "teacher.tensor_parallel_size applies to teacher.scorer=vllm: set"),
])
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/ci.yaml", [override])
    assert needle in str(e.value)


def test_discount_is_for_the_sampled_token_loss():
    with pytest.raises(ConfigError, match="opd.loss.discount: unknown key"):
        load_config("configs/ci.yaml", ["opd.loss={kind: reverse_kl_full, discount: 0.9}"])
    assert load_config("configs/ci.yaml", ["opd.loss.discount=0.9"]).opd.loss.discount == 0.9


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
    """`python -m opd_ops.cli` (spawn-safe entry without the console script) sees every command."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "opd_ops.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "registry" in out.stdout and "run" in out.stdout


def _float_paths(ann, path: str):
    """Dotted paths of every float in a schema type (sections, optionals, dict values, lists)."""
    import types
    import typing

    from pydantic import BaseModel

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is float:
        yield path
    elif isinstance(ann, type) and issubclass(ann, BaseModel):
        for name, f in ann.model_fields.items():
            yield from _float_paths(f.annotation, f"{path}.{name}" if path else name)
    elif origin is typing.Annotated:
        yield from _float_paths(args[0], path)
    elif origin in (typing.Union, types.UnionType):
        for a in args:
            yield from _float_paths(a, path)
    elif origin is dict:
        yield from _float_paths(args[1], f"{path}.sft_warmup")
    elif origin is list:
        yield from _float_paths(args[0], f"{path}.0")


FLOAT_PATHS = sorted(set(_float_paths(__import__("opd.config", fromlist=["RunConfig"]).RunConfig, "")))


def test_the_float_walk_sees_every_section():
    assert len(FLOAT_PATHS) >= 20, FLOAT_PATHS
    for p in ("opd.lr", "opd.loss.kl_coef", "opd.loss.beta", "sft.train.weight_decay", "tasks.retry_delay_seconds",
              "tasks.timeout_seconds.sft_warmup", "eval.gates.min_accuracy", "opd.lora.alpha",
              "teacher.bootstrap.train.lr", "data.eval_fraction"):
        assert p in FLOAT_PATHS


@pytest.mark.parametrize("path", FLOAT_PATHS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_refuses_inf_and_nan(path, value):
    """A non-finite value is never a plan: every float of the schema refuses it, naming the field."""
    override = f"{path.rsplit('.', 1)[0]}={{sft_warmup: {value}}}" if path.endswith(".sft_warmup") \
        else f"{path}={value}"
    if path.endswith(".0"):
        override = f"{path[:-2]}=[{value}]"
    if path.startswith("opd.loss."):  # a loss's own setting: given with a kind that has it
        from opd.config import GKDJSD, ReverseKLIS

        key = path.rsplit(".", 1)[1]
        kind = next(c for c in (ReverseKLIS, GKDJSD) if key in c.model_fields).model_fields["kind"].default
        override = f"opd.loss={{kind: {kind}, {key}: {value}}}"
    if path.startswith("task.verifier."):  # likewise a verifier's own setting
        from opd.data.verifiers import MathSpec, RegexSpec

        key = path.rsplit(".", 1)[1]
        kind = next(c for c in (MathSpec, RegexSpec) if key in c.model_fields).model_fields["kind"].default
        override = f"task.verifier={{kind: {kind}, {key}: {value}}}"
    with pytest.raises(ConfigError) as e:
        load_config("configs/ci.yaml", [override])
    assert f"{path}: Input should be a finite number" in str(e.value)


@pytest.mark.parametrize("override, needle", [
    ("registry.bucket=ADV1-UPPER", "registry.bucket: 'ADV1-UPPER' is not a valid S3 bucket name"),
    ("registry.bucket=ab", "it is 2 characters; a bucket name has 3-63"),
    ("registry.bucket=-opd", "must start and end with a letter or digit"),
    ("registry.bucket=opd..x", "must not contain '..'"),
    ("registry.bucket=opd.-x", "must not contain '..', '.-' or '-.'"),
    ("registry.bucket=10.0.0.1", "must not be formatted as an IP address"),
    ("registry.bucket=sthree-opd", "must not start with xn-- / sthree-"),
    ("registry.bucket=opd--ol-s3", "must not end with"),
    ("registry.prefix=..", "registry.prefix: unsafe path '..'"),
    ("registry.prefix='a b'", "registry.prefix: 'a b' is not a safe name"),
    ("registry.region=us_east_1", "registry.region: 'us_east_1' is not a region name"),
    ("registry.endpoint_url=s3.amazonaws.com", "registry.endpoint_url: 's3.amazonaws.com' has no scheme"),
    ("registry.endpoint_url=localhost:9000", "registry.endpoint_url: 'localhost:9000' has no scheme"),
    ("registry.endpoint_url=http:///x", "registry.endpoint_url: 'http:///x' has no host"),
    ("registry.endpoint_url=gopher://x", "registry.endpoint_url: gopher:// URLs are not allowed"),
    ("registry.endpoint_url=http://169.254.0.7:80", "is a link-local address"),
    ("registry.endpoint_url=http://[::ffff:169.254.169.254]/", "is a link-local address"),
    ("registry.endpoint_url=http://0xa9.0xfe.0xa9.0xfe/", "is a link-local address"),
    ("registry.endpoint_url=http://metadata.google.internal/", "is a link-local address"),
    ("registry.endpoint_url=http://[fd00:ec2::254]/", "is a link-local address"),
    ("registry.endpoint_url=http://0.0.0.0:9000", "is not a server address"),
    ("registry.endpoint_url='http://h:9000/ x'", "whitespace or control characters"),
    ("registry.endpoint_url=http://h:99999", "not a valid URL"),
    ("registry.endpoint_url=http://h:9000/?x=1", "drop the '?query'"),
    ("teacher.endpoint=http://u@127.0.0.1:8000", "teacher.endpoint: the URL carries credentials"),
    ("teacher.path=s3://opd-models", "teacher.path: 's3://opd-models' names no key"),
    ("student.path=s3://opd-models/a/../b", "student.path: 's3://opd-models/a/../b': the key has an empty"),
    ("data.source=''", "data.source: String should have at least 1 character"),
])
def test_names_and_urls_are_checked_up_front(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/ci.yaml", [override])
    assert needle in str(e.value)


@pytest.mark.parametrize("override", ["registry.endpoint_url=https://s3.us-east-1.amazonaws.com",
                                      "registry.endpoint_url=http://127.0.0.1:8333",
                                      "registry.endpoint_url=http://[::1]:8333",
                                      "registry.endpoint_url=http://minio.svc.cluster.local:9000/",
                                      "registry.bucket=my.bucket-01", "registry.prefix=team/models-v2",
                                      "registry.region=auto", "registry.region=eu-central-2"])
def test_ordinary_names_and_urls_pass(override):
    load_config("configs/ci.yaml", [override])


def test_secret_in_an_endpoint_url_is_not_echoed():
    with pytest.raises(ConfigError) as e:
        load_config("configs/ci.yaml", ["registry.endpoint_url=https://AKIAEXAMPLE:wJalrXUtnFEMI@s3.example.com"])
    assert "AKIAEXAMPLE" not in str(e.value) and "wJalrXUtnFEMI" not in str(e.value)
