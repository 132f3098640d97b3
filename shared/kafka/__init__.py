"""At-least-once Kafka layer on kafka-python: an idempotent producer and a consume loop
that commits only after a batch was handled or dead-lettered."""

from shared.kafka.codec import DecodeError, decode, encode
from shared.kafka.consumer import ConsumeLoop, Received
from shared.kafka.producer import EventProducer

__all__ = ["ConsumeLoop", "DecodeError", "EventProducer", "Received", "decode", "encode"]
