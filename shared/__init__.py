"""prefloop's common package: wire contracts, topics, Kafka layer, settings, observability.

Every service imports from here and never from another service.
"""
