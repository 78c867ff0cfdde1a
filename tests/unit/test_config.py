"""The config tree: defaults < YAML < overrides, typed, with one-line errors naming the key."""

import dataclasses
import typing

import pytest

from blt.config import Config, ConfigError, OptimizerConfig, check_config, config_to_dict, dump_config, load_config
from blt.errors import UserError
from blt.typed import OptionError, PosFloat, PosInt, Range, check_option


def test_precedence_defaults_yaml_cli(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("training: {steps: 7, batch_size: 3}\nmodel:\n  encoder: {dim: 64}\n  decoder: {dim: 64}\n")
    cfg = load_config(y, ["training.steps=9"])
    assert cfg.training.steps == 9  # CLI beats YAML
    assert cfg.training.batch_size == 3  # YAML beats default
    assert cfg.training.grad_accum == Config().training.grad_accum  # default kept
    # a partial nested section keeps the other defaults of that section
    assert cfg.model.encoder.dim == 64 and cfg.model.encoder.window == Config().model.encoder.window


def test_numbers_lists_and_null_from_the_command_line():
    cfg = load_config(
        None, ["optimizer.lr=3e-4", "model.hash_ngram_sizes=[3,5]", "training.max_minutes=null", "patching.mode=static"]
    )
    assert cfg.optimizer.lr == 3e-4 and cfg.model.hash_ngram_sizes == [3, 5]
    assert cfg.training.max_minutes is None


@pytest.mark.parametrize(
    "override,words",
    [
        ("training.stepz=3", ["unknown config key 'training.stepz'", "did you mean 'training.steps'"]),
        ("training.steps=3.5", ["training.steps", "int"]),
        ("patching.mode=entropie", ["patching.mode", "'entropy'"]),
        ("model.encoder.dim=30", ["model.encoder.dim", "heads"]),
        ("nonsense", ["key=value"]),
    ],
)
def test_errors_are_one_line_and_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override, "patching.mode=static"] if "patching.mode" not in override else [override])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_hf_compat_needs_split_first_byte_and_no_space_patching():
    with pytest.raises(ConfigError, match="patching.split_first_byte=true"):
        load_config(None, ["model.hf_compat=true"])
    with pytest.raises(ConfigError, match="patching.mode=space"):
        load_config(None, ["model.hf_compat=true", "patching.split_first_byte=true", "patching.mode=space"])
    assert load_config(None, ["model.hf_compat=true", "patching.split_first_byte=true"]).model.hf_compat


