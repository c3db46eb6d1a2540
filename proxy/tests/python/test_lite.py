"""Lite topics with the unchanged official Apache RocketMQ 5 Python client
(rocketmq-python-client 5.1.2) against `sluice local`: LiteSimpleConsumer and LitePushConsumer,
per-client subscriptions, order within a lite topic, and a group's position outliving its
consumers.

Every wait is bounded; no assertion is about timing.
"""

import threading
import time
import uuid
from collections import defaultdict

import pytest
from rocketmq import ConsumeResult, Message, MessageListener, Producer
from rocketmq.v5.consumer import LitePushConsumer, LiteSimpleConsumer
from rocketmq.v5.exception import LiteSubscriptionQuotaExceededException

from conftest import unique_name

INVISIBLE_S = 30
AWAIT_S = 2
WAIT_S = 60


def lite_topic(sluice, request, queues=4):
    name = unique_name("lite", request.node.name)
    sluice.cli.run("topic", "create", name, "--type", "lite", "--queues", str(queues),
                   "--endpoint", sluice.endpoint)
    return name


def lite_message(topic, lite, body):
    m = Message()
    m.topic = topic
    m.lite_topic = lite
    m.body = body.encode()
    return m


def start_producer(client_config, clients, topic):
    producer = Producer(client_config, (topic,))
    producer.startup()
    return clients.add(producer)


def start_lite_simple(client_config, clients, group, topic):
    consumer = LiteSimpleConsumer(topic, client_config, group, await_duration=AWAIT_S)
    consumer.startup()
    return clients.add(consumer)


SETTINGS_WAIT_S = 10


def subscribe(consumer, name):
    """subscribe_lite, once the client has applied the server's settings: its start-up does not
    wait for them, and until they arrive it refuses every name itself ("quota: 0")."""
    deadline = time.monotonic() + SETTINGS_WAIT_S
    while True:
        try:
            return consumer.subscribe_lite(name)
        except LiteSubscriptionQuotaExceededException as e:
            if "quota: 0" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def receive_until(consumer, want, within_s=WAIT_S):
    """Receives and acks until `want` messages came or `within_s` passed; in arrival order."""
    got = []
    deadline = time.monotonic() + within_s
    while len(got) < want and time.monotonic() < deadline:
        for m in consumer.receive(16, INVISIBLE_S):
            got.append(m)
            consumer.ack(m)
    return got


def session_name():
    """Lite topic names are often UUIDs (36 characters)."""
    return str(uuid.uuid4())


@pytest.mark.timeout(180)
def test_lite_simple_consumer_gets_a_reply_sent_after_it_subscribed(sluice, request, client_config, clients):
    topic = lite_topic(sluice, request)
    group = unique_name("g", request.node.name)
    consumer = start_lite_simple(client_config, clients, group, topic)
    session = session_name()
    # The client splits the name into characters in its PARTIAL_ADD; the server reads it back.
    subscribe(consumer, session)
    producer = start_producer(client_config, clients, topic)
    producer.send(lite_message(topic, session, "hello"))
    got = receive_until(consumer, 1)
    assert [m.body.decode() for m in got] == ["hello"]
    assert got[0].lite_topic == session
    assert got[0].topic == topic


@pytest.mark.timeout(180)
def test_each_client_gets_only_its_own_lite_topics_in_send_order(sluice, request, client_config, clients):
    topic = lite_topic(sluice, request)
    group = unique_name("g", request.node.name)
    a = start_lite_simple(client_config, clients, group, topic)
    b = start_lite_simple(client_config, clients, group, topic)
    mine = {"a": [session_name() for _ in range(3)], "b": [session_name() for _ in range(3)]}
    for name in mine["a"]:
        subscribe(a, name)
    for name in mine["b"]:
        subscribe(b, name)
    producer = start_producer(client_config, clients, topic)
    per_topic = 8
    sent = defaultdict(list)
    for i in range(per_topic):  # interleaved across all six lite topics
        for name in mine["a"] + mine["b"]:
            body = f"{name}:{i}"
            producer.send(lite_message(topic, name, body))
            sent[name].append(body)
    total = per_topic * 3
    for client, consumer in (("a", a), ("b", b)):
        got = receive_until(consumer, total)
        seen = defaultdict(list)
        for m in got:
            assert m.lite_topic in mine[client], f"client {client} got {m.lite_topic}, not one of its own"
            seen[m.lite_topic].append(m.body.decode())
        assert dict(seen) == {name: sent[name] for name in mine[client]}, "each lite topic whole and in order"


