"""One pydantic schema for every run config.

Unknown keys and bad values fail with the field's dotted path, before any work starts.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union
from urllib.parse import urlsplit

import yaml
from opd.data.verifiers import IntegerSpec, VerifierSpec
from opd.errors import PermanentError
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError,
                      field_validator, model_validator)

VLLM_CPU_HEAD_DIMS = (32, 64, 128)

# Upper bounds: a value past these is a typo (an extra zero, a unit mix-up), not a plan; each is far
# above any run this code is meant for, and refusing it here beats hanging or filling a disk later.
MAX_STEPS = 1_000_000  # optimizer steps of one stage
MAX_BATCH = 65_536  # rows (prompts, rollouts, examples) in one step
MAX_EXAMPLES = 10_000_000  # rows of a data set
MAX_CONTEXT = 262_144  # tokens: prompt + completion of the largest context models in use
MAX_BUILT_CONTEXT = 8_192  # tokens: the positions a model built here (student.model, teacher.bootstrap) gets
MAX_SECONDS = 7 * 24 * 3600  # timeouts and delays: a week
MAX_RETRIES = 20


def _short(v: object, n: int = 80) -> str:
    """A value as shown in an error: repr, trimmed (a pasted file or key must not flood the log)."""
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


# ---------------------------------------------------------------- S3 names and endpoint URLs

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# prefixes and suffixes AWS reserves for access points, directory buckets and the like
_BUCKET_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def check_bucket(name: object, field: str) -> str:
    """``name`` if it follows the S3 bucket-naming rules, else ValueError naming ``field`` and the rule.

    The rules are AWS's (general purpose buckets); other S3 servers accept a subset of names, so a
    name valid here works everywhere."""
    if not isinstance(name, str):
        raise ValueError(f"{field}: expected a bucket name, got {_short(name)}")
    rule = None
    if not 3 <= len(name) <= 63:
        rule = f"is {len(name)} characters; a bucket name has 3-63"
    elif not _BUCKET.fullmatch(name):
        rule = ("may use only lowercase letters, digits, '.' and '-', and must start and end with a "
                "letter or digit")
    elif ".." in name or ".-" in name or "-." in name:
        rule = "must not contain '..', '.-' or '-.'"
    elif re.fullmatch(r"\d+\.\d+\.\d+\.\d+", name):
        rule = "must not be formatted as an IP address"
    elif name.startswith(_BUCKET_RESERVED_PREFIXES):
        rule = f"must not start with {' / '.join(_BUCKET_RESERVED_PREFIXES)} (reserved by S3)"
    elif name.endswith(_BUCKET_RESERVED_SUFFIXES):
        rule = f"must not end with {' / '.join(_BUCKET_RESERVED_SUFFIXES)} (reserved by S3)"
    if rule:
        raise ValueError(f"{field}: {_short(name)} is not a valid S3 bucket name: it {rule} "
                         "(e.g. opd-registry)")
    return name


def check_key_prefix(value: object, field: str) -> str:
    """An S3 key prefix made of safe names joined by '/': no '..', no leading '/', no empty part."""
    from opd.paths import check_name, safe_rel

    for part in safe_rel(value, field).parts:
        check_name(part, field)
    return value  # type: ignore[return-value]


def check_s3_uri(uri: str, field: str) -> str:
    """An ``s3://bucket/key`` URI: a valid bucket and a key without '..', '.', empty parts or control chars."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    check_bucket(bucket, f"{field} (bucket of {_short(uri)})")
    key = key.rstrip("/")
    if not key:
        raise ValueError(f"{field}: {_short(uri)} names no key: use s3://<bucket>/<key>")
    if any(p in ("", ".", "..") for p in key.split("/")) or any(ord(c) < 32 or c == "\x7f" for c in key):
        raise ValueError(f"{field}: {_short(uri)}: the key has an empty, '.' or '..' part or a control "
                         "character; give the object's plain key")
    return uri


# the cloud metadata services: link-local on every cloud, plus AWS's IPv6 address and GCP's name
_METADATA_IPS = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
_METADATA_HOSTS = {"metadata.google.internal", "metadata.goog", "metadata"}


