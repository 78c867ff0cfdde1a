"""The config tree: defaults < YAML < overrides, typed, with one-line errors naming the key."""

import pytest

from blt.config import ConfigError, Config, config_to_dict, dump_config, load_config


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
    cfg = load_config(None, ["optimizer.lr=3e-4", "model.hash_ngram_sizes=[3,5]", "training.max_minutes=null",
                             "patching.mode=static"])
    assert cfg.optimizer.lr == 3e-4 and cfg.model.hash_ngram_sizes == [3, 5]
    assert cfg.training.max_minutes is None


@pytest.mark.parametrize("override,words", [
    ("training.stepz=3", ["unknown config key 'training.stepz'", "did you mean 'training.steps'"]),
    ("training.steps=3.5", ["training.steps", "int"]),
    ("patching.mode=entropie", ["patching.mode", "'entropy'"]),
    ("model.encoder.dim=30", ["model.encoder.dim", "heads"]),
    ("nonsense", ["key=value"]),
])
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
    with pytest.raises(ConfigError, match="blt train configs/entropy_tiny.yaml"):
        load_config(None, ["patching.mode=entropy"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["training.steps=11"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert config_to_dict(load_config(tmp_path / "config.yaml")) == config_to_dict(cfg)


@pytest.mark.parametrize("name", ["tiny", "entropy_tiny", "byte_baseline_tiny", "blt_1b", "blt_8b", "entropy_100m"])
def test_shipped_configs_load(name):
    load_config(f"configs/{name}.yaml")
