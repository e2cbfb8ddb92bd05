"""Teacher scorers: the log-prob of every completion token given its prefix, behind one interface.

- ``HFTeacher``: a transformers model in this process (``opd.logprobs.score_completions``).
- ``VLLMTeacher``: an in-process vLLM engine; ``prompt_logprobs=0`` over prompt+completion ids.
- ``RemoteTeacher``: an OpenAI-compatible vLLM server, ``POST /v1/completions`` with token-id
  prompts, ``max_tokens=1`` and vLLM's ``prompt_logprobs=0`` extension.

vLLM with ``skip_tokenizer_init`` does not check token ids: an id >= vocab_size kills the whole
engine (the server then answers every request with 500). Both vLLM scorers therefore check ids
and lengths here, before anything is sent.
"""
from __future__ import annotations

import gc
import json
import math
from pathlib import Path
from typing import Any, Protocol

from opd.errors import PermanentError
from opd.rollouts import TopKScores
from opd.vllm_engine import shutdown_llm, start_llm


class TeacherScorer(Protocol):
    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        """log p(completion[t] | prompt + completion[:t]) for every t, one list per sequence."""
        ...

    def score_topk(self, prompts: list[list[int]], completions: list[list[int]], k: int) -> TopKScores:
        """``score`` plus the teacher's top-k (ids, logprobs) at every completion position."""
        ...

    def complete(self, prompts: list[list[int]], max_tokens: int, eos_id: int, temperature: float = 0.0,
                 seed: int | None = None) -> list[list[int]]:
        """The teacher's own completion of each prompt (ending at and including ``eos_id`` if produced):
        SFT data and the teacher's accuracy, from wherever the teacher runs."""
        ...

    def close(self) -> None: ...


class TeacherInputError(PermanentError, ValueError):
    """Token ids the teacher cannot score (out of vocabulary, too long, no prompt)."""


class TeacherServerError(RuntimeError):
    """The remote teacher could not be reached or answered with an error."""


def _check_inputs(prompts, completions, vocab_size: int | None, max_len: int | None, who: str) -> None:
    if len(prompts) != len(completions):
        raise TeacherInputError(f"{who}: {len(prompts)} prompts but {len(completions)} completions")
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if not c:
            continue
        if not p:
            raise TeacherInputError(f"{who}: sequence {i} has an empty prompt; the first completion token "
                                    "needs at least one token (e.g. BOS) before it")
        if vocab_size is not None:
            bad = [t for t in (*p, *c) if not 0 <= t < vocab_size]
            if bad:
                raise TeacherInputError(f"{who}: sequence {i} holds token id(s) {bad[:5]} outside the teacher's "
                                        f"vocabulary [0, {vocab_size}): teacher and student must share one tokenizer")
        if max_len is not None and len(p) + len(c) + 1 > max_len:
            raise TeacherInputError(f"{who}: sequence {i} is {len(p) + len(c)} tokens; scoring needs "
                                    f"prompt+completion+1 <= max_model_len={max_len}: raise max_model_len "
                                    "or shorten prompts/max_tokens")


def _pick(prompt_logprobs, seq: list[int], start: int) -> list[float]:
    """The logprob of the actual token at positions start.. of seq, from vLLM's prompt_logprobs.

    Offline entries are dicts int -> Logprob; the server's JSON has str keys and {"logprob": x}."""
    if prompt_logprobs is None or len(prompt_logprobs) != len(seq):
        n = None if prompt_logprobs is None else len(prompt_logprobs)
        raise TeacherServerError(f"vLLM returned {n} prompt logprobs for a {len(seq)}-token sequence")
    out = []
    for j in range(start, len(seq)):
        d = prompt_logprobs[j]
        e = d.get(seq[j]) if seq[j] in d else d.get(str(seq[j]))
        if e is None:
            raise TeacherServerError(f"vLLM's prompt logprobs at position {j} lack the actual token {seq[j]}")
        out.append(float(e["logprob"] if isinstance(e, dict) else e.logprob))
    return out


