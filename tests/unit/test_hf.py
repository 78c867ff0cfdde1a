"""Our hf_compat BLT and HF transformers' BltForCausalLM give the same logits (fp32, <= 1e-4) after
write_hf / read_hf, with the same patches; unexpressible configs fail with one-line messages."""

import json
from pathlib import Path

import pytest
import torch

from blt.config import Config, check_config, config_from_dict
from blt.data import OFFSET, VOCAB_SIZE
from blt.hf import (
    HFFormatError,
    check_hf_expressible,
    hf_patch_lengths,
    read_hf,
    write_hf,
)
from blt.model import build_model
from blt.model.hash_embed import ngram_hash
from blt.patching import Patcher

transformers = pytest.importorskip("transformers")
TOL = 1e-4


def merged(base: dict, extra: dict) -> dict:
    return {**base, **{k: merged(base.get(k, {}), v) if isinstance(v, dict) else v for k, v in extra.items()}}


def blt_cfg(mode: str = "static", global_dim: int = 48, change: dict | None = None, **model) -> Config:
    local = {"dim": 32, "layers": 1, "heads": 2, "window": 16}
    return config_from_dict(
        merged(
            {
                "model": {
                    "encoder": local,
                    "decoder": local,
                    "global_model": {"dim": global_dim, "layers": 2, "heads": 2},
                    "cross_attn_k": 2,
                    "cross_attn_heads": 2,
                    "hash_ngram_sizes": [3, 4],
                    "hash_buckets": 64,
                    "hf_compat": True,
                    "init_std": 0.1,
                    **model,
                },
                "patching": {
                    "mode": mode,
                    "patch_size": 3,
                    "split_first_byte": True,
                    "max_patch_length": 6,
                    "entropy_model": "unused" if mode == "entropy" else None,
                },
                "data": {"seq_len": 64},
            },
            change or {},
        )
    )


def entropy_cfg() -> Config:
    return config_from_dict(
        {
            "model": {
                "arch": "byte_lm",
                "lm": {"dim": 32, "layers": 2, "heads": 2, "window": 16},
                "init_std": 0.3,
                "rope_theta": 500.0,
                "tie_embeddings": True,
            }
        }
    )


def perturbed(model, seed: int):
    """Every weight (norms too) moved off its init, so a swapped or dropped tensor shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def byte_ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(OFFSET, VOCAB_SIZE, (B, T), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1  # BOS
    return ids


def load_hf(path):
    return transformers.BltForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logits(hf, ids, patch_ids=None):
    kw = {} if patch_ids is None else {"patch_lengths": hf_patch_lengths(patch_ids)}
    return hf(ids, use_cache=False, **kw).logits


@torch.no_grad()
def check_hf_own_patching(hf, lm, threshold: float, ids, pid, ours) -> None:
    """HF's forward with its own patcher (patch_in_forward) puts every byte in our patch and gives
    our logits, except at the last byte when the entropy model's prediction of the byte after the
    window exceeds the threshold: HF then closes the last patch (an empty patch follows), and the
    last byte reads its own patch; ours never counts the window's last byte as a patch end."""
    T = ids.shape[1]
    _, lengths, _ = hf.model.patcher(
        ids,
        patch_size=hf.config.patch_size,
        threshold=hf.config.patching_threshold,
        max_patch_length=hf.config.max_patch_length,
    )
    assert torch.equal(hf.model._patch_ids_from_lengths(lengths, T), pid)
    out = hf_logits(hf, ids)
    assert (out[:, :-1] - ours[:, :-1]).abs().max() <= TOL
    closed = torch.distributions.Categorical(logits=lm(ids)[:, -1]).entropy() > threshold  # (B,)
    last = (out[:, -1] - ours[:, -1]).abs().amax(-1)  # (B,)
    assert (last[~closed] <= TOL).all()  # (a closed last patch usually, not always, changes that byte)


