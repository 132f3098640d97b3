from services.gateway.settings import GatewaySettings
from services.generator.settings import GeneratorSettings
from services.judge.settings import JudgeSettings
from services.trainer.settings import TrainerSettings


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
