"""Which produce errors are the record's fault (dead-letter it) and which are the broker's (wait)."""

import pytest
from kafka.errors import (BrokerNotAvailableError, KafkaConnectionError, KafkaTimeoutError, MessageSizeTooLargeError,
                          NotLeaderForPartitionError, RecordListTooLargeError, TopicAuthorizationFailedError,
                          UnknownProducerIdError)

from shared.kafka.producer import is_permanent


@pytest.mark.parametrize("error", [MessageSizeTooLargeError, RecordListTooLargeError])
def test_a_record_too_large_is_permanent(error):
    assert is_permanent(error("the message is 2000000 bytes"))


@pytest.mark.parametrize("error", [KafkaConnectionError, KafkaTimeoutError, NotLeaderForPartitionError,
                                   # not `.retriable`, yet a renewed client or a fixed ACL gets past them:
                                   UnknownProducerIdError, BrokerNotAvailableError, TopicAuthorizationFailedError])
def test_outages_and_broker_state_are_waited_out(error):
    assert not is_permanent(error())
