import subprocess
import sys

import pytest
import yaml

from sdxl_trainer.config import Config, ConfigError, example_config, load_config
from sdxl_trainer.main import main


def test_defaults_validate_and_overrides_are_typed():
    config = load_config(None, ["train.max_steps=7", "train.learning_rate=3e-4", "objective.zero_terminal_snr=false", "sample.prompts=[a, b]"])
    assert config.train.max_steps == 7
    assert config.train.learning_rate == pytest.approx(3e-4)
    assert config.objective.zero_terminal_snr is False
    assert config.sample.prompts == ["a", "b"]


def test_public_keys_exist():
    config = Config()
    for path in ("model.pretrained", "data.root", "cache.dir", "output.dir", "train.max_steps", "train.batch_size", "train.learning_rate", "train.seed"):
        section, key = path.split(".")
        assert hasattr(getattr(config, section), key), path


@pytest.mark.parametrize(
    "overrides, expected_fields",
    [
        (["train.batch_size=0", "train.learning_rate=-1", "objective.prediction_type=sample"],
         ["train.batch_size", "train.learning_rate", "objective.prediction_type"]),
        (["data.resolution=1000", "sample.width=33", "nosuch.key=1", "train.seed=abc"],
         ["data: resolution 1000", "sample: width 33", "nosuch: unknown key", "train.seed"]),
        (["objective.loss_weighting=snr", "data.crop=left", "train.lr_warmup_steps=50", "train.max_steps=10"],
         ["objective.loss_weighting", "data.crop", "train: lr_warmup_steps 50"]),
    ],
)
def test_every_problem_reported_in_one_message(overrides, expected_fields):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert f"{len(expected_fields)} problem(s)" in message
    for field in expected_fields:
        assert field in message, (field, message)


def test_bad_yaml_file_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(None, ["train.max_steps"])


def test_example_config_is_valid_yaml_with_every_section(tmp_path):
    text = example_config()
    tree = yaml.safe_load(text)
    assert set(tree) == set(Config.model_fields)
    path = tmp_path / "example.yaml"
    path.write_text(text)
    assert load_config(path) == Config()


def test_cli_bad_config_exits_2_naming_every_field(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  batch_size: -3\n  learning_rate: zero\nmodel:\n  nope: 1\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    for field in ("train.batch_size", "train.learning_rate", "model.nope"):
        assert field in err


def test_cli_init_config_and_module_entry(tmp_path):
    out = tmp_path / "init.yaml"
    result = subprocess.run([sys.executable, "-m", "sdxl_trainer", "init-config", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert load_config(out) == Config()
    bad = subprocess.run([sys.executable, "-m", "sdxl_trainer", "train", str(tmp_path / "absent.yaml")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "config file not found" in bad.stderr
