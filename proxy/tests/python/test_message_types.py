"""FIFO, delay, transactional messages and SQL92 filters with the unchanged official Apache
RocketMQ 5 Python client (rocketmq-python-client 5.1.2) against `sluice local`.

Every wait is bounded. The only time-based assertions check that a message is *not* handed out
early (a delay message before its delivery time).
"""

import threading
import time
import uuid
from collections import defaultdict

import pytest
from rocketmq import (ConsumeResult, FilterExpression, Message, MessageListener, Producer,
                      PushConsumer, SimpleConsumer, TransactionChecker, TransactionResolution)
from rocketmq.grpc_protocol import FilterType

from conftest import unique_name

LONG_INVISIBLE_S = 30
AWAIT_S = 2
EARLY_TOLERANCE_S = 0.25


def typed_topic(sluice, request, kind, queues=4):
    name = unique_name("t", request.node.name)
    sluice.cli.run("topic", "create", name, "--type", kind, "--queues", str(queues),
                   "--endpoint", sluice.endpoint)
    return name


def message(topic, body, **system):
    m = Message()
    m.topic = topic
    m.body = body
    for key, value in system.items():
        setattr(m, key, value)
    return m


def start_producer(client_config, clients, topic, checker=None):
    producer = Producer(client_config, (topic,), checker=checker) if checker else Producer(client_config, (topic,))
    producer.startup()
    return clients.add(producer)


def start_simple_consumer(client_config, clients, group, topic, expression=None):
    consumer = SimpleConsumer(client_config, group, {topic: expression or FilterExpression()},
                              await_duration=AWAIT_S)
    consumer.startup()
    return clients.add(consumer)


def drain(consumer, want, within_s):
    """Receives (and acks) until `want` messages came or `within_s` passed."""
    got = []
    deadline = time.monotonic() + within_s
    while len(got) < want and time.monotonic() < deadline:
        for m in consumer.receive(16, LONG_INVISIBLE_S):
            got.append(m)
            consumer.ack(m)
    return got


class FifoListener(MessageListener):
    """Records, per message group, the order in which messages were consumed successfully,
    fails one chosen message once, and notes any time two messages of a group ran at once."""

    def __init__(self, fail_once, expected):
        self.lock = threading.Lock()
        self.order = defaultdict(list)
        self.running = set()
        self.overlaps = []
        self.failed = set()
        self.fail_once = fail_once
        self.expected = expected
        self.done = threading.Event()

    def consume(self, m):
        group = m.message_group
        body = m.body.decode()
        with self.lock:
            if group in self.running:
                self.overlaps.append(body)
            self.running.add(group)
        try:
            time.sleep(0.01)  # long enough that an overlap would be seen
            with self.lock:
                if body in self.fail_once and body not in self.failed:
                    self.failed.add(body)
                    return ConsumeResult.FAILURE
                self.order[group].append(body)
                if sum(len(v) for v in self.order.values()) >= self.expected:
                    self.done.set()
                return ConsumeResult.SUCCESS
        finally:
            with self.lock:
                self.running.discard(group)


@pytest.mark.timeout(240)
def test_fifo_push_consumer_consumes_each_message_group_in_order(sluice, request, client_config, clients):
    topic = typed_topic(sluice, request, "fifo")
    group = unique_name("g", request.node.name)
    sluice.cli.run("group", "create", group, "--fifo", "--endpoint", sluice.endpoint)
    groups, per_group = 5, 10
    sent = {f"mg{g}": [f"mg{g}:{i}" for i in range(per_group)] for g in range(groups)}
    listener = FifoListener(fail_once={"mg1:3", "mg3:0"}, expected=groups * per_group)
    consumer = PushConsumer(client_config, group, listener, {topic: FilterExpression()},
                            consumption_thread_count=8)
    consumer.startup()
    clients.add(consumer)
    producer = start_producer(client_config, clients, topic)
    for i in range(per_group):  # interleaved: mg0:0, mg1:0, ..., mg0:1, ...
        for g in range(groups):
            producer.send(message(topic, f"mg{g}:{i}".encode(), message_group=f"mg{g}"))
    assert listener.done.wait(180), f"consumed so far: {dict(listener.order)}"
    with listener.lock:
        assert dict(listener.order) == sent, "each message group in send order, exactly once"
        assert listener.failed == {"mg1:3", "mg3:0"}, "the failing messages were retried"
        assert listener.overlaps == [], f"two messages of one group ran at once: {listener.overlaps}"