def ours_and_patcher(mode: str, seed: int = 0, **model):
    torch.manual_seed(seed)
    cfg = blt_cfg(mode, **model)
    model = perturbed(build_model(cfg.model), seed)
    if mode != "entropy":
        return cfg, model, None, Patcher(cfg.patching)
    ecfg = entropy_cfg()
    lm = perturbed(build_model(ecfg.model), seed + 1)
    patcher = Patcher(cfg.patching, lm)
    patcher.threshold = float(patcher.entropies(byte_ids(4, 48, seed=9))[:, 2:].quantile(0.6))
    return cfg, model, ecfg, patcher


@pytest.mark.parametrize("mode,all_layers", [("static", False), ("entropy", False), ("static", True)])
def test_ours_to_hf_same_logits(tmp_path, mode, all_layers):
    extra = {"decoder": {"dim": 32, "layers": 3, "heads": 2, "window": 16}} if all_layers else {}
    cfg, model, ecfg, patcher = ours_and_patcher(mode, cross_attn_all_layers_decoder=all_layers, **extra)
    write_hf(tmp_path, cfg, model.state_dict(), ecfg, patcher.model.state_dict() if ecfg else None, patcher.threshold)
    hf = load_hf(tmp_path)
    assert hf.config.patch_in_forward == (mode == "entropy")
    ids = byte_ids(3, 40, seed=1)
    pid = patcher(ids)
    assert int(pid.max()) > 6  # several patches
    with torch.no_grad():
        ours = model(ids, pid)
    assert (hf_logits(hf, ids, pid) - ours).abs().max() <= TOL
    assert (hf_logits(hf, ids[1:2], pid[1:2]) - ours[1:2]).abs().max() <= TOL  # a row alone
    if mode == "entropy":  # HF's own patcher (patch_in_forward) finds our patches
        assert len(set(pid[:, -1].tolist())) > 1  # rows with different patch counts
        check_hf_own_patching(hf, patcher.model, patcher.threshold, ids, pid, ours)


def hf_model(global_dim: int, patcher: bool, seed: int = 0, all_layers: bool = False, grouped: bool = False):
    """grouped: the global model and the patcher use grouped-query attention (2 of 4, 1 of 2 key/value heads)."""
    torch.manual_seed(seed)
    local = dict(
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=1,
        intermediate_size=96,
        cross_attn_all_layers=False,
        hidden_size_global=global_dim,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
    )
    config = transformers.BltConfig(  # all_layers: decoder cross-attention before every layer, as in BLT-1B
        encoder_config=local,
        decoder_config={**local, "num_hidden_layers": 2, "cross_attn_all_layers": all_layers},
        global_config=dict(
            hidden_size=global_dim,
            num_attention_heads=4,
            num_key_value_heads=2 if grouped else None,
            num_hidden_layers=2,
            intermediate_size=128,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
        ),
        patcher_config=dict(
            hidden_size=32,
            num_attention_heads=2,
            num_key_value_heads=1 if grouped else None,
            num_hidden_layers=1,
            intermediate_size=64,
            sliding_window=8,
        ),
        patch_in_forward=patcher,
        patching_threshold=3.0,
        max_patch_length=5,
        local_attention_window_len=12,
        encoder_hash_byte_group_size=[2, 3, 5],
        encoder_hash_byte_group_vocab=50,
        encoder_hash_byte_group_nb_functions=2,
    )
    hf = transformers.BltForCausalLM(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape) * (0.1 if p.ndim == 1 else 0.05))
        if patcher:  # a threshold that gives several patches
            entropies = hf.model.patcher(byte_ids(4, 48, seed=9))[0]
            hf.config.patching_threshold = float(entropies[:, 1:].quantile(0.6))
    return hf.eval()


