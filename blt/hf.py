"""Conversion between our BLT and HF transformers' `BltForCausalLM` directory format
(config.json + model.safetensors, sharded or not), both ways, exact in fp32. Needs no network
and does not import transformers.

    write_hf("out/hf", cfg, model.state_dict(), entropy_cfg, entropy_model.state_dict(), patcher.threshold)
    cfg, state, ecfg, estate = read_hf("out/hf")   # then build_model(cfg.model).load_state_dict(state)
    hf_model(ids, patch_lengths=hf_patch_lengths(patch_ids), use_cache=False)   # same patches in HF

Only a `model.hf_compat=true` BLT maps onto HF's BltModel (check_hf_expressible lists the rest).
Weights are renamed, and the q/k rows of every self-attention are permuted per head: our RoPE
rotates (first half, second half) pairs, HF's BLT rotates interleaved (even, odd) pairs.
HF's own patcher (patch_in_forward) gives our patches, with two differences: it never starts a
patch at a BOS inside the sequence (ours does), and when the entropy of its prediction after the
last byte exceeds the threshold it closes the last patch, so the last byte reads its own patch
(ours never counts the window's last byte as a patch end): that byte's logits then differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from blt.config import Config, ConfigError, TransformerConfig, check_config, config_from_dict
from blt.disk import write_safetensors
from blt.errors import UserError
from blt.model.layers import ffn_hidden
from blt.patching import mode_of
from blt.tokens import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE


class HFFormatError(UserError):
    """A model or directory that cannot be converted; the message is one line."""


# (our prefix, HF prefix); the first matching prefix wins, in both directions
BLT_NAMES = [
    ("local_encoder.transformer.layers.", "model.local_encoder.layers."),
    ("local_encoder.hash_embed.embedding.", "model.encoder_hash_tok_embedding."),
    ("local_encoder.cross_attn.", "model.local_encoder.cross_attn_layers.0."),
    ("local_encoder.", "model.local_encoder."),  # embed_tokens, patch_embedding_projection
    ("global_transformer.transformer.layers.", "model.global_transformer.layers."),
    ("global_transformer.", "model.global_transformer."),  # token_embedding_projection
    ("local_decoder.transformer.layers.", "model.local_decoder.layers."),
    ("local_decoder.cross_attn.", "model.local_decoder.cross_attn_layers.0."),
    ("local_decoder.lm_head.", "lm_head."),
    ("local_decoder.", "model.local_decoder."),  # patch_embedding_projection, norm
]
PATCHER_NAMES = [("transformer.layers.", "model.patcher.layers."), ("", "model.patcher.")]
PROJ = "global_transformer.token_embedding_projection.weight"  # HF: nn.Identity when enc.dim * k == global dim
# HF's defaults (configuration_blt.py) for keys a diffed config.json may leave out
HF_DEFAULTS = {
    "": dict(
        patch_in_forward=True,
        patch_size=4,
        patching_mode="entropy",
        patching_threshold=1.335442066192627,
        max_patch_length=None,
        local_attention_window_len=512,
        cross_attn_k=2,
        encoder_hash_byte_group_size=None,
        encoder_hash_byte_group_vocab=500002,
        encoder_hash_byte_group_nb_functions=1,
        vocab_size=260,
    ),
    "encoder_config": dict(
        hidden_size=1024,
        num_attention_heads=16,
        num_hidden_layers=1,
        cross_attn_all_layers=False,
        cross_attn_k=2,
        rope_theta=500000.0,
    ),
    "decoder_config": dict(
        hidden_size=1024,
        num_attention_heads=16,
        num_hidden_layers=9,
        cross_attn_all_layers=True,
        cross_attn_k=2,
        intermediate_size=2816,
        hidden_size_global=2048,
        rope_theta=500000.0,
    ),
    "global_config": dict(
        hidden_size=2048, num_attention_heads=16, num_hidden_layers=25, intermediate_size=5632, rope_theta=500000.0
    ),
    "patcher_config": dict(
        hidden_size=768,
        num_attention_heads=12,
        num_hidden_layers=14,
        intermediate_size=2048,
        sliding_window=512,
        rope_theta=10000.0,
    ),
}


def _no(key: str, why: str) -> HFFormatError:
    return HFFormatError(f"{key}: {why}")


def check_hf_expressible(cfg: Config, state: dict | None = None) -> None:
    """Raise HFFormatError (naming the config key and the fix) for what HF's BltConfig cannot hold.
    With `state`, also check weights HF has no place for (a learned projection HF replaces by identity)."""
    m, p = cfg.model, cfg.patching
    if m.arch != "blt":
        raise _no("model.arch", f"is {m.arch}; only a blt model converts to HF's BltForCausalLM")
    refusal = mode_of(p).hf_refusal(p)  # what HF's BltPatcher cannot express of this patching mode
    if refusal is not None:  # first: no other setting makes this model convert
        raise _no(*refusal)
    for key, on in (("model.hf_compat", m.hf_compat), ("patching.split_first_byte", p.split_first_byte)):
        if not on:
            raise _no(
                key,
                "HF's conventions are needed: set model.hf_compat=true and "
                "patching.split_first_byte=true and train/fine-tune with it",
            )
    for name in ("encoder", "global_model", "decoder"):
        t = getattr(m, name)
        for key in _options_hf_lacks(t):
            raise _no(f"model.{name}.{key}", "HF's BLT has no place for it; leave it unset for --format hf")
        if getattr(m, name).sparse.pattern != "none":
            raise _no(f"model.{name}.sparse.pattern", "HF's BLT has dense attention only; set it to none")
        if getattr(m, name).layers < 1 and name != "global_model":
            raise _no(f"model.{name}.layers", "HF's cross-attention sits at a layer; use at least 1 layer")
    if m.global_model.window is not None:
        raise _no("model.global_model.window", "HF's global transformer is fully causal; set it to null")
    if m.encoder.window != m.decoder.window:
        raise _no(
            "model.decoder.window",
            f"HF has one local_attention_window_len for encoder and decoder; "
            f"set it equal to model.encoder.window ({m.encoder.window})",
        )
    if m.encoder.dim != m.decoder.dim:
        raise _no("model.decoder.dim", "HF needs the same hidden size for encoder and decoder")
    for name in ("encoder", "decoder"):
        t = getattr(m, name)
        if (t.kv_heads or t.heads) != t.heads:
            raise _no(
                f"model.{name}.kv_heads",
                f"HF's BLT groups its {name} cross-attention's keys and values too, which blt keeps "
                f"multi-head; set it to null (the global model and entropy model may group)",
            )
        if m.cross_attn_heads != getattr(m, name).heads:
            raise _no(
                "model.cross_attn_heads",
                f"HF's cross-attention uses the {name}'s heads; set it to "
                f"model.{name}.heads ({getattr(m, name).heads}) and make encoder and decoder heads equal",
            )
    identity = m.encoder.dim * m.cross_attn_k == m.global_model.dim
    if (
        identity
        and state is not None
        and PROJ in state
        and not torch.equal(state[PROJ].float().cpu(), torch.eye(m.global_model.dim))
    ):
        raise _no(
            "model.global_model.dim",
            "equals encoder.dim * cross_attn_k, where HF has no learned "
            "token_embedding_projection (identity); train with another global_model.dim or cross_attn_k "
            "(configs/tiny_hf.yaml is configs/tiny.yaml with cross_attn_k 1)",
        )


def check_entropy_expressible(ecfg: Config) -> None:
    """What HF's BltPatcherConfig cannot hold (keys of the entropy model's own config)."""
    if ecfg.model.arch != "byte_lm":
        raise _no("patching.entropy_model", f"is a {ecfg.model.arch} model; HF's patcher is a byte_lm")
    t = ecfg.model.lm
    if t.sparse.pattern != "none":
        raise _no("model.lm.sparse.pattern", "(entropy model) HF's patcher has dense attention; set it to none")
    for key in _options_hf_lacks(t):
        raise _no(f"model.lm.{key}", "(entropy model) HF's patcher has no place for it; leave it unset")


def _options_hf_lacks(t: TransformerConfig) -> list[str]:
    """The keys of a section's Llama-family and position options that are set: HF's BLT (and its
    patcher) has RoPE without scaling, no q/k/v biases and no q/k norms."""
    options = {
        "qkv_bias": t.qkv_bias,
        "qk_norm": t.qk_norm,
        "rope_scaling.factor": t.rope_scaling.factor is not None,
        "position": t.position != "rope",
    }
    return [key for key, on in options.items() if on]


def _sub(t: TransformerConfig, cfg: Config, **extra) -> dict:
    m = cfg.model
    return dict(
        hidden_size=t.dim,
        num_attention_heads=t.heads,
        num_key_value_heads=t.kv_heads or t.heads,
        num_hidden_layers=t.layers,
        intermediate_size=ffn_hidden(t.dim, t.ffn_mult),
        rms_norm_eps=m.norm_eps,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        dropout=m.dropout,
        max_position_embeddings=cfg.data.seq_len,
        initializer_range=m.init_std,
        **extra,
    )


def _rope_rows(rows: int, hd: int, to_hf: bool) -> torch.Tensor:
    """Row order turning q/k_proj (rows, in), heads of `hd` rows each, between our half-split and
    HF's interleaved RoPE pairs."""
    heads = rows // hd
    perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])  # ours[j] = hf[perm[j]]
    idx = torch.argsort(perm) if to_hf else perm
    return (torch.arange(heads)[:, None] * hd + idx[None]).flatten()


