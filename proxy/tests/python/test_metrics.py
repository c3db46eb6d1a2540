"""Prometheus metrics of `sluice local` after a known workload of the official Python client,
read with the Prometheus project's own text-format parser (prometheus_client.parser)."""

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_official_client import (LONG_INVISIBLE_S, SHORT_INVISIBLE_S, new_message, start_producer,
                                  start_simple_consumer)

WAIT_S = 60


def scrape(sluice):
    """Every sample as {(name, frozenset(labels)): value}; the parser rejects malformed text."""
    url = f"http://{sluice.server.http}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"{family.name} has no help text"
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples, name, **labels):
    """The sum of `name`'s samples that carry `labels` (None when there are none)."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    return sum(found) if found else None


@pytest.fixture
def local(sluice):
    if sluice.server is None:
        pytest.skip("needs the `sluice local` this session started (SLUICE_ENDPOINT is set)")
    return sluice


@pytest.mark.timeout(240)
def test_metrics_count_a_known_workload_exactly(local, client_config, clients, topic, group):
    local.cli.run("group", "create", group, "--max-delivery-attempts", "2", "--endpoint", local.endpoint)
    consumer = start_simple_consumer(client_config, clients, group, topic)
    producer = start_producer(client_config, clients, [topic])
    bodies = [b"m" * (100 + i) for i in range(10)]
    ids = [producer.send(new_message(topic, b)).message_id for b in bodies]

    # Every message once; all but two are acked, and those two come back once more. The
    # leases are long, so no ack can miss its lease on a slow machine; the two kept ones
    # are then made visible again soon.
    first, deadline = {}, time.monotonic() + WAIT_S
    while len(first) < len(ids) and time.monotonic() < deadline:
        for m in consumer.receive(16, LONG_INVISIBLE_S):
            assert m.message_id not in first, "delivered twice before its lease ended"
            first[m.message_id] = m
    assert sorted(first) == sorted(ids), "every sent message is received"
    kept = set(ids[:2])
    for mid, m in first.items():
        if mid in kept:
            consumer.change_invisible_duration(m, SHORT_INVISIBLE_S)
        else:
            consumer.ack(m)
    # The two unacked: their second delivery (attempt 2 of 2) is not acked either, so the
    # third pop moves them to the group's dead-letter topic instead of handing them out.
    again, deadline = [], time.monotonic() + WAIT_S
    while len(again) < 2 and time.monotonic() < deadline:
        again += [m for m in consumer.receive(16, SHORT_INVISIBLE_S) if m.message_id in kept]
    assert sorted(m.message_id for m in again) == sorted(kept)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        # Nothing is handed out a third time: the pop that finds attempt 3 dead-letters it.
        assert consumer.receive(16, LONG_INVISIBLE_S) == []
        samples = scrape(local)
        if value(samples, "rocketmq_send_to_dlq_messages_total", topic=topic, consumer_group=group) == 2:
            break
    on_topic = {"topic": topic}
    of_group = {"topic": topic, "consumer_group": group}
    assert value(samples, "rocketmq_send_to_dlq_messages_total", **of_group) == 2
    assert value(samples, "rocketmq_messages_in_total", **on_topic, message_type="normal", node_type="broker") == 10
    assert value(samples, "rocketmq_throughput_in_total", **on_topic) == sum(map(len, bodies))
    assert value(samples, "rocketmq_message_size_count", **on_topic) == 10
    assert value(samples, "rocketmq_message_size_sum", **on_topic) == sum(map(len, bodies))
    # 1 KiB is RocketMQ's first bucket: every body here fits in it.
    assert value(samples, "rocketmq_message_size_bucket", **on_topic, le="1024") == 10
    assert value(samples, "rocketmq_messages_out_total", **of_group, node_type="proxy") == 12
    redelivered = sum(len(first[mid].body) for mid in kept)
    assert value(samples, "rocketmq_throughput_out_total", **of_group) == sum(map(len, bodies)) + redelivered
    assert value(samples, "rocketmq_rpc_latency_count", request_code="SendMessage", response_code="0") >= 10
    assert value(samples, "rocketmq_consumer_lag_messages", **of_group) == 0

    # The consumer stops; five more messages are its lag, all ready, none in flight.
    clients.shutdown(consumer)
    for i in range(5):
        producer.send(new_message(topic, b"later %d" % i))
    time.sleep(1.1)
    samples = scrape(local)
    assert value(samples, "rocketmq_consumer_lag_messages", **of_group) == 5
    assert value(samples, "rocketmq_consumer_ready_messages", **of_group) == 5
    assert value(samples, "rocketmq_consumer_inflight_messages", **of_group) == 0
    assert value(samples, "rocketmq_consumer_lag_latency", **of_group) >= 1000
    assert value(samples, "rocketmq_consumer_queueing_latency", **of_group) >= 1000
    assert value(samples, "rocketmq_messages_in_total", **on_topic) == 15
