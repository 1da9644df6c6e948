"""Model families beyond Llama, each against transformers on the same random weights, and the refusal of what
strata does not serve. Random-weight models of each family's real shape (explicit head_dim, q/k norms), saved
as Hugging Face directories with the default model's tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch

from strata.engine.models.llama import LlamaModel
from strata.engine.models.registry import UnsupportedModel, family_of_config
from strata.engine.weights.quality import log_probs
from tests.conftest import ServerProcess

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def qwen3_dir(root: Path, model_files) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      initializer_range=0.1,  # sharp enough that a missing piece shows in the logits
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,  # not hidden / heads
                      max_position_embeddings=4096, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # visible q/k norms: ones would hide a missing one
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    out = root / "qwen3-random"
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (model_files.directory / name).exists():
            shutil.copy(model_files.directory / name, out / name)
    return out


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, model_files) -> Path:
    return qwen3_dir(tmp_path_factory.mktemp("families"), model_files)


def random_dir(root: Path, model_files, name: str) -> Path:
    """A random model of another family's real shape, saved as a Hugging Face directory."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=160, num_attention_heads=4, initializer_range=0.1,
                  num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                  eos_token_id=2)
    if name == "smollm3":  # no RoPE on every fourth layer
        cfg = transformers.SmolLM3Config(**common, num_hidden_layers=4, max_position_embeddings=4096, pad_token_id=0,
                                         rope_theta=50_000.0)
        model = transformers.SmolLM3ForCausalLM(cfg)
    elif name == "mistral-swa":  # a sliding window (64) far shorter than the prompts
        cfg = transformers.MistralConfig(**common, num_hidden_layers=3, max_position_embeddings=4096,
                                         sliding_window=64, head_dim=16)
        model = transformers.MistralForCausalLM(cfg)
    elif name == "gemma3":  # 5 local (window 64, base 10k) : 1 global layers, sandwich norms, GeLU-tanh...
        cfg = transformers.Gemma3TextConfig(**common, num_hidden_layers=6, max_position_embeddings=4096, head_dim=32,
                                            sliding_window=64, query_pre_attn_scalar=24)
        model = transformers.Gemma3ForCausalLM(cfg)
        with torch.no_grad():  # visible (1 + w) norms: zeros would hide a missing offset
            for name_, p in model.named_parameters():
                if "norm" in name_:
                    p.uniform_(-0.5, 0.5)
    elif name == "qwen2":  # q/k/v biases
        cfg = transformers.Qwen2Config(**common, num_hidden_layers=3, max_position_embeddings=4096,
                                       rope_theta=1_000_000.0)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # visible biases: zeros would hide a missing one
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.uniform_(-0.5, 0.5)
    elif name == "phi4-mini":  # fused qkv/gate_up, 3/4 of each head rotated, LongRoPE (long factors past 64)
        cfg = transformers.Phi3Config(**common, num_hidden_layers=3, max_position_embeddings=4096,
                                      original_max_position_embeddings=64, partial_rotary_factor=0.75,
                                      rope_parameters={"rope_type": "longrope", "rope_theta": 10_000.0,
                                                       "partial_rotary_factor": 0.75,
                                                       "long_factor": [1.0, 2.0, 5.0, 13.0, 30.0, 80.0],
                                                       "short_factor": [1.0, 1.1, 1.3, 1.7, 2.2, 3.0]},
                                      sliding_window=None, pad_token_id=0)
        model = transformers.Phi3ForCausalLM(cfg)
    elif name == "phi3-swa":  # Phi-3-mini's shape: full rotary, no scaling, a sliding window
        cfg = transformers.Phi3Config(**common, num_hidden_layers=3, max_position_embeddings=4096,
                                      sliding_window=64, pad_token_id=0)
        model = transformers.Phi3ForCausalLM(cfg)
    else:  # Llama 3.x: llama3 rope scaling (it must be applied, not only parsed)
        cfg = transformers.LlamaConfig(**common, num_hidden_layers=3, max_position_embeddings=8192,
                                       rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0,
                                                        "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 256})
        model = transformers.LlamaForCausalLM(cfg)
    out = root / name
    model.eval().save_pretrained(out)
    for f in TOKENIZER_FILES:
        if (model_files.directory / f).exists():
            shutil.copy(model_files.directory / f, out / f)
    return out


@pytest.mark.parametrize("name", ["smollm3", "llama3-scaled", "qwen2", "mistral-swa", "gemma3", "phi4-mini",
                                  "phi3-swa"])
def test_other_families_logits_match_transformers(tmp_path, model_files, name):
    from transformers import AutoModelForCausalLM

    directory = random_dir(tmp_path, model_files, name)
    ids = [int(t) for t in torch.randint(3, 49152, (600,), generator=torch.Generator().manual_seed(2))]
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)
    model = LlamaModel.load(directory, torch.float32, "cpu")
    if name == "smollm3":
        assert model.cfg.rope_layers == (True, True, True, False)
    elif name == "qwen2":
        assert model.cfg.attention_bias
    elif name == "mistral-swa":
        assert model.cfg.layer_windows == (64, 64, 64)
    elif name == "gemma3":
        assert model.cfg.layer_windows == (64,) * 5 + (None,) and model.cfg.local_rope_theta == 10_000.0
    elif name == "phi4-mini":
        assert model.cfg.rotary_dim == 12 and model.cfg.rope_scaling["rope_type"] == "longrope"
    elif name == "phi3-swa":
        assert model.cfg.fused_projections and model.cfg.layer_windows == (64, 64, 64)
    else:
        assert model.cfg.rope_scaling is not None and model.cfg.rope_scaling["rope_type"] == "llama3"
    err = (log_probs(model, ids) - want).abs().max().item()
    assert err < 1e-3, f"max |log-prob difference| {err}"