def _pick_topk(prompt_logprobs, seq: list[int], start: int, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """The top-k (by vLLM's rank) ids and logprobs at positions start.. of seq.

    vLLM returns the k most likely tokens (rank 1..k) plus the actual token when it ranks lower."""
    ids, lps = [], []
    for j in range(start, len(seq)):
        top = []
        for key, e in prompt_logprobs[j].items():
            rank, lp = (e["rank"], e["logprob"]) if isinstance(e, dict) else (e.rank, e.logprob)
            if rank is not None and rank <= k:
                top.append((rank, int(key), float(lp)))
        if len(top) < k:
            raise TeacherServerError(f"vLLM returned {len(top)} < {k} top logprobs at position {j}: raise the "
                                     "engine's max_logprobs or lower opd.loss.topk")
        top.sort()
        ids.append([t[1] for t in top[:k]])
        lps.append([t[2] for t in top[:k]])
    return ids, lps


def _config_int(model_dir: str | Path, key: str) -> int | None:
    """An integer field of the model's config.json (or of its text_config), None if absent."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    v = cfg.get(key, (cfg.get("text_config") or {}).get(key))
    return int(v) if v is not None else None


def _config_vocab(model_dir: str | Path) -> int | None:
    return _config_int(model_dir, "vocab_size")


# ---------------------------------------------------------------- transformers

class HFTeacher:
    """``model``: an already loaded teacher to reuse (then ``model_dir`` may be None)."""

    def __init__(self, model_dir: str | None, device=None, micro_batch: int = 64,
                 trust_remote_code: bool = False, model=None, pad_id: int | None = None, dtype: str = "float32"):
        from opd.models import load_model, pick_device

        if model is not None:
            self.model, self.device = model, next(model.parameters()).device
        else:
            self.device = device if hasattr(device, "type") else pick_device(device or "auto")
            self.model = load_model(model_dir, self.device, trust_remote_code=trust_remote_code, dtype=dtype)
        cfg = self.model.config
        self.pad_id = pad_id if pad_id is not None else next(
            (t for t in (cfg.pad_token_id, cfg.eos_token_id, 0) if isinstance(t, int)), 0)
        self.micro_batch = micro_batch
        self.vocab_size = cfg.vocab_size

    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        from opd.logprobs import score_completions

        _check_inputs(prompts, completions, self.vocab_size, None, "hf teacher")
        if not prompts:
            return []
        return score_completions(self.model, prompts, completions, self.pad_id, self.micro_batch, self.device)

    def complete(self, prompts: list[list[int]], max_tokens: int, eos_id: int, temperature: float = 0.0,
                 seed: int | None = None) -> list[list[int]]:
        from opd.generation import generate

        return generate(self.model, prompts, eos_id, self.pad_id, max_tokens, temperature=temperature, seed=seed)

    def score_topk(self, prompts: list[list[int]], completions: list[list[int]], k: int) -> TopKScores:
        from opd.batching import completion_values, pack
        from opd.logprobs import completion_topk

        _check_inputs(prompts, completions, self.vocab_size, None, "hf teacher")
        out = TopKScores([], [], [])
        for s in range(0, len(prompts), self.micro_batch):
            b = pack(prompts[s : s + self.micro_batch], completions[s : s + self.micro_batch], self.pad_id)
            tok, ids, vals = completion_topk(self.model, b.to(self.device), k)
            out.token_logprobs.extend(completion_values(tok, b))
            out.ids.extend(completion_values(ids, b))
            out.logprobs.extend(completion_values(vals, b))
        return out

    def close(self) -> None:
        self.model = None
        gc.collect()


# ---------------------------------------------------------------- vLLM in process

class VLLMTeacher:
    def __init__(self, model_dir: str, max_model_len: int = 256, seed: int = 0, dtype: str = "float32",
                 gpu_memory_utilization: float = 0.5, kv_cache_gib: int = 1, enforce_eager: bool = True,
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1):
        self.model_dir = str(model_dir)
        self.max_model_len = max_model_len
        self.vocab_size = _config_vocab(model_dir)
        # Scoring generates one throwaway token after the sequence, so a sequence as long as the
        # model's context needs one position more; its output is never read. (A teacher built for
        # exactly prompt + max_tokens positions, as the demo bootstrap does, hit vLLM's length check.)
        extra = ({"hf_overrides": {"max_position_embeddings": max_model_len}}
                 if max_model_len == (_config_int(model_dir, "max_position_embeddings") or 0) + 1 else {})
        self.llm = start_llm(self.model_dir, seed=seed, max_model_len=max_model_len, dtype=dtype,
                             gpu_memory_utilization=gpu_memory_utilization, kv_cache_gib=kv_cache_gib,
                             enforce_eager=enforce_eager, trust_remote_code=trust_remote_code,
                             tensor_parallel_size=tensor_parallel_size, **extra)

    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        return self._score(prompts, completions, 0).token_logprobs

    def score_topk(self, prompts: list[list[int]], completions: list[list[int]], k: int) -> TopKScores:
        return self._score(prompts, completions, k)

    def _score(self, prompts: list[list[int]], completions: list[list[int]], k: int) -> TopKScores:
        """One prefill per sequence with ``prompt_logprobs=k`` (0: the actual token only)."""
        from vllm import SamplingParams

        _check_inputs(prompts, completions, self.vocab_size, self.max_model_len, "vllm teacher")
        if self.llm is None:
            raise RuntimeError("VLLMTeacher is closed")
        out = TopKScores([[] for _ in prompts], [[] for _ in prompts], [[] for _ in prompts])
        todo = [i for i, c in enumerate(completions) if c]
        seqs = {i: list(prompts[i]) + list(completions[i]) for i in todo}
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": seqs[i]} for i in todo], params, use_tqdm=False)
        for i, o in zip(todo, outs):
            out.token_logprobs[i] = _pick(o.prompt_logprobs, seqs[i], len(prompts[i]))
            if k:
                out.ids[i], out.logprobs[i] = _pick_topk(o.prompt_logprobs, seqs[i], len(prompts[i]), k)
        return out

    def complete(self, prompts: list[list[int]], max_tokens: int, eos_id: int, temperature: float = 0.0,
                 seed: int | None = None) -> list[list[int]]:
        from vllm import SamplingParams

        if self.llm is None:
            raise RuntimeError("VLLMTeacher is closed")
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, stop_token_ids=[eos_id],
                                 seed=None if seed is None else seed + i, detokenize=False)
                  for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        shutdown_llm(llm)


# ---------------------------------------------------------------- remote vLLM server

# every sampling setting a request leaves out, a vLLM server fills from the served model's generation_config.json
# (`--generation-config auto`, its default): a chat model's top_k/top_p or repetition_penalty would bend the
# teacher's SFT completions and accuracy. Sent explicitly, as the in-process engines' SamplingParams have them
# (top_k -1: "all tokens" on every vLLM version; newer ones also read 0 so)
PLAIN_SAMPLING = {"top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                  "frequency_penalty": 0.0}


class RemoteTeacher:
    """A vLLM OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server --model DIR``;
    ``--skip-tokenizer-init`` is fine since only token ids are sent).

    ``model_dir``, when given, is the teacher checkpoint the caller expects: its vocab_size bounds
    the ids sent, and it is checked against the served model's config when the server's model
    path (``root`` in /v1/models) is readable from here."""

    def __init__(self, endpoint: str, model_name: str | None = None, timeout: float = 300.0,
                 batch_size: int = 64, model_dir: str | None = None, vocab_size: int | None = None):
        import httpx

        self.endpoint = endpoint.rstrip("/")
        if self.endpoint.endswith("/v1"):
            self.endpoint = self.endpoint[:-3]
        self.batch_size = batch_size
        self.client = httpx.Client(base_url=self.endpoint, timeout=timeout)
        models = self._request("GET", "/v1/models")["data"]
        ids = [m["id"] for m in models]
        if model_name is None:
            if len(models) != 1:
                raise TeacherServerError(f"teacher server {self.endpoint} serves {ids}: set teacher.served_model_name")
            model_name = ids[0]
        if model_name not in ids:
            raise TeacherServerError(f"teacher server {self.endpoint} does not serve {model_name!r} (it serves {ids}): "
                                     "fix teacher.served_model_name or the server's --served-model-name")
        info = models[ids.index(model_name)]
        self.model_name = model_name
        self.max_model_len = info.get("max_model_len")
        served_vocab = _config_vocab(info["root"]) if info.get("root") else None
        local_vocab = vocab_size if vocab_size is not None else (_config_vocab(model_dir) if model_dir else None)
        if local_vocab is not None and served_vocab is not None and local_vocab != served_vocab:
            raise TeacherInputError(f"teacher server {self.endpoint} serves {info.get('root')} with vocab_size "
                                    f"{served_vocab}, but the teacher here has {local_vocab}: serve the same teacher")
        self.vocab_size = local_vocab if local_vocab is not None else served_vocab

    def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        import httpx

        url = self.endpoint + path
        try:
            r = self.client.request(method, path, json=body)
        except httpx.TimeoutException as e:
            raise TeacherServerError(f"teacher server timed out on {method} {url} ({e!r}): raise the timeout "
                                     "or send smaller batches") from None
        except httpx.HTTPError as e:
            raise TeacherServerError(f"cannot reach the teacher server at {url} ({e!r}): start it (python -m "
                                     "vllm.entrypoints.openai.api_server --model DIR --host H --port P) or fix "
                                     "teacher.endpoint") from None
        if r.status_code != 200:
            try:
                msg = r.json()["error"]["message"]
            except Exception:  # noqa: BLE001 - not vLLM's JSON error body
                msg = r.text[:500]
            hint = " (the engine may have died: check the server's log and restart it)" if r.status_code >= 500 else ""
            raise TeacherServerError(f"teacher server {method} {url} -> HTTP {r.status_code}: {msg}{hint}")
        try:
            return r.json()
        except ValueError:
            raise TeacherServerError(f"teacher server {method} {url} answered non-JSON: {r.text[:200]!r}") from None

    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        return self._score(prompts, completions, 0).token_logprobs

    def score_topk(self, prompts: list[list[int]], completions: list[list[int]], k: int) -> TopKScores:
        return self._score(prompts, completions, k)

    def _score(self, prompts: list[list[int]], completions: list[list[int]], k: int) -> TopKScores:
        _check_inputs(prompts, completions, self.vocab_size, self.max_model_len, "remote teacher")
        todo = [i for i, c in enumerate(completions) if c]
        out = TopKScores([[] for _ in prompts], [[] for _ in prompts], [[] for _ in prompts])
        unclamp = lambda v: -math.inf if v <= -9999.0 else v  # noqa: E731 - the server clamps -inf to -9999.0
        for s in range(0, len(todo), self.batch_size):
            chunk = todo[s : s + self.batch_size]
            seqs = [list(prompts[i]) + list(completions[i]) for i in chunk]
            # max_tokens=0 is refused without echo, and echo needs the server's tokenizer: generate 1 token.
            body = {"model": self.model_name, "prompt": seqs, "max_tokens": 1, "prompt_logprobs": k,
                    "temperature": 1.0, "n": 1, "add_special_tokens": False, **PLAIN_SAMPLING}
            choices = sorted(self._request("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
            if len(choices) != len(seqs):
                raise TeacherServerError(f"teacher server returned {len(choices)} choices for {len(seqs)} prompts")
            for i, seq, ch in zip(chunk, seqs, choices):
                out.token_logprobs[i] = [unclamp(v) for v in _pick(ch.get("prompt_logprobs"), seq, len(prompts[i]))]
                if k:
                    ids, lps = _pick_topk(ch["prompt_logprobs"], seq, len(prompts[i]), k)
                    out.ids[i], out.logprobs[i] = ids, [[unclamp(v) for v in row] for row in lps]
        return out

    def complete(self, prompts: list[list[int]], max_tokens: int, eos_id: int, temperature: float = 0.0,
                 seed: int | None = None) -> list[list[int]]:
        """Token ids in, token ids out (``return_token_ids``): the server needs no tokenizer.

        Sampled with a seed, each prompt is its own request with seed + its index, as the in-process
        engines seed them: one request for a batch applies one seed to every prompt in it, so all of
        them would draw from the same random stream (identical prompts, identical completions)."""
        def post(chunk: list[list[int]], chunk_seed: int | None) -> list[list[int]]:
            body = {"model": self.model_name, "prompt": chunk, "max_tokens": max_tokens, "temperature": temperature,
                    "n": 1, "stop_token_ids": [eos_id], "return_token_ids": True, "add_special_tokens": False,
                    **PLAIN_SAMPLING, **({} if chunk_seed is None else {"seed": chunk_seed})}
            choices = sorted(self._request("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
            if len(choices) != len(chunk) or any(c.get("token_ids") is None for c in choices):
                raise TeacherServerError(f"teacher server {self.endpoint} did not return token ids for {len(chunk)} "
                                         "prompts: it needs vLLM's return_token_ids (vLLM >= 0.10)")
            return [list(c["token_ids"]) for c in choices]

        prompts = [list(p) for p in prompts]
        if seed is not None and temperature > 0:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(16, self.batch_size)) as pool:  # the server batches them
                return [c for done in pool.map(lambda i: post([prompts[i]], seed + i), range(len(prompts)))
                        for c in done]
        return [c for s in range(0, len(prompts), self.batch_size)
                for c in post(prompts[s : s + self.batch_size], None if seed is None else seed + s)]

    def close(self) -> None:
        client, self.client = getattr(self, "client", None), None
        if client is not None:
            client.close()


# ---------------------------------------------------------------- factory

def make_teacher(kind: str, model_dir: str | None = None, *, device: str | None = None, micro_batch: int = 64,
                 max_model_len: int = 256, seed: int = 0, endpoint: str | None = None,
                 served_model_name: str | None = None, timeout: float = 300.0,
                 trust_remote_code: bool = False, model=None, pad_id: int | None = None,
                 gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1, dtype: str = "float32",
                 enforce_eager: bool = True) -> TeacherScorer:
    """Chosen by config (teacher.scorer), never silently: an unknown kind is an error.

    ``model``/``pad_id`` (hf only): reuse a teacher already loaded in this process."""
    if kind == "hf":
        return HFTeacher(model_dir, device=device, micro_batch=micro_batch, trust_remote_code=trust_remote_code,
                         model=model, pad_id=pad_id)
    if kind == "vllm":
        return VLLMTeacher(model_dir, max_model_len=max_model_len, seed=seed, trust_remote_code=trust_remote_code,
                           gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                           dtype=dtype, enforce_eager=enforce_eager)
    if kind == "remote":
        if not endpoint:
            raise ValueError("teacher.scorer='remote' needs teacher.endpoint (e.g. http://127.0.0.1:8000)")
        return RemoteTeacher(endpoint, served_model_name, timeout=timeout, batch_size=micro_batch,
                             model_dir=model_dir)
    raise ValueError(f"teacher.scorer={kind!r}: choose 'hf', 'vllm' or 'remote'")
