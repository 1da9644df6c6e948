"""The default model on the GPU (CUDA kernels, SDPA prefill) answers greedily exactly as on the CPU."""

from __future__ import annotations

import pytest
import torch

from strata.engine.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.request import Request
from strata.engine.sampling_params import SamplingParams
from strata.kernels import cuda_ext

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion to a child.",
           "List three uses of a paperclip. " * 40]  # the last: a context over one attention partition


def engine_on(device: str, monkeypatch: pytest.MonkeyPatch, **kw) -> LLMEngine:
    monkeypatch.setenv("STRATA_DEVICE", device)
    return LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.25, session_cache=False, **kw))


def greedy_all(engine: LLMEngine, prompts: list[list[int]], n: int = 32) -> list[list[int]]:
    """All prompts in one batch (decode rows of several sequences in one kernel launch)."""
    for i, ids in enumerate(prompts):
        engine.add_request(Request(str(i), ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)))
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_work():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return [out[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("chunk", [1024, 64], ids=["whole-prefill", "chunked-prefill"])
def test_greedy_32_tokens_on_gpu_equal_cpu(monkeypatch, chunk):
    cpu = engine_on("cpu", monkeypatch, max_num_batched_tokens=chunk)
    ids = [cpu.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    want = greedy_all(cpu, ids)
    gpu = engine_on("cuda", monkeypatch, max_num_batched_tokens=chunk)
    assert gpu.pool.kv.is_cuda and gpu.model.device.type == "cuda"
    assert cuda_ext.extension() is not None, "the CUDA kernels did not build or load"
    got = greedy_all(gpu, ids)
    assert all(len(t) == 32 for t in got)
    assert got == want