LAYER_CROSS = ("local_decoder.layer_cross_attn.", "model.local_decoder.cross_attn_layers.")


def _shift_layer_cross(key: str, to_hf: bool) -> str | None:
    """Our decoder cross-attention before layer i >= 1 (layer_cross_attn.{i-1}) <-> HF's
    cross_attn_layers.{i} (cross_attn_all_layers); None for every other key."""
    ours, theirs = LAYER_CROSS
    src, dst, shift = (ours, theirs, 1) if to_hf else (theirs, ours, -1)
    if not key.startswith(src):
        return None
    i, rest = key[len(src) :].split(".", 1)
    return None if int(i) + shift < 0 else f"{dst}{int(i) + shift}.{rest}"


def _rename(key: str, names: list, to_hf: bool) -> str | None:
    """A weight's name in the other format (our -> HF or back); None when it has none."""
    shifted = _shift_layer_cross(key, to_hf)
    if shifted is not None:
        return shifted
    pair = next(((a, b) if to_hf else (b, a) for a, b in names if key.startswith(a if to_hf else b)), None)
    return None if pair is None else pair[1] + key[len(pair[0]) :]


def _convert(state: dict, names: list, head_dims: dict, to_hf: bool) -> dict:
    """Rename by prefix (our -> HF or back) and permute self-attention q/k rows (head size by our
    prefix in `head_dims`); copies every tensor."""
    out = {}
    for key, t in state.items():
        new = _rename(key, names, to_hf)
        if new is None:
            raise HFFormatError(f"weight '{key}' has no counterpart in the {'HF' if to_hf else 'blt'} format")
        ours = key if to_hf else new
        t = t.detach().cpu()
        if ours.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            hd = next(v for k, v in head_dims.items() if ours.startswith(k))
            if t.ndim == 2 and t.shape[0] % hd == 0:  # else a shape that fit_hf_weights reports
                t = t[_rope_rows(t.shape[0], hd, to_hf)]
        out[new] = t.contiguous().clone()  # safetensors wants contiguous tensors with no shared storage
    return out


