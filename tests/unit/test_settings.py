import pytest
from pydantic import ValidationError

from services.gateway.settings import GatewaySettings
from services.generator.settings import GeneratorSettings
from services.judge.settings import JudgeSettings
from services.trainer.settings import TrainerSettings
from shared.settings import EngineSettings


def test_each_service_reads_its_own_prefix_and_the_shared_kafka_prefix(monkeypatch):
    monkeypatch.setenv("PREFLOOP_KAFKA_BOOTSTRAP_SERVERS", "kafka:9092")
    monkeypatch.setenv("PREFLOOP_GENERATOR_BATCH_SIZE", "3")
    monkeypatch.setenv("PREFLOOP_JUDGE_BATCH_SIZE", "5")
    gen, judge = GeneratorSettings(), JudgeSettings()
    assert gen.batch_size == 3 and judge.batch_size == 5
    assert gen.kafka.bootstrap_servers == judge.kafka.bootstrap_servers == "kafka:9092"
    assert TrainerSettings().kafka.session_timeout_ms == 6000


def test_a_service_can_override_kafka_settings_for_itself(monkeypatch):
    monkeypatch.setenv("PREFLOOP_KAFKA_BOOTSTRAP_SERVERS", "kafka:9092")
    monkeypatch.setenv("PREFLOOP_GATEWAY_KAFKA__BOOTSTRAP_SERVERS", "other:9093")
    assert GatewaySettings().kafka.bootstrap_servers == "other:9093"
    assert GeneratorSettings().kafka.bootstrap_servers == "kafka:9092"


def test_secrets_are_not_in_the_repr(monkeypatch):
    monkeypatch.setenv("PREFLOOP_JUDGE_API_KEY", "sk-very-secret")
    settings = JudgeSettings()
    assert settings.api_key == "sk-very-secret"
    assert "sk-very-secret" not in repr(settings)


def test_keys_can_come_from_mounted_secret_files(monkeypatch, tmp_path):
    (tmp_path / "judge").write_text("sk-from-file\n")
    (tmp_path / "admin").write_text("admin-from-file")
    monkeypatch.setenv("PREFLOOP_JUDGE_BACKEND", "openai")
    monkeypatch.setenv("PREFLOOP_JUDGE_API_KEY_FILE", str(tmp_path / "judge"))
    monkeypatch.setenv("PREFLOOP_GATEWAY_ADMIN_KEY_FILE", str(tmp_path / "admin"))
    monkeypatch.setenv("PREFLOOP_TRAINER_ADMIN_KEY_FILE", str(tmp_path / "admin"))
    assert JudgeSettings().api_key == "sk-from-file"
    assert TrainerSettings().judge.api_key == "sk-from-file"
    assert GatewaySettings().admin_key == TrainerSettings().admin_key == "admin-from-file"


def test_a_missing_or_empty_or_doubled_secret_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFLOOP_GATEWAY_ADMIN_KEY_FILE", str(tmp_path / "nope"))
    with pytest.raises(ValidationError, match="PREFLOOP_GATEWAY_ADMIN_KEY_FILE=.*cannot read"):
        GatewaySettings()
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setenv("PREFLOOP_GATEWAY_ADMIN_KEY_FILE", str(tmp_path / "empty"))
    with pytest.raises(ValidationError, match="secret file is empty"):
        GatewaySettings()
    (tmp_path / "key").write_text("k")
    monkeypatch.setenv("PREFLOOP_GATEWAY_ADMIN_KEY_FILE", str(tmp_path / "key"))
    monkeypatch.setenv("PREFLOOP_GATEWAY_ADMIN_KEY", "k2")
    with pytest.raises(ValidationError, match="not both"):
        GatewaySettings()


def test_auto_trains_with_prefloops_loop_on_any_device_and_with_trl_for_qlora(monkeypatch):
    """The loop carries the recipe's drift budget and schedule tail, which TRL's DPOTrainer does not: a GPU
    trainer must not lose them by `auto` (it did until 2026-12-04)."""
    import torch

    from services.trainer.dpo import DPOJobConfig

    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        assert DPOJobConfig().resolved_implementation() == "prefloop"
        assert DPOJobConfig(quantization="nf4").resolved_implementation() == "trl"
        assert DPOJobConfig(dpo_implementation="trl").resolved_implementation() == "trl"


def test_the_native_kernels_switch_reads_its_old_name_too(monkeypatch):
    """PREFLOOP_ENGINE_NATIVE_ATTENTION was its name before layer_ops.c: an operator's old setting still holds."""
    assert EngineSettings().native_kernels is True
    monkeypatch.setenv("PREFLOOP_ENGINE_NATIVE_KERNELS", "false")
    assert EngineSettings().native_kernels is False
    monkeypatch.delenv("PREFLOOP_ENGINE_NATIVE_KERNELS")
    monkeypatch.setenv("PREFLOOP_ENGINE_NATIVE_ATTENTION", "false")
    assert EngineSettings().native_kernels is False
    assert GeneratorSettings().engine.native_kernels is False
    monkeypatch.setenv("PREFLOOP_ENGINE_NATIVE_KERNELS", "true")  # the new name wins where both are set
    assert EngineSettings().native_kernels is True
