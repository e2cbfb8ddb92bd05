"""One pydantic schema for every run config.

Unknown keys and bad values fail with the field's dotted path, before any work starts.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from opd.errors import PermanentError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

VLLM_CPU_HEAD_DIMS = (32, 64, 128)


class ConfigError(PermanentError, ValueError):
    """A config that cannot run; the message names the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """A Llama-architecture model built from scratch (demo teacher/student)."""

    num_layers: int = Field(ge=1, le=64)
    hidden_size: int = Field(ge=16)
    num_heads: int = Field(ge=1)
    intermediate_size: int = Field(ge=16)

    @model_validator(mode="after")
    def _head_dim(self) -> "ModelSpec":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        hd = self.hidden_size // self.num_heads
        if hd not in VLLM_CPU_HEAD_DIMS:
            raise ValueError(
                f"head_dim = hidden_size/num_heads = {hd}; vLLM's CPU attention accepts only "
                f"{VLLM_CPU_HEAD_DIMS}: change hidden_size or num_heads"
            )
        return self


class StackConfig(_Strict):
    host: Literal["127.0.0.1"] = "127.0.0.1"
    prefect_port: int = Field(4200, ge=1024, le=65535)
    s3_port: int = Field(8333, ge=1024, le=65535)


class SyntheticTask(_Strict):
    """Multi-number addition with a scratchpad of partial sums (see opd.data.task)."""

    num_terms: int = Field(3, ge=2, le=8)
    max_digits: int = Field(3, ge=1, le=8)
    n_train: int = Field(4000, ge=16)
    n_eval: int = Field(256, ge=8)
    # "any": the ground-truth scratchpad adds the terms in a random order (several correct paths)
    term_order: Literal["given", "any"] = "given"


class DataConfig(_Strict):
    source: str = "synthetic"  # "synthetic", a local JSONL path, or an s3:// URI
    eval_source: str | None = None  # for a user JSONL; else eval is split off the source
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    synthetic: SyntheticTask = SyntheticTask()
    max_prompt_tokens: int = Field(64, ge=4)
    min_prompt_tokens: int = Field(1, ge=1)


class TrainSpec(_Strict):
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    # rows per forward/backward (gradient accumulation): bounds activation memory, not the step;
    # None = the whole batch at once
    micro_batch: int | None = Field(None, ge=1)


class TeacherBootstrap(_Strict):
    model: ModelSpec
    train: TrainSpec
    min_accuracy: float = Field(0.9, ge=0, le=1)
    eval_every: int = Field(250, ge=1)
    max_steps: int = Field(ge=1)


class TeacherConfig(_Strict):
    path: str | None = None  # local dir or s3:// URI of a trained teacher; None = bootstrap (demo)
    bootstrap: TeacherBootstrap | None = None
    trust_remote_code: bool = False
    # how the teacher grades tokens (opd.teachers.make_teacher): in-process transformers, in-process
    # vLLM, or a vLLM OpenAI-compatible server at `endpoint` serving the same teacher
    scorer: Literal["hf", "vllm", "remote"] = "hf"
    endpoint: str | None = None  # e.g. http://127.0.0.1:8000; required for scorer=remote
    served_model_name: str | None = None  # the server's model id; None = the only one it serves
    tensor_parallel_size: int = Field(1, ge=1)  # scorer=vllm: GPUs the in-process teacher engine spans

    @model_validator(mode="after")
    def _tp(self) -> "TeacherConfig":
        if self.tensor_parallel_size > 1 and self.scorer != "vllm":
            where = ("start the server with --tensor-parallel-size" if self.scorer == "remote"
                     else "set teacher.scorer=vllm")
            raise ValueError(f"teacher.tensor_parallel_size applies to teacher.scorer=vllm: {where}")
        return self

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherConfig":
        if self.path is None and self.bootstrap is None:
            raise ValueError("set teacher.path (a trained teacher) or teacher.bootstrap (train the demo teacher)")
        return self

    @model_validator(mode="after")
    def _endpoint(self) -> "TeacherConfig":
        if self.scorer == "remote" and not self.endpoint:
            raise ValueError("teacher.scorer=remote needs teacher.endpoint, the URL of a vLLM server serving the "
                             "teacher (e.g. http://127.0.0.1:8000)")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"teacher.endpoint={self.endpoint!r}: expected an http:// or https:// URL")
        return self


