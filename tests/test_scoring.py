"""Teacher scorers (opd.teachers) agree per token: transformers, in-process vLLM, and a vLLM server."""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from opd.config import ModelSpec  # noqa: E402
from opd.models import build_char_tokenizer, build_llama, save_model  # noqa: E402
from opd.teachers import (HFTeacher, RemoteTeacher, TeacherInputError, TeacherServerError,  # noqa: E402
                          VLLMTeacher, make_teacher)

MAX_LEN = 64
TOL = 1e-3
SERVED = "tiny-teacher"

# ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>, 4.. the task's characters
PROMPTS = [[1, 5, 6, 7], [1, 4], [1, 9, 9, 10, 11, 12, 13], [1, 17, 16], [1, 8, 8, 8], [1]]
COMPLETIONS = [[8, 9, 10, 2], [4, 4, 5, 6, 7, 8, 9, 10, 11, 12, 2], [14], [], [15, 2, 2, 3], [6, 7, 2]]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tok = build_char_tokenizer()
    model = build_llama(ModelSpec(num_layers=2, hidden_size=128, num_heads=2, intermediate_size=256), tok,
                        max_positions=MAX_LEN, seed=0)
    with torch.no_grad():  # sharpen: near-uniform logprobs would hide position/offset bugs
        model.lm_head.weight.mul_(20.0)
    path = save_model(model, tok, tmp_path_factory.mktemp("teacher"))
    # what a chat model ships (Qwen2.5-Instruct: repetition_penalty 1.05, top_k 20), made strong: transformers
    # and a vLLM server fill whatever a call leaves out from it; no scorer may let it bend completions or scores
    gc = json.loads((path / "generation_config.json").read_text())
    gc.update(repetition_penalty=5.0, no_repeat_ngram_size=1, top_k=1, top_p=0.5, do_sample=True, temperature=0.1)
    (path / "generation_config.json").write_text(json.dumps(gc))
    return str(path)


@pytest.fixture(scope="module")
def hf_scores(teacher_dir):
    t = HFTeacher(teacher_dir, device="cpu", micro_batch=4)
    yield t.score(PROMPTS, COMPLETIONS)
    t.close()


@pytest.fixture(scope="module")
def vllm_teacher(teacher_dir):
    t = VLLMTeacher(teacher_dir, max_model_len=MAX_LEN)
    yield t
    t.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(teacher_dir, tmp_path_factory):
    """A real OpenAI-compatible vLLM server on 127.0.0.1, killed (whole process group) at the end.

    `python -m vllm.entrypoints.openai.api_server`, not the `vllm` console script: on vllm-cpu the
    script dies at start looking up the version of a distribution named "vllm"."""
    import httpx

    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", teacher_dir,
           "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", str(MAX_LEN), "--enforce-eager", "--skip-tokenizer-init"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm server not healthy after 240 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max((abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)), default=0.0)


def test_hf_scores_shape(hf_scores):
    assert [len(s) for s in hf_scores] == [len(c) for c in COMPLETIONS]
    flat = [v for s in hf_scores for v in s]
    assert all(v <= 0 for v in flat)
    assert min(flat) < -3.0  # sharpened: far from uniform (log 1/18 = -2.89)


def test_vllm_matches_hf(vllm_teacher, hf_scores):
    got = vllm_teacher.score(PROMPTS, COMPLETIONS)
    diff = _max_abs_diff(got, hf_scores)
    print(f"max |vllm - hf| = {diff:.3g}")
    assert diff < TOL


def test_vllm_tensor_parallel_matches_hf(teacher_dir, hf_scores):
    """teacher.tensor_parallel_size=2: the teacher's heads split over two vLLM workers, same logprobs."""
    t = VLLMTeacher(teacher_dir, max_model_len=MAX_LEN, tensor_parallel_size=2)
    try:
        diff = _max_abs_diff(t.score(PROMPTS, COMPLETIONS), hf_scores)
    finally:
        t.close()
    print(f"TP=2: max |vllm - hf| = {diff:.3g}")
    assert diff < TOL


def test_vllm_rejects_bad_ids_without_killing_engine(vllm_teacher, hf_scores):
    # an id >= vocab_size would kill the engine (vLLM does not check ids with skip_tokenizer_init)
    with pytest.raises(TeacherInputError, match="outside the teacher's vocabulary"):
        vllm_teacher.score([[1, 5]], [[6, 99]])
    with pytest.raises(TeacherInputError, match="max_model_len"):
        vllm_teacher.score([[1] * 40], [[5] * 30])
    with pytest.raises(TeacherInputError, match="empty prompt"):
        vllm_teacher.score([[]], [[5]])
    assert _max_abs_diff(vllm_teacher.score(PROMPTS[:1], COMPLETIONS[:1]), hf_scores[:1]) < TOL