def test_qwen3_logits_match_transformers(qwen3):
    from transformers import AutoModelForCausalLM

    ids = [int(t) for t in torch.randint(3, 49152, (300,), generator=torch.Generator().manual_seed(1))]
    ref = AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)
    model = LlamaModel.load(qwen3, torch.float32, "cpu")
    assert model.cfg.family == "qwen3" and model.cfg.qk_norm and model.cfg.head_dim == 32
    got = log_probs(model, ids)
    err = (got - want).abs().max().item()
    assert err < 1e-3, f"max |log-prob difference| {err}"  # float32, 300 positions, 3 layers


def test_qwen3_greedy_through_the_server_equals_transformers_generate(qwen3, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.float32).eval()
    prompt = list(range(100, 160))
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    want = out[0, len(prompt):].tolist()
    srv = ServerProcess("--model", str(qwen3), "--kv-cache-gb", "0.05", log=tmp_path / "server.log")
    try:
        srv.wait_ready()
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        r = c.completions.create(model=c.models.list().data[0].id, prompt=prompt, max_tokens=24, temperature=0,
                                 extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 24
        assert r.choices[0].text == ref_text(qwen3, want)
    finally:
        srv.stop()


@pytest.mark.parametrize("name", ["mistral-swa", "gemma3", "phi4-mini", "phi3-swa", "smollm3", "qwen2",
                                  "llama3-scaled"])
def test_greedy_through_the_server_equals_transformers_generate(tmp_path, model_files, name):
    """Prompt and generation well past the windows (and Phi-4-mini's original context): prefill in chunks with
    history and decode, through the server, give transformers' tokens."""
    from transformers import AutoModelForCausalLM

    directory = random_dir(tmp_path, model_files, name)
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    prompt = [int(t) for t in torch.randint(3, 49152, (150,), generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    want = out[0, len(prompt):].tolist()
    srv = ServerProcess("--model", str(directory), "--kv-cache-gb", "0.05", "--max-num-batched-tokens", "64",
                        log=tmp_path / "server.log")  # prefill in chunks: the later ones attend to history
    try:
        srv.wait_ready()
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        r = c.completions.create(model=c.models.list().data[0].id, prompt=prompt, max_tokens=40, temperature=0,
                                 extra_body={"ignore_eos": True})
        assert r.choices[0].text == ref_text(directory, want)
    finally:
        srv.stop()


def ref_text(model_dir: Path, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("config", [
    {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"},
    {"architectures": ["PhiForCausalLM"], "model_type": "phi"},
    {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": True,
     "max_position_embeddings": 32768, "num_hidden_layers": 2},
    {"model_type": "mamba"},
])
def test_unsupported_architectures_are_refused_by_name(config):
    with pytest.raises(UnsupportedModel) as e:
        family_of_config(config)
    message = str(e.value)
    assert "LlamaForCausalLM" in message or "sliding" in message
    for arch in config.get("architectures", []):
        if "sliding_window" not in config:
            assert arch in message


def test_the_server_refuses_an_unsupported_directory_and_exits_non_zero(tmp_path, qwen3):
    bad = tmp_path / "phi2"
    shutil.copytree(qwen3, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["PhiForCausalLM"],
                                                 "model_type": "phi"}))
    r = subprocess.run([sys.executable, "-m", "strata", "serve", "--model", str(bad), "--port", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "PhiForCausalLM" in r.stderr and "Qwen3ForCausalLM" in r.stderr


def test_a_failed_model_load_exits_non_zero(tmp_path, qwen3):
    broken = tmp_path / "broken"
    shutil.copytree(qwen3, broken)
    for f in broken.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    srv = ServerProcess("--model", str(broken), "--kv-cache-gb", "0.05", log=tmp_path / "server.log")
    assert srv.proc.wait(120) != 0
    assert "loading the model failed" in srv.log_tail()
