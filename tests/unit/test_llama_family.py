"""The Llama-family attention options of a Transformer section (grouped-query attention, Llama 3's
RoPE scaling, q/k/v biases, per-head q/k RMSNorm) against HF transformers' own Llama, Qwen2 and Qwen3
decoders as the oracle: the same weights give the same hidden states, and the cached step the same
values as the forward."""

from __future__ import annotations

import pytest
import torch

from blt.config import config_from_dict
from blt.generation.kv_cache import KVCache
from blt.model.layers import Transformer

transformers = pytest.importorskip("transformers")

LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
COMMON = dict(
    vocab_size=16,
    hidden_size=32,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    rms_norm_eps=1e-5,
    max_position_embeddings=128,
)
CASES = {  # HF model class, its config, our section's options
    "llama3 scaling, grouped": (
        "LlamaModel",
        transformers.LlamaConfig(
            **COMMON, num_key_value_heads=2, rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, **LLAMA3}
        ),
        {"kv_heads": 2, "rope_scaling": LLAMA3},
    ),
    "qwen2 biases, multi-query": (
        "Qwen2Model",
        transformers.Qwen2Config(**COMMON, num_key_value_heads=1, rope_parameters={"rope_theta": 500.0}),
        {"kv_heads": 1, "qkv_bias": True},
    ),
    "qwen3 q/k norm, grouped": (
        "Qwen3Model",
        transformers.Qwen3Config(
            **COMMON, num_key_value_heads=2, head_dim=8, attention_bias=False, rope_parameters={"rope_theta": 500.0}
        ),
        {"kv_heads": 2, "qk_norm": True},
    ),
}


def pair(case: str, drop: str | None = None) -> tuple:
    """The HF decoder with random weights and our Transformer section holding them (`drop`: an option
    left out of ours, for the check that it matters)."""
    cls, hf_cfg, options = CASES[case]
    torch.manual_seed(0)
    hf = getattr(transformers, cls)(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    section = {"dim": 32, "layers": 2, "heads": 4, "ffn_mult": 3.0, **{k: v for k, v in options.items() if k != drop}}
    cfg = config_from_dict({"model": {"global_model": section}}).model.global_model
    ours = Transformer(cfg, 1e-5, 500.0).eval()
    state = {k: v for k, v in hf.state_dict().items() if k.startswith("layers.")}
    ours.load_state_dict(state, strict=True)
    return hf, ours


@pytest.mark.parametrize("case", list(CASES))
def test_a_section_equals_hf_llama_qwen2_and_qwen3(case):
    hf, ours = pair(case)
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        want = hf(inputs_embeds=x).last_hidden_state
        got = hf.norm(ours(x))
        assert (got - want).abs().max() <= 1e-4
        # the cached step, two chunks and then byte by byte, gives the forward's values
        cache = KVCache.for_transformer(ours, batch=2, capacity=40)
        steps = [ours.step(x[:, :17], cache), ours.step(x[:, 17:30], cache)]
        steps += [ours.step(x[:, t : t + 1], cache) for t in range(30, 40)]
        assert (hf.norm(torch.cat(steps, 1)) - want).abs().max() <= 1e-4
        assert cache.k.shape[2] == (ours.layers[0].self_attn.kv_heads)


def test_each_option_matters():
    """Without Llama 3's scaling the same weights give other states (the oracle test can fail); biases
    and q/k norms are weights: a section without them refuses HF's state."""
    hf, ours = pair("llama3 scaling, grouped", drop="rope_scaling")
    x = torch.randn(1, 40, 32)
    with torch.no_grad():
        assert (hf.norm(ours(x)) - hf(inputs_embeds=x).last_hidden_state).abs().max() > 1e-2
    for case, option, key in (
        ("qwen2 biases, multi-query", "qkv_bias", "bias"),
        ("qwen3 q/k norm, grouped", "qk_norm", "q_norm"),
    ):
        with pytest.raises(RuntimeError, match=key):
            pair(case, drop=option)


def test_a_blt_with_the_options_in_its_sections_generates_cached_as_uncached():
    """Biases and q/k norms in the local encoder and decoder, Llama 3 scaling with grouped-query
    attention in the global model: the model's one `step` serves cached generation."""
    from blt.generation import Generator
    from blt.model import build_model
    from blt.patching import Patcher

    from random_models import BLT

    cfg = config_from_dict(
        {
            "model": {
                **BLT,
                "encoder": {**BLT["encoder"], "qkv_bias": True, "qk_norm": True},
                "global_model": {**BLT["global_model"], "heads": 4, "kv_heads": 2, "rope_scaling": LLAMA3},
                "decoder": {**BLT["decoder"], "qk_norm": True},
            },
            "patching": {"mode": "static", "patch_size": 3},
        }
    )
    torch.manual_seed(0)
    gen = Generator(build_model(cfg.model).eval(), Patcher(cfg.patching), 64)
    prompts = ["The cat sat on", "", "d"]
    cached = gen.generate(prompts, max_bytes=40, temperature=0)
    assert cached == gen.generate(prompts, max_bytes=40, temperature=0, cache=False)
    assert sum(map(len, cached)) > 60


def test_bad_rope_scaling_is_refused_in_one_line():
    from blt.config import check_config
    from blt.errors import ConfigError

    bad = {"factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}
    with pytest.raises(ConfigError) as e:
        check_config(config_from_dict({"model": {"decoder": {"rope_scaling": bad}}}))
    assert "model.decoder.rope_scaling.high_freq_factor (1.0) must be above low_freq_factor (4.0)" in str(e.value)


def test_a_new_model_starts_its_biases_at_zero():
    from blt.model import build_model

    cfg = config_from_dict({"model": {"global_model": {"qkv_bias": True}, "encoder": {"qkv_bias": True}}})
    biases = {n: p for n, p in build_model(cfg.model).named_parameters() if n.endswith("bias")}
    assert len(biases) == 3 * (cfg.model.global_model.layers + cfg.model.encoder.layers)
    assert all(not p.any() for p in biases.values())