def test_remote_matches_hf(vllm_server, hf_scores, teacher_dir):
    t = make_teacher("remote", teacher_dir, endpoint=vllm_server, micro_batch=4)  # 2 requests
    try:
        assert t.model_name == SERVED and t.vocab_size == 18 and t.max_model_len == MAX_LEN
        got = t.score(PROMPTS, COMPLETIONS)
    finally:
        t.close()
    diff = _max_abs_diff(got, hf_scores)
    print(f"max |remote - hf| = {diff:.3g}")
    assert diff < TOL


K = 5


def _check_topk(got, ref, who):
    """Same top-k ids in the same order, logprobs and sampled-token logprobs within TOL."""
    assert [len(x) for x in got.ids] == [len(c) for c in COMPLETIONS], who
    assert got.ids == ref.ids, who
    d = max((abs(a - b) for sa, sb in zip(got.logprobs, ref.logprobs) for ra, rb in zip(sa, sb)
             for a, b in zip(ra, rb)), default=0.0)
    assert d < TOL and _max_abs_diff(got.token_logprobs, ref.token_logprobs) < TOL, (who, d)
    return d


@pytest.fixture(scope="module")
def hf_topk(teacher_dir, hf_scores):
    t = HFTeacher(teacher_dir, device="cpu", micro_batch=4)
    ref = t.score_topk(PROMPTS, COMPLETIONS, K)
    t.close()
    assert _max_abs_diff(ref.token_logprobs, hf_scores) < 1e-6
    assert all(row == sorted(row, reverse=True) and len(row) == K for seq in ref.logprobs for row in seq)
    return ref


def test_topk_agrees_across_scorers(vllm_teacher, vllm_server, teacher_dir, hf_topk):
    """prompt_logprobs=k from the engine and from the server give transformers' top-k."""
    d_vllm = _check_topk(vllm_teacher.score_topk(PROMPTS, COMPLETIONS, K), hf_topk, "vllm")
    t = make_teacher("remote", teacher_dir, endpoint=vllm_server, micro_batch=4)
    try:
        d_remote = _check_topk(t.score_topk(PROMPTS, COMPLETIONS, K), hf_topk, "remote")
    finally:
        t.close()
    print(f"top-{K}: max |vllm - hf| = {d_vllm:.3g}, max |remote - hf| = {d_remote:.3g}")


def test_topk_loss_from_scorer_equals_teacher_forward(teacher_dir, hf_topk):
    """reverse_kl_topk fed a scorer's top-k gives the same loss and update as running the teacher."""
    from opd.config import ReverseKLTopK
    from opd.learner import learn_step
    from opd.logprobs import score_completions
    from opd.models import load_model
    from opd.rollouts import Rollout, TrainBatch
    from opd.trainer import StudentTrainer

    keep = [i for i, c in enumerate(COMPLETIONS) if c]
    student = build_llama(ModelSpec(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=128),
                          build_char_tokenizer(), max_positions=MAX_LEN, seed=3)
    lps = score_completions(student, [PROMPTS[i] for i in keep], [COMPLETIONS[i] for i in keep], 0)
    rollouts = [Rollout(j, PROMPTS[i], COMPLETIONS[i], lp, False) for j, (i, lp) in enumerate(zip(keep, lps))]
    topk = type(hf_topk)(*[[getattr(hf_topk, f)[i] for i in keep] for f in ("token_logprobs", "ids", "logprobs")])
    out = []
    spec = ReverseKLTopK(topk=K)
    for batch, teacher in ((TrainBatch(rollouts), load_model(teacher_dir)), (TrainBatch(rollouts, teacher_topk=topk), None)):
        model = copy.deepcopy(student)
        # SGD: the update is lr x the gradient; AdamW's first step would magnify float noise on near-zero
        # gradients (the teacher's forward runs on other micro-batch shapes than the scorer's) to ~lr
        trainer = StudentTrainer(model, 1e-2, optimizer=torch.optim.SGD(model.parameters(), lr=1e-2))
        m = learn_step(trainer, batch, spec, 0, micro_batch=3, teacher_model=teacher)
        out.append((m, model))
    (a, ma), (b, mb) = out
    assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    assert max(float((p - q).detach().abs().max()) for p, q in zip(ma.parameters(), mb.parameters())) < 1e-6
    assert b["reverse_kl"] == pytest.approx(sum(x - y for sl, tl in zip(lps, topk.token_logprobs)
                                                 for x, y in zip(sl, tl)) / sum(map(len, lps)), abs=1e-4)


