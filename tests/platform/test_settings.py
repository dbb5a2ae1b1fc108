import pytest

from moeray.platform.settings import ServeSettings, SettingsError


def test_defaults():
    settings = ServeSettings.load(environ={})
    assert (settings.host, settings.port, settings.model_name) == ("127.0.0.1", 8000, "moeray-default")
    assert settings.engine.to_engine_config().block_size == 16


def test_yaml_then_env_then_overrides(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("port: 9000\nengine:\n  max_num_seqs: 8\n  block_size: 32\nautoscaling:\n  max_replicas: 3\n")
    env = {"MOERAY_ENGINE__MAX_NUM_SEQS": "16", "MOERAY_API_KEYS": "sk-first, sk-second", "OTHER": "x"}
    settings = ServeSettings.load(config, {"port": 9100, "host": None}, environ=env)
    assert settings.port == 9100  # flag beats file
    assert settings.engine.max_num_seqs == 16 and settings.engine.block_size == 32  # env beats file, file kept
    assert settings.autoscaling.max_replicas == 3
    assert settings.api_key_values() == ["sk-first", "sk-second"]
    assert "sk-first" not in repr(settings)  # keys are secrets in logs and reprs


def test_unknown_key_names_file_and_line(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("port: 9000\nengine:\n  block_size: 32\n  max_num_sqes: 8\n")
    with pytest.raises(SettingsError, match=r"serve\.yaml:4: setting 'engine\.max_num_sqes': unknown setting"):
        ServeSettings.load(config, environ={})


def test_wrong_type_names_key(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("port: lots\n")
    with pytest.raises(SettingsError, match=r"serve\.yaml:1: setting 'port'"):
        ServeSettings.load(config, environ={})
    with pytest.raises(SettingsError, match="setting 'engine.max_num_seqs'"):
        ServeSettings.load(environ={"MOERAY_ENGINE__MAX_NUM_SEQS": "-3"})


def test_invalid_yaml_names_line(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("port: 9000\nengine: [unclosed\n")
    with pytest.raises(SettingsError, match=r"serve\.yaml:\d+: invalid YAML"):
        ServeSettings.load(config, environ={})


def test_missing_file():
    with pytest.raises(SettingsError, match="cannot read settings file"):
        ServeSettings.load("/nonexistent/serve.yaml", environ={})


def test_lora_flags_and_adapter_names(capsys):
    from moeray.platform.cli import main

    assert main(["serve", "--lora", "no-equals-sign"]) == 2
    assert "--lora 'no-equals-sign': expected NAME=PATH_OR_S3_URI" in capsys.readouterr().err
    with pytest.raises(Exception, match="adapter name 'tiny' is the base model's name"):
        ServeSettings(served_model_name="tiny", lora_adapters={"tiny": "/adapters/a"})
    settings = ServeSettings.load(None, {"lora_adapters": {"sql": "s3://bucket/adapters/sql"}})
    assert settings.lora_adapters == {"sql": "s3://bucket/adapters/sql"}


def test_environment_fills_what_serve_args_leave_out():
    # The chart passes serveConfigV2 args without keys; the keys come from a Secret's env var.
    environ = {"MOERAY_API_KEYS": "k1, k2", "MOERAY_KERNELS": "torch", "MOERAY_CACHE_DIR": "/tmp/x"}
    settings = ServeSettings.load(overrides={"served_model_name": "m"}, environ=environ)
    assert settings.api_key_values() == ["k1", "k2"] and settings.served_model_name == "m"


def test_speculative_flag_and_setting(capsys, tmp_path):
    from support import write_hf_model_folder

    from moeray.platform.cli import main

    assert main(["serve", "--speculative", "mtp:two"]) == 2
    assert "--speculative 'mtp:two': expected METHOD[:NUM_TOKENS]" in capsys.readouterr().err
    assert main(["serve", "--speculative", "{not json"]) == 2
    assert "--speculative '{not json': not valid JSON" in capsys.readouterr().err
    assert main(["serve", "--speculative", "medusa:2"]) == 2
    assert "engine.speculative.method" in capsys.readouterr().err
    write_hf_model_folder(tmp_path, "v3", seed=1)  # no MTP layer: refused before Ray starts
    assert main(["serve", str(tmp_path), "--speculative", "mtp:2"]) == 2
    assert "the model has no multi-token-prediction layer" in capsys.readouterr().err
    settings = ServeSettings.load(None, {"engine": {"speculative": {"method": "ngram", "num_speculative_tokens": 3}}})
    config = settings.engine.to_engine_config().speculative
    assert (config.method, config.num_speculative_tokens) == ("ngram", 3)