def test_a_grouped_query_global_model_exports_to_hf_with_our_logits(tmp_path):
    """model.global_model.kv_heads=2 of 4 heads: HF's global transformer holds it (num_key_value_heads)."""
    grouped = {"dim": 48, "layers": 2, "heads": 4, "kv_heads": 2}
    cfg, model, _, patcher = ours_and_patcher("static", global_model=grouped)
    assert model.global_transformer.transformer.layers[0].self_attn.k_proj.weight.shape == (24, 48)
    write_hf(tmp_path, cfg, model.state_dict(), None, None, None)
    hf = load_hf(tmp_path)
    assert hf.config.global_config.num_key_value_heads == 2
    ids = byte_ids(3, 40, seed=1)
    pid = patcher(ids)
    with torch.no_grad():
        ours = model(ids, pid)
    assert (hf_logits(hf, ids, pid) - ours).abs().max() <= TOL
    back, state, _, _ = read_hf(tmp_path)  # and back: the same model
    assert back.model.global_model.kv_heads == 2
    again = build_model(back.model).eval()
    again.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert (again(ids, pid) - ours).abs().max() <= TOL


@pytest.mark.parametrize(
    "global_dim,patcher,all_layers,grouped",
    [(48, True, False, False), (64, False, False, False), (64, True, True, False), (48, True, False, True)],
)
def test_hf_to_ours_same_logits(tmp_path, global_dim, patcher, all_layers, grouped):  # 64 = 32 * k: HF's identity
    hf = hf_model(global_dim, patcher, all_layers=all_layers, grouped=grouped)
    hf.save_pretrained(tmp_path)
    cfg, state, ecfg, estate = read_hf(tmp_path)
    check_hf_expressible(cfg, state)
    assert cfg.model.cross_attn_all_layers_decoder == all_layers
    assert cfg.model.global_model.kv_heads == (2 if grouped else None)
    assert ecfg is None or ecfg.model.lm.kv_heads == (1 if grouped else None)
    model = build_model(cfg.model).eval()
    model.load_state_dict(state, strict=True)
    ids = byte_ids(2, 40, seed=3)
    if patcher:
        lm = build_model(ecfg.model).eval()
        lm.load_state_dict(estate, strict=True)
        assert cfg.patching.mode == "entropy" and ecfg.model.lm.window == 8
        pid = Patcher(cfg.patching, lm)(ids)  # our patcher with HF's patcher weights and threshold
    else:
        assert cfg.patching.mode == "static" and cfg.patching.patch_size == 1
        pid = Patcher(cfg.patching)(ids)
    assert 4 < int(pid.max()) < (39 if patcher else 40)
    with torch.no_grad():
        ours = model(ids, pid)
    assert (hf_logits(hf, ids, pid) - ours).abs().max() <= TOL
    if patcher:
        check_hf_own_patching(hf, lm, cfg.patching.threshold, ids, pid, ours)
    else:  # HF's default patching (a patch per byte) differs at the last byte only: see read_hf
        assert (hf_logits(hf, ids)[:, :-1] - ours[:, :-1]).abs().max() <= TOL


def test_sharded_checkpoint_and_round_trip(tmp_path):
    hf = hf_model(48, True)
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    cfg, state, ecfg, estate = read_hf(tmp_path / "one")
    cfg2, state2, ecfg2, estate2 = read_hf(tmp_path / "sharded")
    assert estate.keys() == estate2.keys() and all(torch.equal(estate[k], estate2[k]) for k in estate)
    assert cfg == cfg2 and ecfg == ecfg2
    cfg2.patching.entropy_model = "runs/entropy"  # the caller's part
    check_config(cfg2)
    check_config(ecfg2)
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    # ours -> HF -> ours gives back the same config and tensors
    write_hf(tmp_path / "again", cfg, state, ecfg, estate, None)
    cfg3, state3, ecfg3, estate3 = read_hf(tmp_path / "again")
    assert cfg3.model == cfg.model and cfg3.patching == cfg.patching and ecfg3.model == ecfg.model
    assert all(torch.equal(state[k], state3[k]) for k in state) and state.keys() == state3.keys()
    assert all(torch.equal(estate[k], estate3[k]) for k in estate)


def test_without_hash_embeddings_and_static_patch_size_round_trip(tmp_path):
    cfg = blt_cfg("static", hash_buckets=0)
    torch.manual_seed(0)
    model = perturbed(build_model(cfg.model), 0)
    write_hf(tmp_path, cfg, model.state_dict(), None, None, None)
    back, _, ecfg, _ = read_hf(tmp_path)
    assert ecfg is None and back.model.hash_buckets == 0 and back.patching.patch_size == 3
    ids = byte_ids(2, 30)
    pid = Patcher(cfg.patching)(ids)
    with torch.no_grad():
        assert (hf_logits(load_hf(tmp_path), ids, pid) - model(ids, pid)).abs().max() <= TOL


