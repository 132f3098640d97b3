import uuid

import pytest

from shared.broker import EmbeddedBroker, create_topics
from shared.kafka import EventProducer
from shared.settings import KafkaSettings
from shared.topics import all_topics_with_dlq


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """One real Tansu broker on a free loopback port for the whole session."""
    with EmbeddedBroker(log_file=tmp_path_factory.mktemp("broker") / "tansu.log") as b:
        yield b


@pytest.fixture
def kafka(broker) -> KafkaSettings:
    """Kafka settings with a fresh topic namespace for this test, topics created."""
    settings = KafkaSettings(bootstrap_servers=broker.bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}.")
    create_topics(broker.bootstrap, all_topics_with_dlq(settings.topic_prefix))
    return settings


@pytest.fixture
def producer(kafka):
    p = EventProducer(kafka, "test")
    yield p
    p.close()
