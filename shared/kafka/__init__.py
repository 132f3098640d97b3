"""At-least-once Kafka layer on kafka-python: an idempotent producer and a consume loop
that commits only after a batch was handled or dead-lettered."""

from shared.kafka.codec import DecodeError, decode, encode
from shared.kafka.consumer import ConsumeLoop
from shared.kafka.dead_letters import Received, publish_dead_letters
from shared.kafka.producer import BrokerUnavailable, EventProducer, PublishRejected, Unavailable

__all__ = ["BrokerUnavailable", "ConsumeLoop", "DecodeError", "EventProducer", "PublishRejected", "Received",
           "Unavailable", "decode", "encode", "publish_dead_letters"]