@pytest.mark.timeout(240)
def test_a_new_client_of_the_group_resumes_at_the_first_unacknowledged_message(
        sluice, request, client_config, clients):
    topic = lite_topic(sluice, request)
    group = unique_name("g", request.node.name)
    session = session_name()
    first = start_lite_simple(client_config, clients, group, topic)
    subscribe(first, session)
    producer = start_producer(client_config, clients, topic)
    for i in range(3):
        producer.send(lite_message(topic, session, f"m{i}"))
    got = receive_until(first, 3)
    assert [m.body.decode() for m in got] == ["m0", "m1", "m2"]
    # The next one is received but never acked: it must come again to the next client.
    producer.send(lite_message(topic, session, "m3"))
    unacked = []
    deadline = time.monotonic() + WAIT_S
    while not unacked and time.monotonic() < deadline:
        unacked = first.receive(1, 1)
    assert [m.body.decode() for m in unacked] == ["m3"]
    clients.shutdown(first)
    # Sent while nobody is subscribed: kept for the group.
    for i in range(4, 7):
        producer.send(lite_message(topic, session, f"m{i}"))
    second = start_lite_simple(client_config, clients, group, topic)
    subscribe(second, session)
    got = receive_until(second, 4)
    assert [m.body.decode() for m in got] == ["m3", "m4", "m5", "m6"], "from the first unacked one, in order"


class StreamListener(MessageListener):
    def __init__(self, expected):
        self.lock = threading.Lock()
        self.got = defaultdict(list)
        self.expected = expected
        self.done = threading.Event()

    def consume(self, m):
        with self.lock:
            self.got[m.lite_topic].append(m.body.decode())
            if sum(len(v) for v in self.got.values()) >= self.expected:
                self.done.set()
        return ConsumeResult.SUCCESS


@pytest.mark.timeout(240)
def test_lite_push_consumer_streams_each_lite_topic_in_order(sluice, request, client_config, clients):
    topic = lite_topic(sluice, request)
    group = unique_name("g", request.node.name)
    sessions = [session_name() for _ in range(4)]
    other = session_name()  # written to, never subscribed
    per_session = 20
    listener = StreamListener(len(sessions) * per_session)
    consumer = LitePushConsumer(client_config, group, topic, listener, consumption_thread_count=8)
    consumer.startup()
    clients.add(consumer)
    for s in sessions:
        subscribe(consumer, s)
    producer = start_producer(client_config, clients, topic)
    sent = defaultdict(list)
    for i in range(per_session):
        for s in sessions + [other]:
            body = f"token-{i}"
            producer.send(lite_message(topic, s, body))
            sent[s].append(body)
    assert listener.done.wait(180), f"consumed so far: { {k: len(v) for k, v in listener.got.items()} }"
    with listener.lock:
        assert set(listener.got) == set(sessions), "only subscribed lite topics are delivered"
        for s in sessions:
            assert listener.got[s] == sent[s], "a token stream stays a stream"


def test_a_lite_topic_message_needs_a_lite_topic_name(sluice, request, client_config, clients):
    topic = lite_topic(sluice, request)
    producer = start_producer(client_config, clients, topic)
    m = Message()
    m.topic = topic
    m.body = b"no lite topic"
    with pytest.raises(Exception) as failure:
        producer.send(m)
    assert "lite" in str(failure.value).lower()