def test_hash_matches_hf():
    from transformers.models.blt.modeling_blt import byte_group_hash_function

    ids = byte_ids(3, 50)
    for n in (3, 5, 8):  # n=8 overflows int64: both wrap the same way
        for prime in (1000000007, 9576890767):
            assert torch.equal(ngram_hash(ids, n, prime, 500002), byte_group_hash_function(ids, n, prime, 500002))


def test_hf_patch_lengths():
    pid = torch.tensor([[0, 1, 1, 1, 2, 2], [0, 1, 2, 2, 2, 2]])
    assert hf_patch_lengths(pid).tolist() == [[1, 3, 2], [1, 1, 4]]
    pid = torch.tensor([[0, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1]])  # fewer patches: a phantom byte, then 0
    assert hf_patch_lengths(pid).tolist() == [[1, 3, 2], [1, 6, 0]]


def test_identity_projection(tmp_path):
    cfg = blt_cfg("static", global_dim=64)  # = encoder.dim * cross_attn_k: HF has no projection matrix
    state = build_model(cfg.model).state_dict()
    with pytest.raises(HFFormatError, match="model.global_model.dim"):
        write_hf(tmp_path, cfg, state, None, None, None)
    state["global_transformer.token_embedding_projection.weight"] = torch.eye(64)
    write_hf(tmp_path, cfg, state, None, None, None)
    assert "model.global_transformer.token_embedding_projection.weight" not in load_hf(tmp_path).state_dict()