@pytest.mark.timeout(120)
def test_delay_message_is_not_delivered_before_its_time_and_can_be_recalled(
        sluice, request, client_config, clients, group):
    topic = typed_topic(sluice, request, "delay", queues=2)
    consumer = start_simple_consumer(client_config, clients, group, topic)
    producer = start_producer(client_config, clients, topic)
    due = int(time.time()) + 3  # the client sends whole seconds
    kept = producer.send(message(topic, b"later", delivery_timestamp=due))
    recalled = producer.send(message(topic, b"never", delivery_timestamp=due))
    assert kept.recall_handle and recalled.recall_handle, "delay messages come back with a recall handle"
    assert producer.recall_message(topic, recalled.recall_handle) == recalled.message_id
    got = []
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        got = consumer.receive(16, LONG_INVISIBLE_S)
        if got:
            assert time.time() + EARLY_TOLERANCE_S >= due, f"delivered {due - time.time():.2f} s early"
    assert [m.body for m in got] == [b"later"], got
    consumer.ack(got[0])
    assert consumer.receive(16, LONG_INVISIBLE_S) == [], "the recalled message must never come"


class Checker(TransactionChecker):
    def __init__(self):
        self.checked = []

    def check(self, m):
        self.checked.append(m.message_id)
        return TransactionResolution.COMMIT


@pytest.mark.timeout(180)
def test_transactions_commit_roll_back_and_are_checked_back(sluice, request, client_config, clients, group):
    topic = typed_topic(sluice, request, "transaction", queues=2)
    consumer = start_simple_consumer(client_config, clients, group, topic)
    checker = Checker()
    producer = start_producer(client_config, clients, topic, checker=checker)

    committed = producer.begin_transaction()
    producer.send(message(topic, b"committed"), committed)
    rolled_back = producer.begin_transaction()
    producer.send(message(topic, b"rolled back"), rolled_back)
    orphan = producer.begin_transaction()
    orphan_id = producer.send(message(topic, b"checked back"), orphan).message_id

    # Half messages stay invisible until their transaction ends.
    assert consumer.receive(16, LONG_INVISIBLE_S) == []
    committed.commit()
    rolled_back.rollback()
    # The third is never ended by the producer: the server asks its checker, which commits.
    got = drain(consumer, 2, 120)
    assert sorted(m.body for m in got) == [b"checked back", b"committed"], got
    assert orphan_id in checker.checked, f"the checker was asked about {checker.checked}"
    assert consumer.receive(16, LONG_INVISIBLE_S) == [], "the rolled-back message never comes"


@pytest.mark.timeout(120)
def test_sql92_filter_delivers_only_matching_messages(sluice, request, client_config, clients, topic, group):
    expression = FilterExpression("region = 'eu' AND amount > 5", FilterType.SQL)
    consumer = start_simple_consumer(client_config, clients, group, topic, expression)
    producer = start_producer(client_config, clients, topic)
    want = set()
    for i in range(20):
        region = "eu" if i % 2 == 0 else "us"
        m = message(topic, f"m{i}".encode())
        m.add_property("region", region)
        m.add_property("amount", str(i))
        producer.send(m)
        if region == "eu" and i > 5:
            want.add(f"m{i}")
    got = drain(consumer, len(want), 30)
    assert {m.body.decode() for m in got} == want
    assert consumer.receive(16, LONG_INVISIBLE_S) == [], "nothing else may arrive"


@pytest.mark.timeout(120)
def test_priority_messages_to_a_backlogged_topic_arrive_highest_priority_first(
        sluice, request, client_config, clients, group):
    topic = typed_topic(sluice, request, "priority")
    producer = start_producer(client_config, clients, topic)
    sent = []
    for i in range(60):
        priority = (i * 7) % 5
        producer.send(message(topic, f"{priority}:{i}".encode(), priority=priority))
        sent.append((priority, i))
    # The backlog is complete before the group first receives: priority decides all of it.
    consumer = start_simple_consumer(client_config, clients, group, topic)
    got = []
    deadline = time.monotonic() + 60
    while len(got) < len(sent) and time.monotonic() < deadline:
        # One at a time: each receive is the best of what is left.
        for m in consumer.receive(1, LONG_INVISIBLE_S):
            got.append(m)
            consumer.ack(m)
    priorities = [m.priority or 0 for m in got]
    assert len(got) == len(sent)
    assert priorities == sorted(priorities, reverse=True), "highest priority first"
    assert all(m.body.decode().split(":")[0] == str(m.priority or 0) for m in got), "priority kept"