def fit_hf_weights(model: torch.nn.Module, state: dict, names: list, src) -> None:
    """Load `state` (read_hf's, in our names) into `model` (built from config.json, on any device
    including meta), or say in one line which HF weights are missing, unexpected or of another shape."""
    own = model.state_dict()

    def hf(key: str) -> str:
        return _rename(key, names, to_hf=True) or key

    problems = [
        f"{hf(k)} is {tuple(state[k].shape)}, config.json makes it {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ][:2]
    for what, keys in (
        ("missing", [hf(k) for k in own if k not in state]),
        ("unexpected", [hf(k) for k in state if k not in own]),
    ):
        if keys:
            problems.append(f"{what} {', '.join(keys[:2])}" + (f" and {len(keys) - 2} more" if len(keys) > 2 else ""))
    if problems:
        raise HFFormatError(
            f"the weights in '{src}' do not fit its config.json: {'; '.join(problems)} "
            "(keys missing from config.json take HF's defaults)"
        )
    model.load_state_dict(state, strict=True, assign=True)


def write_hf(
    out_dir,
    cfg: Config,
    state: dict,
    entropy_cfg: Config | None = None,
    entropy_state: dict | None = None,
    threshold: float | None = None,
) -> None:
    """Write config.json + model.safetensors loadable by BltForCausalLM.from_pretrained(out_dir).
    Entropy patching puts the entropy model in as HF's patcher (patch_in_forward=true, `threshold` or
    patching.threshold); static patching writes patch_in_forward=false, and HF's forward then makes
    every byte a patch unless `patch_lengths` is passed (see hf_patch_lengths)."""
    check_hf_expressible(cfg, state)
    m, p = cfg.model, cfg.patching
    entropy = mode_of(p).needs_entropies
    th = threshold if threshold is not None else p.threshold
    if entropy and (entropy_cfg is None or entropy_state is None):
        raise _no("patching.entropy_model", "entropy patching needs the entropy model's config and weights")
    if entropy and th is None:
        raise _no("patching.threshold", "is null; pass the calibrated threshold (Patcher.calibrate)")
    if entropy:
        check_entropy_expressible(entropy_cfg)
    dtype = next(iter(state.values())).dtype
    hashed = m.hash_buckets > 0 and m.hash_functions > 0 and bool(m.hash_ngram_sizes)
    local = dict(vocab_size=VOCAB_SIZE, cross_attn_k=m.cross_attn_k, hidden_size_global=m.global_model.dim)
    hf = dict(
        architectures=["BltForCausalLM"],
        model_type="blt",
        vocab_size=VOCAB_SIZE,
        dtype=str(dtype).removeprefix("torch."),
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        max_position_embeddings=cfg.data.seq_len,
        initializer_range=m.init_std,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        patch_in_forward=entropy,
        patching_mode=p.mode,
        patch_size=p.patch_size,
        patching_batch_size=1,
        patching_threshold=float(th) if entropy else None,
        max_patch_length=p.max_patch_length,
        local_attention_window_len=m.encoder.window,
        cross_attn_k=m.cross_attn_k,
        encoder_hash_byte_group_size=list(m.hash_ngram_sizes) or [3],
        encoder_hash_byte_group_vocab=m.hash_buckets if hashed else 1,
        encoder_hash_byte_group_nb_functions=m.hash_functions if hashed else 0,  # 0: no hash embeddings
        encoder_config=_sub(
            m.encoder,
            cfg,
            model_type="blt_local_encoder",
            sliding_window=m.encoder.window,
            cross_attn_all_layers=False,
            **local,
        ),
        decoder_config=_sub(
            m.decoder,
            cfg,
            model_type="blt_local_decoder",
            cross_attn_all_layers=m.cross_attn_all_layers_decoder,
            **local,
        ),
        global_config=_sub(m.global_model, cfg, model_type="blt_global_transformer"),
    )
    head_dims = {
        "local_encoder.": m.encoder.dim // m.encoder.heads,
        "global_transformer.": m.global_model.dim // m.global_model.heads,
        "local_decoder.": m.decoder.dim // m.decoder.heads,
    }
    state = dict(state)
    if m.encoder.dim * m.cross_attn_k == m.global_model.dim:
        state.pop(PROJ, None)  # identity (checked above); HF builds nn.Identity here
    tensors = _convert(state, BLT_NAMES, head_dims, to_hf=True)
    if not hashed:
        tensors["model.encoder_hash_tok_embedding.weight"] = torch.zeros(0, m.encoder.dim, dtype=dtype)
    if entropy:
        e = entropy_cfg.model
        hf["patcher_config"] = _sub(
            e.lm,
            entropy_cfg,
            model_type="blt_patcher",
            vocab_size=VOCAB_SIZE,
            sliding_window=e.lm.window,
            tie_word_embeddings=False,
        )
        tensors.update(_convert(entropy_state, PATCHER_NAMES, {"": e.lm.dim // e.lm.heads}, to_hf=True))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    write_safetensors(out / "model.safetensors", tensors, metadata={"format": "pt"})


# the JSON type of every config.json field read_hf reads; None: it may be null
KINDS = {
    "model_type": (str, None),
    "vocab_size": (int,),
    "cross_attn_k": (int,),
    "local_attention_window_len": (int, None),
    "patch_in_forward": (bool, None),
    "patching_mode": (str, None),
    "patch_size": (int, None),
    "patching_threshold": (float, None),
    "max_patch_length": (int, None),
    "max_position_embeddings": (int, None),
    "encoder_hash_byte_group_size": (list, None),
    "encoder_hash_byte_group_vocab": (int,),
    "encoder_hash_byte_group_nb_functions": (int,),
    "initializer_range": (float,),
    "hidden_size": (int,),
    "num_attention_heads": (int,),
    "num_key_value_heads": (int, None),
    "num_hidden_layers": (int,),
    "intermediate_size": (int, None),
    "hidden_size_global": (int,),
    "cross_attn_all_layers": (bool,),
    "sliding_window": (int, None),
    "rms_norm_eps": (float,),
    "dropout": (float, None),
    "hidden_act": (str,),
    "rope_parameters": (dict, None),
    "rope_scaling": (dict, None),
    "rope_theta": (float,),
}
KIND_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list: "a list",
    dict: "an object",
    None: "null",
}


def _is(value, kinds: tuple) -> bool:
    if value is None or isinstance(value, bool):
        return (None if value is None else bool) in kinds
    return any(k is not None and isinstance(value, (int, float) if k is float else k) for k in kinds)


def _field(hf: dict, sec: str, key: str, default=None):
    """config.json's `key` in section `sec` ("" = top level), else HF's default, else `default`;
    checked to be of its JSON type (KINDS)."""
    d = hf if not sec else hf.get(sec)
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise _no(f"config.json {sec}", f"is {type(d).__name__}; expected an object of {sec} fields")
    value = d[key] if key in d else HF_DEFAULTS[sec].get(key, default)
    kinds = KINDS.get(key)
    if kinds is not None and not _is(value, kinds):
        raise _no(
            f"config.json {sec + '.' if sec else ''}{key}",
            f"is {json.dumps(value)[:40]}; expected "
            + " or ".join(KIND_NAMES[k] for k in kinds)
            + " (as transformers' BltConfig writes it)",
        )
    return value


def _stack(hf: dict, sec: str, window) -> tuple[dict, float, float]:
    """One HF sub-config -> (our TransformerConfig fields, rms_norm_eps, rope_theta)."""
    dim, heads = _field(hf, sec, "hidden_size"), _field(hf, sec, "num_attention_heads")
    if dim < 1 or heads < 1 or dim % heads or (dim // heads) % 2:
        raise _no(
            f"config.json {sec}.hidden_size",
            f"{dim} must be a positive multiple of num_attention_heads ({heads}) with an even head size (RoPE)",
        )
    kv_heads = _field(hf, sec, "num_key_value_heads") or heads
    if kv_heads < 1 or heads % kv_heads:
        raise _no(f"config.json {sec}.num_key_value_heads", f"is {kv_heads}; it must divide num_attention_heads")
    if kv_heads != heads and sec in ("encoder_config", "decoder_config"):
        raise _no(
            f"config.json {sec}.num_key_value_heads",
            "grouped-query attention in HF's encoder or decoder is in their cross-attention too, which blt "
            "keeps multi-head; it must equal num_attention_heads there (the global model and patcher may group)",
        )
    if _field(hf, sec, "hidden_act", "silu") != "silu":
        raise _no(f"config.json {sec}.hidden_act", "only silu (SwiGLU) is supported")
    rope = _field(hf, sec, "rope_parameters") or _field(hf, sec, "rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise _no(f"config.json {sec}.rope_parameters", "only default RoPE is supported")
    theta = rope.get("rope_theta", _field(hf, sec, "rope_theta"))
    if not _is(theta, KINDS["rope_theta"]) or theta <= 0:
        raise _no(f"config.json {sec}.rope_parameters.rope_theta", f"is {theta!r}; expected a positive number")
    inter = _field(hf, sec, "intermediate_size") or int(8 * dim / 3)
    mult = inter / dim if ffn_hidden(dim, inter / dim) == inter else (inter - 8) / dim
    if inter < 16 or inter % 16 or ffn_hidden(dim, mult) != inter:
        raise _no(
            f"config.json {sec}.intermediate_size",
            f"{inter} is not a positive multiple of 16 (model.*.ffn_mult can't give it)",
        )
    layers = _field(hf, sec, "num_hidden_layers")
    if layers < 0:
        raise _no(f"config.json {sec}.num_hidden_layers", f"is {layers}; expected 0 or more")
    t = dict(dim=dim, layers=layers, heads=heads, window=window, ffn_mult=mult)
    if kv_heads != heads:
        t["kv_heads"] = kv_heads
    return t, float(_field(hf, sec, "rms_norm_eps", 1e-5)), float(theta)


def _checked(values: dict, placeholder_entropy: bool = False) -> Config:
    """Our Config from read_hf's values, with our cross-field checks, as an HFFormatError naming
    config.json (patching.entropy_model is left None for the caller when `placeholder_entropy`)."""
    try:
        cfg = config_from_dict(values)
        if placeholder_entropy:
            cfg.patching.entropy_model = "entropy_model"
        check_config(cfg)
    except ConfigError as e:
        raise HFFormatError(f"config.json gives a model blt cannot build: {e}") from None
    if placeholder_entropy:
        cfg.patching.entropy_model = None
    return cfg


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, or a one-line HFFormatError."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFFormatError(
            f"'{path}' is not readable JSON ({type(e).__name__}: {str(e)[:80]}); "
            "expected an HF BltForCausalLM directory's file"
        ) from None
    if not isinstance(value, dict):
        raise HFFormatError(
            f"'{path}' holds a JSON {type(value).__name__}, not an object; "
            "expected an HF BltForCausalLM directory's file"
        )
    return value


def _load_tensors(src: Path) -> dict:
    """model.safetensors, or the shards named by model.safetensors.index.json (never pickle)."""
    from blt.artifacts.files import read_safetensors

    index = src / "model.safetensors.index.json"
    if (src / "model.safetensors").is_file():
        return read_safetensors(src / "model.safetensors")
    if not index.is_file():
        raise HFFormatError(f"'{src}' has no model.safetensors or model.safetensors.index.json")
    shards = _read_json(index).get("weight_map")
    if not isinstance(shards, dict) or not all(isinstance(v, str) for v in shards.values()):
        raise HFFormatError(f"'{index}' has no weight_map of weight names to shard files; re-save the model")
    out: dict = {}
    for shard in sorted(set(shards.values())):
        if not (src / shard).is_file():
            raise HFFormatError(f"shard '{src / shard}' named by model.safetensors.index.json is missing")
        out.update(read_safetensors(src / shard))
    return out


def read_hf(src_dir) -> tuple[Config, dict, Config | None, dict | None]:
    """An HF BLT directory -> (our Config, BLT state dict, entropy model Config, its state dict);
    the entropy pair is None when the model has no patcher. patching.entropy_model is left None
    for the caller to fill with a path."""
    src = Path(src_dir)
    if not (src / "config.json").is_file():
        raise HFFormatError(f"'{src}' has no config.json (expected an HF BltForCausalLM directory)")
    hf = _read_json(src / "config.json")
    if _field(hf, "", "model_type") != "blt":
        raise _no("config.json model_type", f"is {hf.get('model_type')!r}, not 'blt'")
    if _field(hf, "", "vocab_size") != VOCAB_SIZE:
        raise _no("config.json vocab_size", f"must be {VOCAB_SIZE} (the BLT byte vocabulary)")
    k = _field(hf, "", "cross_attn_k")
    if _field(hf, "encoder_config", "cross_attn_all_layers"):
        raise _no(
            "config.json encoder_config.cross_attn_all_layers",
            "encoder cross-attention in every layer is "
            "not supported (the decoder's is: model.cross_attn_all_layers_decoder)",
        )
    for sec in ("encoder_config", "decoder_config"):
        if _field(hf, sec, "cross_attn_k") != k:
            raise _no(f"config.json {sec}.cross_attn_k", f"must equal the top-level cross_attn_k ({k})")
    window = _field(hf, "", "local_attention_window_len")
    enc, eps, theta = _stack(hf, "encoder_config", window)
    dec, eps_d, theta_d = _stack(hf, "decoder_config", window)
    glob, eps_g, theta_g = _stack(hf, "global_config", None)
    if (eps, theta) != (eps_d, theta_d) or (eps, theta) != (eps_g, theta_g):
        raise _no("config.json rms_norm_eps/rope_theta", "must be the same in encoder, decoder and global configs")
    if enc["dim"] != dec["dim"] or enc["heads"] != dec["heads"]:
        raise _no("config.json decoder_config.hidden_size", "encoder and decoder need the same hidden size and heads")
    if k < 1:
        raise _no("config.json cross_attn_k", f"is {k}; expected 1 or more")
    if _field(hf, "decoder_config", "hidden_size_global") != glob["dim"]:
        raise _no(
            "config.json decoder_config.hidden_size_global", f"must equal global_config.hidden_size ({glob['dim']})"
        )
    if enc["layers"] < 1 or dec["layers"] < 1:
        raise _no("config.json num_hidden_layers", "encoder and decoder need at least one layer")
    sizes = _field(hf, "", "encoder_hash_byte_group_size") or [3, 4, 5, 6, 7, 8]
    if not all(_is(n, (int,)) and n >= 1 for n in sizes):
        raise _no("config.json encoder_hash_byte_group_size", f"is {sizes}; expected a list of n-gram sizes >= 1")
    funcs = _field(hf, "", "encoder_hash_byte_group_nb_functions")
    model = dict(
        arch="blt",
        hf_compat=True,
        encoder=enc,
        decoder=dec,
        global_model=glob,
        cross_attn_k=k,
        cross_attn_heads=enc["heads"],
        cross_attn_all_layers_decoder=bool(_field(hf, "decoder_config", "cross_attn_all_layers")),
        hash_ngram_sizes=list(sizes),
        hash_functions=funcs,
        hash_buckets=_field(hf, "", "encoder_hash_byte_group_vocab") if funcs else 0,
        rope_theta=theta,
        norm_eps=eps,
        init_std=_field(hf, "", "initializer_range", 0.02),
        dropout=float(_field(hf, "encoder_config", "dropout") or 0.0),
    )
    tensors = _load_tensors(src)
    patcher = {key: t for key, t in tensors.items() if key.startswith("model.patcher.")}
    entropy = bool(_field(hf, "", "patch_in_forward")) and _field(hf, "", "patching_mode") == "entropy"
    if entropy and not patcher:
        raise _no("config.json patch_in_forward", "is true but model.safetensors has no model.patcher.* weights")
    # Patching that reproduces HF's forward: entropy with HF's threshold when there is a patcher;
    # else HF makes every byte a patch, so static patch_size=1 (HF's last byte then reads its own
    # patch, ours the one before). Exception: patching_mode "static" (only write_hf writes it) gives
    # back the model's trained patch_size, which HF's forward ignores unless given patch_lengths.
    mode = "entropy" if entropy else "static"
    size = _field(hf, "", "patch_size") if _field(hf, "", "patching_mode") == "static" else 1
    patching = dict(
        mode=mode,
        patch_size=size if mode == "static" else _field(hf, "", "patch_size") or 4,
        threshold=_field(hf, "", "patching_threshold") if entropy else None,
        threshold_mode="global",
        max_patch_length=_field(hf, "", "max_patch_length"),
        split_first_byte=True,
    )
    context = min(int(_field(hf, "", "max_position_embeddings") or 4096), 8192)  # eval/generation window in bytes
    cfg = _checked({"model": model, "patching": patching, "data": {"seq_len": context}}, placeholder_entropy=entropy)
    head_dims = {
        "local_encoder.": enc["dim"] // enc["heads"],
        "global_transformer.": glob["dim"] // glob["heads"],
        "local_decoder.": dec["dim"] // dec["heads"],
    }
    state = _convert(
        {key: t for key, t in tensors.items() if not key.startswith("model.patcher.")},
        BLT_NAMES,
        head_dims,
        to_hf=False,
    )
    if enc["dim"] * k == glob["dim"]:  # HF's nn.Identity
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
        state[PROJ] = torch.eye(glob["dim"], dtype=dtype)
    if not funcs:
        state.pop("local_encoder.hash_embed.embedding.weight", None)
    if not entropy:
        return cfg, state, None, None
    lm, eps_p, theta_p = _stack(hf, "patcher_config", _field(hf, "patcher_config", "sliding_window"))
    ecfg = _checked(
        {
            "model": {
                "arch": "byte_lm",
                "lm": lm,
                "norm_eps": eps_p,
                "rope_theta": theta_p,
                "init_std": _field(hf, "patcher_config", "initializer_range", 0.02),
                "tie_embeddings": False,
            }
        }
    )
    return cfg, state, ecfg, _convert(patcher, PATCHER_NAMES, {"": lm["dim"] // lm["heads"]}, to_hf=False)


def hf_patch_lengths(patch_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) our patch index of every byte -> (B, P) HF `patch_lengths` (bytes per patch).

    Rows with fewer than P patches are padded with zero lengths and their last patch gets one
    phantom byte past the end, as HF's own patcher does: with plain zero padding, HF's decoder rule
    (patch_lengths[:, 1:]) would let such a row's last byte read a padding patch."""
    ids = patch_ids.long()
    B, P = ids.shape[0], int(ids.max()) + 1
    lengths = torch.zeros(B, P, dtype=torch.long, device=ids.device)
    lengths.scatter_add_(1, ids, torch.ones_like(ids))  # (B, P)
    last = ids[:, -1:]  # (B, 1) last real patch of each row
    return lengths.scatter_add_(1, last, (last < P - 1).long())