@pytest.mark.parametrize(
    "change,key",
    [
        ({"model": {"hf_compat": False}}, "model.hf_compat"),
        ({"model": {"global_model": {"sparse": {"pattern": "local"}}}}, "model.global_model.sparse.pattern"),
        ({"model": {"decoder": {"window": 8}}}, "model.decoder.window"),
        ({"model": {"global_model": {"window": 8}}}, "model.global_model.window"),
        ({"model": {"cross_attn_heads": 4}}, "model.cross_attn_heads"),
        ({"model": {"encoder": {"kv_heads": 1}}}, "model.encoder.kv_heads"),
        ({"model": {"global_model": {"qkv_bias": True}}}, "model.global_model.qkv_bias"),
        ({"model": {"decoder": {"qk_norm": True}}}, "model.decoder.qk_norm"),
        ({"model": {"arch": "byte_lm"}}, "model.arch"),
        ({"patching": {"threshold_mode": "monotonic", "mode": "entropy"}}, "patching.threshold_mode"),
    ],
)
def test_unexpressible_configs_name_the_key(change, key):
    cfg = blt_cfg(change=change)
    with pytest.raises(HFFormatError) as e:
        check_hf_expressible(cfg)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_read_errors(tmp_path):
    with pytest.raises(HFFormatError, match="config.json"):
        read_hf(tmp_path)
    hf_model(48, False).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for edit, key in [
        ({"model_type": "llama"}, "model_type"),
        ({"encoder_config": {**config["encoder_config"], "cross_attn_all_layers": True}}, "cross_attn_all_layers"),
        ({"encoder_config": {**config["encoder_config"], "num_key_value_heads": 1}}, "num_key_value_heads"),
        ({"decoder_config": {**config["decoder_config"], "hidden_size": 64}}, "hidden_size"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
        with pytest.raises(HFFormatError, match=key) as e:
            read_hf(tmp_path)
        assert "\n" not in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(HFFormatError, match="model.safetensors"):
        read_hf(tmp_path)


@pytest.mark.parametrize(
    "edit,key",
    [
        (lambda c: b"\xff\xfe\x00 binary", "config.json"),
        (lambda c: [1, 2], "not an object"),
        (lambda c: {**c, "global_config": [48]}, "global_config"),
        (lambda c: {**c, "cross_attn_k": 0}, "cross_attn_k"),
        (lambda c: {**c, "cross_attn_k": 1.5}, "cross_attn_k"),
        (lambda c: {**c, "patch_in_forward": "yes"}, "patch_in_forward"),
        (lambda c: {**c, "encoder_hash_byte_group_size": ["3"]}, "encoder_hash_byte_group_size"),
        (lambda c: {**c, "encoder_config": {**c["encoder_config"], "hidden_size": 0}}, "hidden_size"),
        (lambda c: {**c, "encoder_config": {**c["encoder_config"], "rope_parameters": "default"}}, "rope_parameters"),
        (lambda c: {**c, "global_config": {**c["global_config"], "num_hidden_layers": -1}}, "num_hidden_layers"),
        (lambda c: {**c, "local_attention_window_len": -4}, "config.json"),  # our own check, worded for config.json
    ],
)
def test_read_errors_of_bad_fields(tmp_path, edit, key):
    """A config.json field of the wrong type or value is a one-line HFFormatError naming it."""
    hf_model(48, False).save_pretrained(tmp_path)
    bad = edit(json.loads((tmp_path / "config.json").read_text()))
    (tmp_path / "config.json").write_bytes(bad if isinstance(bad, bytes) else json.dumps(bad).encode())
    with pytest.raises(HFFormatError, match=key) as e:
        read_hf(tmp_path)
    assert "\n" not in str(e.value)


def test_read_errors_of_bad_weights(tmp_path):
    from blt.errors import UserError
    from blt.export import import_hf

    hf_model(48, False).save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="safetensors"):
        read_hf(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    weights.write_bytes(good)
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "encoder_hash_byte_group_vocab": 60}))
    with pytest.raises(HFFormatError, match="do not fit its config.json: model.encoder_hash_tok_embedding") as e:
        import_hf(tmp_path / "hf", tmp_path / "out")  # 60 buckets in config.json, 50 in the weights
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_one_byte_window(tmp_path):
    cfg, model, _, patcher = ours_and_patcher("static")
    write_hf(tmp_path, cfg, model.state_dict(), None, None, None)
    ids = byte_ids(2, 1)
    pid = patcher(ids)
    with torch.no_grad():
        assert (hf_logits(load_hf(tmp_path), ids, pid) - model(ids, pid)).abs().max() <= TOL


def test_shipped_hf_config_exports_with_our_logits(tmp_path):
    """configs/tiny_hf.yaml, the README's HF path, at its shipped shape (fewer hash buckets, for speed)
    passes write_hf's checks and HF gives our logits; tiny.yaml with hf_compat cannot export
    (encoder.dim * cross_attn_k == global_model.dim, where HF has no learned projection)."""
    from blt.config import load_config
    from blt.hf import PROJ

    root = Path(__file__).resolve().parents[2] / "configs"
    cfg, ecfg = load_config(root / "tiny_hf.yaml", ["model.hash_buckets=1024"]), load_config(root / "entropy_tiny.yaml")
    torch.manual_seed(0)
    model, lm = perturbed(build_model(cfg.model), 0), perturbed(build_model(ecfg.model), 1)
    patcher = Patcher(cfg.patching, lm)
    patcher.threshold = float(patcher.entropies(byte_ids(4, 48, seed=9))[:, 2:].quantile(0.6))
    write_hf(tmp_path, cfg, model.state_dict(), ecfg, lm.state_dict(), patcher.threshold)
    ids = byte_ids(2, 96, seed=1)
    pid = patcher(ids)
    assert int(pid.max()) > 10
    with torch.no_grad():
        assert (hf_logits(load_hf(tmp_path), ids, pid) - model(ids, pid)).abs().max() <= TOL
    tiny = load_config(root / "tiny.yaml", ["model.hf_compat=true", "patching.split_first_byte=true"])
    with pytest.raises(HFFormatError, match="model.global_model.dim"):
        check_hf_expressible(tiny, {PROJ: torch.zeros(256, 256)})  # a learned projection, as training makes