def _host_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` spells, including the legacy IPv4 forms resolvers accept ('2852039166',
    '0xa9.0xfe.0xa9.0xfe'); None for a DNS name. Never resolves a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            ip = ipaddress.ip_address(socket.inet_aton(host))
        except (OSError, ValueError):
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def check_endpoint(url: object, field: str) -> str:
    """An http(s) URL of a server: a host, no credentials, not link-local (the cloud metadata service).

    The URL is used for requests that carry credentials (S3 signatures) or data, so a link-local
    target or a file:// URL is refused before anything connects."""
    fix = "give the server's http:// or https:// URL, e.g. http://127.0.0.1:8000"
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"{field}: expected a URL, got {_short(url)}: {fix}")
    if any(c.isspace() or ord(c) < 32 or c == "\x7f" for c in url):
        raise ValueError(f"{field}: the URL holds whitespace or control characters: {fix}")
    try:
        p = urlsplit(url)
        port = p.port
    except ValueError as e:
        raise ValueError(f"{field}: not a valid URL ({e}): {fix}") from None
    if "://" not in url:
        raise ValueError(f"{field}: {_short(url)} has no scheme: {fix}")
    if p.scheme.lower() not in ("http", "https"):
        shown = f"{p.scheme}://" if p.scheme else _short(url)
        raise ValueError(f"{field}: {shown} URLs are not allowed: {fix}")
    if p.username is not None or p.password is not None:  # never echo them: they may be secrets
        raise ValueError(f"{field}: the URL carries credentials (user:password@host); remove them: credentials "
                         "come from the environment (AWS chain / the server's own auth), never from a URL")
    host = (p.hostname or "").rstrip(".").lower()
    if not host:
        raise ValueError(f"{field}: {_short(url)} has no host: {fix}")
    if port == 0:
        raise ValueError(f"{field}: {_short(url)}: port 0 is not a server port: {fix}")
    if p.query or p.fragment:
        raise ValueError(f"{field}: {_short(url)}: drop the '?query' / '#fragment': {fix}")
    ip = _host_ip(host)
    if host in _METADATA_HOSTS or (ip is not None and (ip in _METADATA_IPS or ip.is_link_local)):
        raise ValueError(f"{field}: {_short(url)} is a link-local address (169.254.0.0/16, fe80::/10: the "
                         "cloud metadata service lives there); refusing to send requests to it: " + fix)
    if ip is not None and (ip.is_unspecified or ip.is_multicast):
        raise ValueError(f"{field}: {_short(url)} is not a server address (unspecified or multicast): {fix}")
    return url


class ConfigError(PermanentError, ValueError):
    """A config that cannot run; the message names the field and the fix."""


class _Strict(BaseModel):
    # allow_inf_nan=False: every float of every section refuses .inf/.nan (a non-finite lr or
    # timeout is never a plan, and NaN compares false with every bound)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Dtype = Literal["auto", "bfloat16", "float16", "float32"]


class ModelSpec(_Strict):
    """A model built from scratch (demo and word-problem teachers/students): Llama (the addition demo) or
    Qwen3 (q/k norms, untied head: the real-model shape the word-problem pair uses)."""

    architecture: Literal["llama", "qwen3"] = "llama"
    num_layers: int = Field(ge=1, le=64)
    hidden_size: int = Field(ge=16, le=8192)
    num_heads: int = Field(ge=1, le=128)
    intermediate_size: int = Field(ge=16, le=32768)

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

    kind: Literal["addition"] = "addition"
    num_terms: int = Field(3, ge=2, le=8)
    max_digits: int = Field(3, ge=1, le=8)
    n_train: int = Field(4000, ge=16, le=MAX_EXAMPLES)
    n_eval: int = Field(256, ge=8, le=MAX_EXAMPLES)
    # "any": the ground-truth scratchpad adds the terms in a random order (several correct paths)
    term_order: Literal["given", "any"] = "given"

    @model_validator(mode="after")
    def _enough_problems(self) -> "SyntheticTask":
        # every term is a number below 10**max_digits, so there are 10**(max_digits*num_terms)
        # distinct prompts; drawing more than half of them would take too long (or forever)
        space = 10 ** (self.max_digits * self.num_terms)
        if self.n_train + self.n_eval > space // 2:
            raise ValueError(f"n_train + n_eval = {self.n_train + self.n_eval} distinct problems, but num_terms="
                             f"{self.num_terms} with max_digits={self.max_digits} has only {space}: lower "
                             "data.synthetic.n_train/n_eval (at most half of them) or raise max_digits")
        return self


class WordProblemTask(_Strict):
    """Multi-step arithmetic word problems with worked solutions ending in ``\\boxed{N}``, tokenized by a
    byte-level BPE our code trains on the task (opd.data.word_problems); ``context_sentences`` puts that
    many irrelevant sentences before each problem (20: prompts of 200+ tokens)."""

    kind: Literal["word_problems"]
    n_train: int = Field(4000, ge=16, le=MAX_EXAMPLES)
    n_eval: int = Field(256, ge=8, le=MAX_EXAMPLES)
    min_steps: int = Field(2, ge=1, le=6)
    max_steps: int = Field(4, ge=1, le=6)
    max_operand: int = Field(20, ge=2, le=1000)
    max_value: int = Field(99, ge=2, le=100_000)
    context_sentences: int = Field(0, ge=0, le=32)
    vocab_size: int = Field(1024, ge=300, le=65536)  # the task's BPE (bytes + specials + merges)

    @model_validator(mode="after")
    def _ranges(self) -> "WordProblemTask":
        if self.min_steps > self.max_steps:
            raise ValueError(f"data.synthetic.min_steps={self.min_steps} > max_steps={self.max_steps}: "
                             "lower the first or raise the second")
        if self.max_value < self.max_operand:
            raise ValueError(f"data.synthetic.max_value={self.max_value} < max_operand={self.max_operand}: "
                             "every running total must be able to hold an operand; raise max_value")
        return self


def _synthetic_kind(v: Any) -> str:
    # a section without `kind` is the addition task every existing config means
    return (v.get("kind", "addition") if isinstance(v, dict) else getattr(v, "kind", "addition"))


SyntheticSpec = Annotated[Union[Annotated[SyntheticTask, Tag("addition")],
                                Annotated[WordProblemTask, Tag("word_problems")]],
                          Discriminator(_synthetic_kind)]


class DataConfig(_Strict):
    source: str = Field("synthetic", min_length=1)  # "synthetic", a local JSONL path, or an s3:// URI
    eval_source: str | None = Field(None, min_length=1)  # for a user JSONL; else eval is split off the source
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    synthetic: SyntheticSpec = SyntheticTask()
    max_prompt_tokens: int = Field(64, ge=4, le=MAX_CONTEXT)
    min_prompt_tokens: int = Field(1, ge=1, le=MAX_CONTEXT)

    @field_validator("source", "eval_source")
    @classmethod
    def _s3_uri(cls, v: str | None, info) -> str | None:
        if v is not None and v.startswith("s3://"):
            check_s3_uri(v, f"data.{info.field_name}")
        return v

    @model_validator(mode="after")
    def _sources(self) -> "DataConfig":
        if self.eval_source is not None and self.source == "synthetic":
            raise ValueError("data.eval_source applies to a JSONL data.source; the synthetic task makes its own "
                             "eval split: remove data.eval_source or set data.source to your JSONL")
        if self.min_prompt_tokens > self.max_prompt_tokens:
            raise ValueError(f"data.min_prompt_tokens={self.min_prompt_tokens} > data.max_prompt_tokens="
                             f"{self.max_prompt_tokens}: lower the first or raise the second")
        return self


class TrainSpec(_Strict):
    steps: int = Field(ge=1, le=MAX_STEPS)
    batch_size: int = Field(ge=1, le=MAX_BATCH)
    lr: float = Field(gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    # rows per forward/backward (gradient accumulation): bounds activation memory, not the step;
    # None = the whole batch at once
    micro_batch: int | None = Field(None, ge=1, le=MAX_BATCH)


class TeacherBootstrap(_Strict):
    model: ModelSpec
    train: TrainSpec
    min_accuracy: float = Field(0.9, ge=0, le=1)
    eval_every: int = Field(250, ge=1, le=MAX_STEPS)
    max_steps: int = Field(ge=1, le=MAX_STEPS)


class TeacherConfig(_Strict):
    path: str | None = Field(None, min_length=1)  # local dir or s3:// URI of a trained teacher; None = bootstrap
    # ... or a version in this run's registry (MODEL:N, MODEL@alias, MODEL = its latest), e.g. an earlier
    # student: pulled (sha256-verified) into <home>/cache/registry before preflight
    ref: str | None = Field(None, min_length=1, max_length=300)
    bootstrap: TeacherBootstrap | None = None
    trust_remote_code: bool = False
    # how the teacher grades tokens (opd.teachers.make_teacher): in-process transformers, in-process
    # vLLM, or a vLLM OpenAI-compatible server at `endpoint` serving the same teacher
    scorer: Literal["hf", "vllm", "remote"] = "hf"
    endpoint: str | None = None  # e.g. http://127.0.0.1:8000; required for scorer=remote
    served_model_name: str | None = Field(None, min_length=1, max_length=256)  # None = the only model served
    tensor_parallel_size: int = Field(1, ge=1, le=64)  # scorer=vllm: GPUs the in-process teacher engine spans
    # auto = the checkpoint's dtype on a GPU, float32 on CPU; every load of the teacher and its vLLM engine
    dtype: Dtype = "auto"
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)  # scorer=vllm: the teacher engine's share of the GPU
    enforce_eager: bool = True  # scorer=vllm: False captures CUDA graphs (faster decode, slower start)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return check_s3_uri(v, "teacher.path") if v is not None and v.startswith("s3://") else v

    @model_validator(mode="after")
    def _tp(self) -> "TeacherConfig":
        if self.tensor_parallel_size > 1 and self.scorer != "vllm":
            where = ("start the server with --tensor-parallel-size" if self.scorer == "remote"
                     else "set teacher.scorer=vllm")
            raise ValueError(f"teacher.tensor_parallel_size applies to teacher.scorer=vllm: {where}")
        return self

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherConfig":
        if self.path is None and self.ref is None and self.bootstrap is None:
            raise ValueError("set teacher.path (a trained teacher), teacher.ref (a registry version) or "
                             "teacher.bootstrap (train the demo teacher)")
        if self.path is not None and self.ref is not None:
            raise ValueError("set one of teacher.path and teacher.ref")
        return self

    @field_validator("ref")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        if v is not None:
            from opd.names import split_ref

            try:
                split_ref(v)
            except ValueError as e:
                raise ValueError(f"teacher.ref: {e} (use MODEL:N, MODEL@alias or MODEL)") from None
        return v

    @property
    def trained(self) -> bool:
        """Given (path or registry ref) rather than bootstrapped here."""
        return self.path is not None or self.ref is not None

    @model_validator(mode="after")
    def _endpoint(self) -> "TeacherConfig":
        if self.scorer == "remote" and not self.endpoint:
            raise ValueError("teacher.scorer=remote needs teacher.endpoint, the URL of a vLLM server serving the "
                             "teacher (e.g. http://127.0.0.1:8000)")
        return self

    @field_validator("endpoint")
    @classmethod
    def _endpoint_url(cls, v: str | None) -> str | None:
        return None if v is None else check_endpoint(v, "teacher.endpoint")


class StudentConfig(_Strict):
    model: ModelSpec | None = None  # build from scratch (demo) ...
    path: str | None = Field(None, min_length=1)  # ... or start from a pretrained student
    # the sampler engine and evaluation copies; the trainer keeps float32 master weights (bf16 compute
    # is training.mixed_precision)
    dtype: Dtype = "auto"

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return check_s3_uri(v, "student.path") if v is not None and v.startswith("s3://") else v

    @model_validator(mode="after")
    def _one_source(self) -> "StudentConfig":
        if (self.model is None) == (self.path is None):
            raise ValueError("set exactly one of student.model or student.path")
        return self


class SFTConfig(_Strict):
    num_prompts: int = Field(ge=1, le=MAX_EXAMPLES)  # train prompts the teacher completes (off-policy data)
    teacher_temperature: float = Field(1.0, ge=0, le=10)
    train: TrainSpec
    # precomputed teacher completions (JSONL, local or s3://, rows {"prompt", "completion"}): the teacher
    # writes none; the first num_prompts rows are used
    completions: str | None = Field(None, min_length=1)

    @field_validator("completions")
    @classmethod
    def _completions(cls, v: str | None) -> str | None:
        return check_s3_uri(v, "sft.completions") if v is not None and v.startswith("s3://") else v


class LoraSpec(_Strict):
    """LoRA on the student during OPD (peft). Each round trains fresh adapters on the round's
    starting weights and merges them at its end, so checkpoints and the registry hold plain
    weights; within a round the vLLM sampler gets only the adapters at every step."""

    r: int = Field(16, ge=1, le=512)
    alpha: float = Field(32.0, gt=0, le=4096)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.]{1,128}$")]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, max_length=64)


# ---------------------------------------------------------------- OPD loss specs
# One class per loss: its settings and the teacher signal it needs. ``opd.objectives`` maps a spec to
# its loss (``LOSSES``); adding a loss is one class here, one function there, and its test.

class ReverseKLIS(_Strict):
    """The reference report's loss: the per-token reverse KL as an advantage fixed at scoring time,
    advantage_t = -kl_coef * (log q_sampler(x_t) - log p_teacher(x_t)), and an importance-sampled policy
    gradient on it. Needs only the teacher's log-prob of each sampled token (any teacher.scorer)."""

    kind: Literal["reverse_kl_is"] = "reverse_kl_is"
    kl_coef: float = Field(1.0, ge=0, le=1000)  # 0: no reverse-KL reward (with opd.reward: plain RL)
    clip_ratio: float | None = Field(None, gt=0, le=1000)  # cap on the importance ratio; None = no cap
    # "mean" subtracts the batch's mean advantage (a constant: the estimate stays unbiased)
    baseline: Literal["none", "mean"] = "none"
    # credit each token with the discounted reverse KL of the tokens after it (reward-to-go);
    # 0 = the reference report's per-token advantage
    discount: float = Field(0.0, ge=0, le=1)
    signal: ClassVar[str] = "logprobs"


class ReverseKLFull(_Strict):
    """Exact per-position reverse KL over the whole vocabulary (the teacher's logits in the update)."""

    kind: Literal["reverse_kl_full"] = "reverse_kl_full"
    forward_kl_coef: float = Field(0.0, ge=0, le=1000)  # + coef * KL(teacher || student): mass-covering
    signal: ClassVar[str] = "logits"


class ReverseKLTopK(_Strict):
    """Reverse KL on the teacher's top-k support, both renormalised there (any teacher.scorer)."""

    kind: Literal["reverse_kl_topk"] = "reverse_kl_topk"
    topk: int = Field(20, ge=1, le=1024)
    forward_kl_coef: float = Field(0.0, ge=0, le=1000)
    signal: ClassVar[str] = "topk"


class GKDJSD(_Strict):
    """GKD's generalized JSD (TRL's generalized_jsd_loss): beta 0 = forward KL, 1 = reverse KL."""

    kind: Literal["gkd_jsd"] = "gkd_jsd"
    beta: float = Field(0.5, ge=0, le=1)
    forward_kl_coef: float = Field(0.0, ge=0, le=1000)
    signal: ClassVar[str] = "logits"


def _loss_shorthand(v: Any) -> Any:
    """``loss: gkd_jsd`` is short for ``loss: {kind: gkd_jsd}`` (every setting at its default); settings
    without a kind (``--set opd.loss.kl_coef=0.5``) are the default loss's."""
    if isinstance(v, str):
        return {"kind": v}
    return {"kind": "reverse_kl_is", **v} if isinstance(v, dict) and "kind" not in v else v


LossSpec = Annotated[Union[ReverseKLIS, ReverseKLFull, ReverseKLTopK, GKDJSD], Field(discriminator="kind"),
                     BeforeValidator(_loss_shorthand)]
LOSS_SPEC = TypeAdapter(LossSpec)


def _verifier_shorthand(v: Any) -> Any:
    """``verifier: math`` is short for ``verifier: {kind: math}``."""
    return {"kind": v} if isinstance(v, str) else v


class TaskConfig(_Strict):
    """What a prompt looks like to the models and which completions count as correct.

    ``prompt_format: chat`` renders each prompt as a user turn (after ``system_prompt``, if any) with the
    tokenizer's chat template and the generation prompt, so sampling stops at the template's end-of-turn
    token (the tokenizer's EOS). ``verifier`` (opd.data.verifiers) drives evaluation, the gates, the
    sampled accuracy and the GX answer check; ``none`` is a KL-only run."""

    prompt_format: Literal["raw", "chat"] = "raw"
    system_prompt: str | None = Field(None, min_length=1, max_length=100_000)
    verifier: Annotated[VerifierSpec, BeforeValidator(_verifier_shorthand)] = IntegerSpec()

    @model_validator(mode="after")
    def _system_needs_chat(self) -> "TaskConfig":
        if self.system_prompt is not None and self.prompt_format != "chat":
            raise ValueError("task.system_prompt applies to task.prompt_format=chat (raw prompts are sent as written)")
        return self
LOSS_KINDS = ("reverse_kl_is", "reverse_kl_full", "reverse_kl_topk", "gkd_jsd")
VERIFIER_KINDS = ("integer", "exact", "math", "regex", "none")

# loss settings that lived directly under opd: before the specs; where each one went
_MOVED_LOSS_KEYS = {"kl_coef": "kl_coef", "clip_ratio": "clip_ratio", "advantage_baseline": "baseline",
                    "discount": "discount", "topk": "topk", "gkd_beta": "beta", "forward_kl_coef": "forward_kl_coef"}


class RewardSpec(_Strict):
    """The task verifier's sparse reward (1 correct, 0 not) minus its group's mean, on every completion
    token, ``weight`` x beside the reverse-KL advantage (opd.rewards)."""

    weight: float = Field(1.0, gt=0, le=1000)


class OPDConfig(_Strict):
    rounds: int = Field(ge=1, le=10_000)
    steps_per_round: int = Field(1, ge=1, le=100_000)  # on-policy steps: sample, grade, update, sync
    prompts_per_step: int = Field(ge=1, le=MAX_BATCH)
    samples_per_prompt: int = Field(4, ge=1, le=1024)
    temperature: float = Field(1.0, gt=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(ge=1, le=MAX_CONTEXT)
    lr: float = Field(gt=0, le=1)
    warmup_steps: int = Field(20, ge=0, le=MAX_STEPS)
    micro_batch: int = Field(64, ge=1, le=MAX_BATCH)
    # the loss and its settings: a kind (reverse_kl_is | reverse_kl_full | reverse_kl_topk | gkd_jsd)
    loss: LossSpec = ReverseKLIS()
    eval_slice: int = Field(64, ge=1, le=MAX_BATCH)
    sampler: Literal["vllm", "hf"] = "vllm"
    weight_sync: Literal["inplace", "restart"] = "inplace"
    tensor_parallel_size: int = Field(1, ge=1, le=64)  # GPUs the vLLM sampler engine spans
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)  # the vLLM sampler engine's share of the GPU
    enforce_eager: bool = True  # False: the sampler engine captures CUDA graphs (faster decode, slower start)
    lora: LoraSpec | None = None  # None = full fine-tuning
    reward: RewardSpec | None = None  # None = OPD only; set: + the task verifier's reward (opd.rewards)

    @model_validator(mode="before")
    @classmethod
    def _moved_loss_keys(cls, data: Any) -> Any:
        moved = [k for k in _MOVED_LOSS_KEYS if isinstance(data, dict) and k in data]
        if moved:
            kind = data.get("loss")
            kind = kind.get("kind") if isinstance(kind, dict) else kind
            raise ValueError(", ".join(f"opd.{k} is now opd.loss.{_MOVED_LOSS_KEYS[k]}" for k in moved)
                             + f": write opd.loss as {{kind: {kind or 'reverse_kl_is'}, "
                             + ", ".join(f"{_MOVED_LOSS_KEYS[k]}: ..." for k in moved) + "}")
        return data

    @model_validator(mode="after")
    def _lora(self) -> "OPDConfig":
        if self.lora is not None and self.sampler != "vllm":
            raise ValueError("opd.lora hands the sampler adapters (vLLM LoRA): set opd.sampler=vllm")
        return self

    @model_validator(mode="after")
    def _tp(self) -> "OPDConfig":
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
    devices: list[Annotated[int, Field(ge=0, le=1023)]] | None = None
    # autocast for every student update (teacher bootstrap, SFT, OPD): bf16 on GPUs that have it;
    # fp16 (GPU only) adds loss scaling. Weights and Adam state stay fp32; losses upcast to fp32.
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    # activation checkpointing of the student's decoder layers in OPD updates (opd.memory): none, full,
    # selective (keep matmul outputs, recompute the elementwise ops), every_<k>, mixed_<k>
    gradient_checkpointing: str = Field(
        "none", pattern=r"^(none|full|selective|every_[1-9][0-9]{0,2}|mixed_[1-9][0-9]{0,2})$")
    # full: [tokens, vocab] logits per micro-batch; chunked: the LM head in row blocks (reverse_kl_is only)
    lm_head: Literal["full", "chunked"] = "full"

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
    max_reverse_kl: float | None = Field(None, ge=0, le=1e6)
    opd_must_beat_sft_kl: bool = True
    # no regression vs the model at this alias, both evaluated on the same eval set in one run
    no_regression_vs: str | None = "production"
    regression_margin: float = Field(0.02, ge=0, le=1)
    require_approval: bool = False  # promotion pauses for a human approve/reject (UI or API)
    approval_timeout_s: int = Field(3600, ge=1, le=30 * 24 * 3600)

    @field_validator("no_regression_vs")
    @classmethod
    def _alias(cls, v: str | None) -> str | None:
        from opd.paths import check_name

        return None if v is None else check_name(v, "eval.gates.no_regression_vs", max_len=64)


class EvalConfig(_Strict):
    max_examples: int = Field(256, ge=1, le=1_000_000)
    # temperature-1 samples per prompt: the reverse KL and the sampled accuracy (pass@1 averaged over them)
    kl_samples_per_prompt: int = Field(4, ge=1, le=1024)
    max_tokens: int | None = Field(None, ge=1, le=MAX_CONTEXT)  # None: opd.max_tokens (reasoning evals want more)
    gates: GateConfig = GateConfig()


class RegistryConfig(_Strict):
    endpoint_url: str | None = None  # None = the local stack's SeaweedFS
    bucket: str = "opd-registry"
    prefix: str = "models"
    model_name: str
    region: str = "us-east-1"

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        return None if v is None else check_endpoint(v, "registry.endpoint_url")

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        return check_bucket(v, "registry.bucket")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return check_key_prefix(v, "registry.prefix")

    @field_validator("region")
    @classmethod
    def _region(cls, v: str) -> str:
        # AWS's form (us-east-1, eu-central-2) and the single words other S3 servers use (auto, garage)
        if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", v) or len(v) > 32:
            raise ValueError(f"registry.region: {_short(v)} is not a region name: use lowercase letters, digits "
                             "and single '-' (e.g. us-east-1)")
        return v

    @field_validator("model_name")
    @classmethod
    def _name(cls, v: str) -> str:
        from opd.names import validate_model_name

        return validate_model_name(v)


class TaskPolicy(_Strict):
    retries: int = Field(2, ge=0, le=MAX_RETRIES)
    retry_delay_seconds: float = Field(5, ge=0, le=MAX_SECONDS)
    timeout_seconds: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")],
                          Annotated[float, Field(gt=0, le=MAX_SECONDS)]] = Field(default_factory=dict)
    default_timeout_seconds: float = Field(3600, gt=0, le=MAX_SECONDS)
    # register / set_alias write to S3 once, after all the training: they ride out an outage of minutes
    # (retry_delay_seconds doubling per retry, each wait capped at registry_max_delay_seconds)
    registry_retries: int = Field(8, ge=0, le=MAX_RETRIES)
    registry_max_delay_seconds: float = Field(60, ge=0, le=MAX_SECONDS)

    def timeout(self, task: str) -> float:
        return self.timeout_seconds.get(task, self.default_timeout_seconds)


class DeploymentConfig(_Strict):
    """Where and when Prefect runs this config as a deployment (`opd deploy`)."""

    work_pool: str = "opd-local"
    pool_type: Literal["process", "kubernetes", "docker"] = "process"
    cron: str | None = None  # e.g. "0 3 * * *"; None = triggered by hand or API only
    timezone: str = "UTC"

    @field_validator("work_pool")
    @classmethod
    def _pool(cls, v: str) -> str:
        from opd.paths import check_name

        return check_name(v, "deployment.work_pool", max_len=64)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"deployment.timezone: {_short(v)} is not an IANA time zone (e.g. UTC, "
                             "Europe/Berlin)") from None
        return v


class RunConfig(_Strict):
    name: str
    seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy and vLLM take 32-bit seeds
    home: str = ".opd"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    stack: StackConfig = StackConfig()
    data: DataConfig = DataConfig()
    teacher: TeacherConfig
    student: StudentConfig
    sft: SFTConfig | None  # null: OPD starts from student.path as it is (the reference report's setting)
    opd: OPDConfig
    task: TaskConfig = TaskConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig
    training: TrainingConfig = TrainingConfig()
    tasks: TaskPolicy = TaskPolicy()
    deployment: DeploymentConfig = DeploymentConfig()

    @model_validator(mode="after")
    def _accuracy_needs_a_verifier(self) -> "RunConfig":
        if self.task.verifier.kind == "none" and self.eval.gates.min_accuracy > 0:
            raise ValueError(f"eval.gates.min_accuracy: {self.eval.gates.min_accuracy} needs a verifier, but "
                             "task.verifier is none (a KL-only run): choose a verifier or set it to 0")
        return self

    @model_validator(mode="after")
    def _reward_needs(self) -> "RunConfig":
        o = self.opd
        if o.reward is not None and o.loss.kind != "reverse_kl_is":
            raise ValueError(f"opd.reward adds to reverse_kl_is's per-token advantages; opd.loss is {o.loss.kind}: "
                             "use opd.loss=reverse_kl_is")
        if o.reward is not None and self.task.verifier.kind == "none":
            raise ValueError("opd.reward needs a verifier to score completions; task.verifier is none")
        if o.loss.kind == "reverse_kl_is" and o.loss.kl_coef == 0 and o.reward is None:
            raise ValueError("opd.loss.kl_coef: 0 leaves nothing to learn from without opd.reward: set a kl_coef > 0 "
                             "or add opd.reward (plain RL)")
        return self

    @model_validator(mode="after")
    def _chunked_head_needs_sampled_token_loss(self) -> "RunConfig":
        if self.training.lm_head == "chunked" and self.opd.loss.signal != "logprobs":
            raise ValueError(f"training.lm_head=chunked computes only the sampled token's log-prob, but opd.loss "
                             f"{self.opd.loss.kind} needs the student's full logits: use training.lm_head=full or "
                             "opd.loss=reverse_kl_is")
        return self

    @model_validator(mode="after")
    def _sft_or_pretrained(self) -> "RunConfig":
        if self.sft is None and self.student.path is None:
            raise ValueError("sft: null starts OPD from a trained student: set student.path, or give an sft section "
                             "to warm up the student built from student.model")
        return self

    @model_validator(mode="after")
    def _engine_shares(self) -> "RunConfig":
        """Two in-process vLLM engines on one GPU each take their share of its memory up front."""
        both = self.teacher.scorer == "vllm" and self.opd.sampler == "vllm" and self.device != "cpu"
        total = self.teacher.gpu_memory_utilization + self.opd.gpu_memory_utilization
        if both and total > 0.9:
            raise ValueError(f"opd.gpu_memory_utilization ({self.opd.gpu_memory_utilization}) + "
                             f"teacher.gpu_memory_utilization ({self.teacher.gpu_memory_utilization}) = {total:.2f} of "
                             "one GPU, leaving the trainer under 10%: lower them, or serve the teacher elsewhere "
                             "(teacher.scorer=remote)")
        return self

    @model_validator(mode="after")
    def _lora_strategy(self) -> "RunConfig":
        if self.opd.lora is not None and self.training.strategy == "fsdp" and self.training.num_processes > 1:
            raise ValueError("opd.lora with training.strategy=fsdp is not supported: LoRA students train "
                             "replicated, set training.strategy=ddp")
        return self

    @model_validator(mode="after")
    def _bootstrap_needs_task(self) -> "RunConfig":
        if not self.teacher.trained and self.data.source != "synthetic":
            raise ValueError("teacher.bootstrap trains the demo teacher on the synthetic task's ground truth; "
                             f"data.source={self.data.source!r} is your own data: set teacher.path to a "
                             "trained teacher")
        return self

    @model_validator(mode="after")
    def _built_context(self) -> "RunConfig":
        # models built here get exactly prompt + completion positions (opd.models.build_llama);
        # a pretrained model's own context is checked by preflight from its config.json
        built = [f for f, on in (("student.model", self.student.model is not None),
                                 ("teacher.bootstrap", not self.teacher.trained)) if on]
        need = self.data.max_prompt_tokens + self.opd.max_tokens
        if built and need > MAX_BUILT_CONTEXT:
            raise ValueError(f"data.max_prompt_tokens + opd.max_tokens = {need} tokens, but {' and '.join(built)} "
                             f"build models of at most {MAX_BUILT_CONTEXT} positions: lower opd.max_tokens "
                             "or data.max_prompt_tokens")
        return self

    @model_validator(mode="after")
    def _rollouts(self) -> "RunConfig":
        n = self.opd.prompts_per_step * self.opd.samples_per_prompt
        if n > MAX_BATCH:
            raise ValueError(f"opd.prompts_per_step * opd.samples_per_prompt = {n} rollouts per step (at most "
                             f"{MAX_BATCH}): lower one of them")
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
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"--set {key.strip()}: the value is not valid YAML ({first}); quote it, "
                          "e.g. --set 'tasks.timeout_seconds={sft_warmup: 600}'") from None


def _format_error(err: ValidationError) -> str:
    """One line per problem, each starting with the field's dotted path (named once)."""
    lines = []
    for e in err.errors():
        # a loss's or verifier's own settings are named opd.loss.<key> / task.verifier.<key>, without the
        # union's tag in between
        path = ".".join(str(p) for i, p in enumerate(e["loc"]) if not (i and (
            (e["loc"][i - 1] == "loss" and p in LOSS_KINDS) or (e["loc"][i - 1] == "verifier" and p in VERIFIER_KINDS))))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/demo.yaml for every key)"
        named = not path or msg.startswith((path + ":", path + " ", path + "=", path + "."))
        lines.append(f"  {msg}" if named else f"  {path}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte offset {e.start}); save the config as UTF-8") from None
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