class StudentConfig(_Strict):
    model: ModelSpec | None = None  # build from scratch (demo) ...
    path: str | None = None  # ... or start from a pretrained student

    @model_validator(mode="after")
    def _one_source(self) -> "StudentConfig":
        if (self.model is None) == (self.path is None):
            raise ValueError("set exactly one of student.model or student.path")
        return self


class SFTConfig(_Strict):
    num_prompts: int = Field(ge=1)  # train prompts the teacher completes (off-policy data)
    teacher_temperature: float = Field(1.0, ge=0)
    train: TrainSpec


class LoraSpec(_Strict):
    """LoRA on the student during OPD (peft). Each round trains fresh adapters on the round's
    starting weights and merges them at its end, so checkpoints and the registry hold plain
    weights; within a round the vLLM sampler gets only the adapters at every step."""

    r: int = Field(16, ge=1, le=512)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])


class OPDConfig(_Strict):
    rounds: int = Field(ge=1)
    steps_per_round: int = Field(1, ge=1)  # on-policy steps: sample, grade, update, sync
    prompts_per_step: int = Field(ge=1)
    samples_per_prompt: int = Field(4, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(ge=1)
    lr: float = Field(gt=0)
    warmup_steps: int = Field(20, ge=0)
    micro_batch: int = Field(64, ge=1)
    clip_ratio: float | None = Field(None, gt=0)
    kl_coef: float = Field(1.0, gt=0)
    advantage_baseline: Literal["none", "mean"] = "none"
    # reverse_kl_is only: credit each token with the discounted reverse KL of the tokens after it
    # (reward-to-go); 0 = the reference report's per-token advantage
    discount: float = Field(0.0, ge=0, le=1)
    # "reverse_kl_is": sampled-token policy gradient (needs only the teacher's sampled-token logprobs);
    # the others are distribution-level losses computed from teacher and student logits (opd.losses).
    loss: Literal["reverse_kl_is", "reverse_kl_full", "reverse_kl_topk", "gkd_jsd"] = "reverse_kl_is"
    topk: int = Field(20, ge=1)  # support size for reverse_kl_topk
    gkd_beta: float = Field(0.5, ge=0, le=1)  # gkd_jsd: 0 = forward KL, 1 = reverse KL (TRL convention)
    forward_kl_coef: float = Field(0.0, ge=0)  # + coef * KL(teacher || student) for the logit losses
    eval_slice: int = Field(64, ge=1)
    sampler: Literal["vllm", "hf"] = "vllm"
    weight_sync: Literal["inplace", "restart"] = "inplace"
    tensor_parallel_size: int = Field(1, ge=1)  # GPUs the vLLM sampler engine spans
    lora: LoraSpec | None = None  # None = full fine-tuning

    @model_validator(mode="after")
    def _lora(self) -> "OPDConfig":
        if self.lora is not None and self.sampler != "vllm":
            raise ValueError("opd.lora hands the sampler adapters (vLLM LoRA): set opd.sampler=vllm")
        return self

    @model_validator(mode="after")
    def _tp(self) -> "OPDConfig":
        if self.discount > 0 and self.loss != "reverse_kl_is":
            raise ValueError(f"opd.discount applies to opd.loss=reverse_kl_is, not {self.loss!r}: set it to 0")
        if self.tensor_parallel_size > 1 and self.sampler != "vllm":
            raise ValueError("opd.tensor_parallel_size > 1 needs opd.sampler=vllm (the hf sampler runs on one device)")
        return self

    @model_validator(mode="after")
    def _is_temperature(self) -> "OPDConfig":
        # vLLM's logprobs are of the untempered distribution: the importance ratio is only
        # right when sampling at temperature 1 with no nucleus truncation.
        if self.temperature != 1.0 or self.top_p != 1.0:
            raise ValueError(
                "importance ratios need samples from the student's own distribution: "
                "set opd.temperature=1.0 and opd.top_p=1.0"
            )
        return self


class TrainingConfig(_Strict):
    """Where the student's OPD update runs: in the driver process, or on a torchrun group.

    With num_processes > 1 the update step of every round runs on that many ranks (one per GPU;
    gloo processes on CPU): DDP replicates the student, FSDP2 shards weights, gradients and Adam
    state (students whose ~16 bytes/param of training state do not fit one GPU)."""

    num_processes: int = Field(1, ge=1, le=1024)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # GPU indices the group's ranks own (CUDA_VISIBLE_DEVICES of the group), kept apart from the
    # driver's vLLM sampler; None = ranks take GPUs 0..N-1 and share them with the sampler.
    devices: list[int] | None = None
    # autocast for every student update (teacher bootstrap, SFT, OPD): bf16 on GPUs that have it;
    # fp16 (GPU only) adds loss scaling. Weights and Adam state stay fp32; losses upcast to fp32.
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"

    @model_validator(mode="after")
    def _devices(self) -> "TrainingConfig":
        if self.devices is not None and len(self.devices) != self.num_processes:
            raise ValueError(f"training.devices lists {len(self.devices)} GPUs for training.num_processes="
                             f"{self.num_processes}: give one GPU index per process")
        if self.devices is not None and len(set(self.devices)) != len(self.devices):
            raise ValueError(f"training.devices {self.devices} repeats a GPU: give each process its own")
        return self


class GateConfig(_Strict):
    min_accuracy: float = Field(0.0, ge=0, le=1)
    max_reverse_kl: float | None = Field(None, ge=0)
    opd_must_beat_sft_kl: bool = True
    # no regression vs the model at this alias, both evaluated on the same eval set in one run
    no_regression_vs: str | None = "production"
    regression_margin: float = Field(0.02, ge=0, le=1)
    require_approval: bool = False  # promotion pauses for a human approve/reject (UI or API)
    approval_timeout_s: int = Field(3600, ge=1)


class EvalConfig(_Strict):
    max_examples: int = Field(256, ge=1)
    kl_samples_per_prompt: int = Field(4, ge=1)
    gates: GateConfig = GateConfig()


class RegistryConfig(_Strict):
    endpoint_url: str | None = None  # None = the local stack's SeaweedFS
    bucket: str = "opd-registry"
    prefix: str = "models"
    model_name: str
    region: str = "us-east-1"

    @field_validator("model_name")
    @classmethod
    def _name(cls, v: str) -> str:
        from opd.registry.names import validate_model_name

        return validate_model_name(v)


class TaskPolicy(_Strict):
    retries: int = Field(2, ge=0)
    retry_delay_seconds: float = Field(5, ge=0)
    timeout_seconds: dict[str, float] = Field(default_factory=dict)
    default_timeout_seconds: float = Field(3600, gt=0)

    def timeout(self, task: str) -> float:
        return self.timeout_seconds.get(task, self.default_timeout_seconds)


class DeploymentConfig(_Strict):
    """Where and when Prefect runs this config as a deployment (`opd deploy`)."""

    work_pool: str = "opd-local"
    pool_type: Literal["process", "kubernetes", "docker"] = "process"
    cron: str | None = None  # e.g. "0 3 * * *"; None = triggered by hand or API only
    timezone: str = "UTC"


class RunConfig(_Strict):
    name: str
    seed: int = 0
    home: str = ".opd"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    stack: StackConfig = StackConfig()
    data: DataConfig = DataConfig()
    teacher: TeacherConfig
    student: StudentConfig
    sft: SFTConfig
    opd: OPDConfig
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig
    training: TrainingConfig = TrainingConfig()
    tasks: TaskPolicy = TaskPolicy()
    deployment: DeploymentConfig = DeploymentConfig()

    @model_validator(mode="after")
    def _lora_strategy(self) -> "RunConfig":
        if self.opd.lora is not None and self.training.strategy == "fsdp" and self.training.num_processes > 1:
            raise ValueError("opd.lora with training.strategy=fsdp is not supported: LoRA students train "
                             "replicated, set training.strategy=ddp")
        return self

    @model_validator(mode="after")
    def _even_shards(self) -> "RunConfig":
        n, w = self.opd.prompts_per_step * self.opd.samples_per_prompt, self.training.num_processes
        if n % w:
            raise ValueError(f"opd.prompts_per_step * opd.samples_per_prompt = {n} rollouts per step cannot be split "
                             f"evenly over training.num_processes={w}: make it a multiple of {w}")
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        from opd.paths import check_name

        return check_name(v, "name")

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set opd.rounds=3")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/demo.yaml for every key)"
        lines.append(f"  {path}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return validate_config(tree)


def validate_config(tree: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None