def test_entropy_mode_needs_an_entropy_model():
    with pytest.raises(ConfigError, match="blt train entropy_tiny"):
        load_config(None, ["patching.mode=entropy"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["training.steps=11"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert config_to_dict(load_config(tmp_path / "config.yaml")) == config_to_dict(cfg)


@pytest.mark.parametrize("name", ["tiny", "entropy_tiny", "byte_baseline_tiny", "blt_1b", "blt_8b", "entropy_100m"])
def test_shipped_configs_load(name):
    load_config(f"configs/{name}.yaml")


def _fields(cls, prefix=""):
    """(dotted key, annotation with its Range) of every leaf field of the config tree."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, hints[f.name]


def _base(tp):
    """float/int/other under Optional[...], list[...] and Annotated[...]; and whether a Range is on the way."""
    ranged = False
    while typing.get_origin(tp) is not None and typing.get_origin(tp) is not typing.Literal:
        args = typing.get_args(tp)
        if typing.get_origin(tp) is typing.Annotated:
            ranged = ranged or any(isinstance(a, Range) for a in args[1:])
            tp = args[0]
        else:  # Optional / list: the one argument that is not None
            tp = next(a for a in args if a is not type(None))
    return tp, ranged


def test_every_number_in_the_config_declares_its_range():
    """A new numeric field must say which values it takes, beside its declaration."""
    unranged = {key for key, tp in _fields(Config) if _base(tp)[0] in (int, float) and not _base(tp)[1]}
    # zero_stage: one of 0-3, checked in check_config (its message names the stages);
    # threshold: any finite number (a derived monotonic threshold can be negative)
    assert unranged == {"distributed.zero_stage", "patching.threshold"}


@pytest.mark.parametrize("key", [k for k, tp in _fields(Config) if _base(tp)[0] is float])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_every_float_refuses_nan_and_infinity(key, value):
    v = f"[{value}, 0.5]" if key == "optimizer.betas" else value
    with pytest.raises(ConfigError, match=r"must be a finite number") as e:
        load_config(None, ["patching.mode=static", f"{key}={v}"])
    assert key in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("optimizer.lr=0", "config key 'optimizer.lr' must be > 0, got 0.0"),
        ("eval.max_bytes=0", "config key 'eval.max_bytes' must be >= 1 or null, got 0"),
        ("optimizer.betas=[0.9,1]", "config key 'optimizer.betas[1]' must be in [0, 1), got 1.0"),
        ("schedule.min_lr_ratio=1.5", "config key 'schedule.min_lr_ratio' must be in [0, 1], got 1.5"),
        ("data.seed=4294967296", "config key 'data.seed' must be in [0, 2**32), got 4294967296"),
        ("training.steps=1e3", "config key 'training.steps' must be int, got '1e3'"),
        ("training.steps=" + "9" * 30, "config key 'training.steps' must be a 64-bit integer, got " + "9" * 30),
        (
            "model.global_model.sparse.global_block_end_indices=[0]",
            "config key 'model.global_model.sparse.global_block_end_indices[0]' must be >= 1, got 0",
        ),
    ],
)
def test_range_errors_name_the_key_the_allowed_values_and_the_value(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["patching.mode=static", override])
    assert str(e.value) == message


def test_edges_of_each_range_are_accepted():
    cfg = load_config(
        None,
        [
            "patching.mode=static",
            "optimizer.grad_clip=0",
            "optimizer.weight_decay=0",
            "optimizer.betas=[0,0.999]",
            "schedule.min_lr_ratio=1",
            "schedule.warmup_steps=0",
            "eval.every=0",
            "eval.max_bytes=1",
            "training.steps=0",
            "data.seq_len=2",
            "model.dropout=0",
            "model.hash_buckets=0",
            "model.global_model.layers=0",
        ],
    )
    assert cfg.optimizer.grad_clip == 0 and cfg.eval.max_bytes == 1 and cfg.model.global_model.layers == 0


def test_check_config_checks_the_ranges_of_a_config_built_in_python():
    with pytest.raises(ConfigError, match="'optimizer.lr' must be > 0"):
        check_config(Config(optimizer=OptimizerConfig(lr=-1.0)))


def test_sparse_pattern_settings_that_do_not_fit_together():
    with pytest.raises(ConfigError, match="must be <= num_local_blocks"):
        load_config(
            None,
            [
                "patching.mode=static",
                "model.global_model.sparse.pattern=fixed",
                "model.global_model.sparse.num_global_blocks=5",
            ],
        )
    with pytest.raises(ConfigError, match="each end > its start"):
        load_config(
            None,
            [
                "patching.mode=static",
                "model.global_model.sparse.pattern=longformer",
                "model.global_model.sparse.global_block_indices=[0,4]",
                "model.global_model.sparse.global_block_end_indices=[2]",
            ],
        )


def test_check_option_spells_the_option_as_python_or_the_command_line_does():
    assert check_option("top_k", None, PosInt, optional=True) is None
    with pytest.raises(OptionError, match=r"^top_k must be >= 1, got 0$"):
        check_option("top_k", 0, PosInt, optional=True)
    with pytest.raises(OptionError, match=r"^--top-p must be a finite number, got nan$"):
        check_option("top_p", float("nan"), PosFloat, flag=True)
    assert isinstance(OptionError("x"), UserError) and isinstance(OptionError("x"), ValueError)