def test_remote_errors(vllm_server, teacher_dir):
    with pytest.raises(TeacherServerError, match="does not serve 'nope'"):
        RemoteTeacher(vllm_server, "nope")
    t = RemoteTeacher(vllm_server, timeout=60)  # the only served model is picked
    try:
        with pytest.raises(TeacherInputError, match="vocabulary"):
            t.score([[1, 5]], [[6, 99]])
        assert len(t.score([[1, 5]], [[6, 7]])[0]) == 2  # the server is still alive
    finally:
        t.close()


def test_remote_unreachable():
    port = _free_port()  # nothing listens there
    with pytest.raises(TeacherServerError, match="cannot reach the teacher server"):
        RemoteTeacher(f"http://127.0.0.1:{port}", timeout=5)


def test_teacher_config_scorer():
    from opd.config import TeacherConfig

    assert TeacherConfig(path="x").scorer == "hf"
    with pytest.raises(ValueError, match="needs teacher.endpoint"):
        TeacherConfig(path="x", scorer="remote")
    with pytest.raises(ValueError, match="http"):
        TeacherConfig(path="x", scorer="remote", endpoint="127.0.0.1:8000")
    cfg = TeacherConfig(path="x", scorer="remote", endpoint="http://127.0.0.1:8000", served_model_name="t")
    assert cfg.endpoint == "http://127.0.0.1:8000"
    with pytest.raises(ValueError, match="choose 'hf', 'vllm' or 'remote'"):
        make_teacher("onnx", "x")


def test_hf_teacher_reuses_loaded_model(teacher_dir, hf_scores):
    from opd.models import load_model

    model = load_model(teacher_dir)
    t = make_teacher("hf", None, model=model, pad_id=0)
    assert t.model is model
    # other micro-batches than the fixture's (4): the same maths, BLAS may block it differently
    assert _max_abs_diff(t.score(PROMPTS, COMPLETIONS), hf_scores) < 1e-5


def test_vllm_teacher_scores_a_sequence_as_long_as_its_context(tmp_path):
    """The demo bootstrap builds its teacher for exactly prompt + max_tokens positions, while vLLM
    scoring generates one throwaway token after the sequence (max_model_len = that + 1). A
    full-length sequence must still be graded, and as transformers grades it."""
    tok = build_char_tokenizer()
    n = 12
    model = build_llama(ModelSpec(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=128), tok,
                        max_positions=n, seed=5)
    path = save_model(model, tok, tmp_path / "short-context")
    prompt, completion = [1, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 2]
    assert len(prompt) + len(completion) == n
    ref = HFTeacher(str(path), device="cpu").score([prompt], [completion])
    t = VLLMTeacher(str(path), max_model_len=n + 1)
    try:
        assert _max_abs_diff(t.score([prompt], [completion]), ref) < TOL
    finally:
        t.close()


def test_every_scorer_writes_the_same_greedy_completions(teacher_dir, vllm_teacher, vllm_server):
    """SFT data and the teacher's accuracy come from wherever the teacher runs: transformers here, the
    in-process engine, or the server (token ids both ways: the server needs no tokenizer)."""
    eos = 2
    hf = HFTeacher(teacher_dir, device="cpu", micro_batch=4, pad_id=0).complete(PROMPTS, 8, eos)
    assert all(0 < len(c) <= 8 for c in hf) and any(c[-1] == eos or len(c) == 8 for c in hf)
    assert vllm_teacher.complete(PROMPTS, 8, eos) == hf
    remote = RemoteTeacher(vllm_server, SERVED, model_dir=teacher_dir, batch_size=4)
    try:
        assert remote.complete(PROMPTS, 8, eos) == hf
    finally:
        remote.close()


def test_a_served_teacher_samples_each_prompt_with_its_own_seed(vllm_server, teacher_dir):
    """SFT data at temperature > 0 from a server: the same prompt 32 times gives different completions
    (one seed for a whole batch would give 32 copies), and the same seed gives the same data again."""
    remote = RemoteTeacher(vllm_server, SERVED, model_dir=teacher_dir, batch_size=8)
    try:
        # the server's highest temperature, against the fixture's x20 sharpening
        a = remote.complete([PROMPTS[0]] * 32, 8, eos_id=2, temperature=2.0, seed=11)
        assert len({tuple(c) for c in a}) > 1, a
        assert remote.complete([PROMPTS[0]] * 32, 8, eos_id=2, temperature=2.0, seed=11) == a
    finally:
        remote.close()
