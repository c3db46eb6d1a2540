"""The unchanged official Apache RocketMQ 5 Python client (rocketmq-python-client 5.1.2) against
`sluice local`: produce, SimpleConsumer receive/ack/change-invisible, PushConsumer retry.

Every test is bounded twice: pytest-timeout per test, and explicit deadlines on every wait loop,
so a hanging or silent server fails the test rather than hanging CI. No assertion is about speed;
the only time-based assertions check that an invisible message is *not* handed out early.
"""

import hashlib
import math
import queue
import random
import threading
import time
import uuid
import zlib
from collections import defaultdict

import grpc
import pytest
from rocketmq import (ClientConfiguration, ConsumeResult, Credentials, FilterExpression,
                      Message, MessageListener, Producer, PushConsumer, SimpleConsumer)
from rocketmq.grpc_protocol import (AddressScheme, ClientType, Code,
                                    DigestType, Encoding, MessageType,
                                    MessagingServiceStub, Permission,
                                    QueryRouteRequest, ReceiveMessageRequest,
                                    Settings, TelemetryCommand)
from rocketmq.v5.exception import ClientException, TooManyRequestsException
from rocketmq.v5.util import Signature

from conftest import (REQUEST_TIMEOUT_S, SluiceCli, SluiceServer, sluice_bin,
                      unique_name)

MiB = 1024 * 1024
MAX_BODY = 4 * MiB

SIMPLE_AWAIT_S = 2  # SimpleConsumer long-polling timeout (ReceiveMessageRequest.long_polling_timeout)
SHORT_INVISIBLE_S = 3  # the "short" invisible duration of tests b and c (the client has no minimum)
LONG_INVISIBLE_S = 30  # "long enough that it will not expire during the test"
EARLY_TOLERANCE_S = 0.25  # clock granularity slack when checking "not handed out before deadline"


# ---------------------------------------------------------------------------------------------
# helpers


def md5(data):
    return hashlib.md5(data).hexdigest()


def new_message(topic, body, tag=None, keys=(), properties=None):
    msg = Message()
    msg.topic = topic
    msg.body = body
    if tag:
        msg.tag = tag
    for k in keys:
        msg.keys = k  # the setter adds one key per assignment
    for k, v in (properties or {}).items():
        msg.add_property(k, v)
    return msg


def start_producer(client_config, clients, topics=()):
    producer = Producer(client_config, tuple(topics))
    producer.startup()
    return clients.add(producer)


def start_simple_consumer(client_config, clients, group, topic, await_s=SIMPLE_AWAIT_S):
    consumer = SimpleConsumer(
        client_config, group, {topic: FilterExpression()}, await_duration=await_s
    )
    consumer.startup()
    clients.add(consumer)
    # Prime the group on the (still empty) topic so a server that positions a new group at the
    # first receive does not skip what the test sends next.
    assert consumer.receive(16, LONG_INVISIBLE_S) == [], "a fresh topic had messages"
    return consumer


def raw_metadata(client_config, client_id):
    return Signature.metadata(client_config, client_id)


def raw_query_route(endpoint, client_config, topic):
    host, port = endpoint.rsplit(":", 1)
    req = QueryRouteRequest()
    req.topic.name = topic
    req.endpoints.scheme = AddressScheme.IPv4
    addr = req.endpoints.addresses.add()
    addr.host = host
    addr.port = int(port)
    with grpc.insecure_channel(endpoint) as channel:
        return MessagingServiceStub(channel).QueryRoute(
            req,
            metadata=raw_metadata(client_config, f"pytest-raw-{uuid.uuid4().hex[:8]}"),
            timeout=REQUEST_TIMEOUT_S,
        )


def readable_queue_count(endpoint, client_config, topic):
    res = raw_query_route(endpoint, client_config, topic)
    assert res.status.code == Code.OK, res.status
    return sum(
        1 for q in res.message_queues if q.permission in (Permission.READ, Permission.READ_WRITE)
    )


def body_sizes(n, seed):
    """n sizes from 1 B to exactly 4 MiB, spread log-uniformly, ~60 MiB in total.

    Exactly 1 B and exactly 4 MiB, 8 large sizes log-spaced in (512 KiB, 4 MiB), the rest
    log-uniform in [1 B, 512 KiB]; shuffled. (Log-uniform over the whole range would be ~270 MiB.)
    """
    rng = random.Random(seed)
    big = [int(round(math.exp(math.log(512 * 1024) + (math.log(MAX_BODY) - math.log(512 * 1024)) * i / 9)))
           for i in range(1, 9)]
    sizes = [1, MAX_BODY] + big
    sizes += [max(1, int(math.exp(rng.uniform(0, math.log(512 * 1024))))) for _ in range(n - len(sizes))]
    rng.shuffle(sizes)
    return sizes


def receive_until(consumer, deadline, want, max_num=16, invisible_s=LONG_INVISIBLE_S):
    """Receive until want(messages_so_far) is true or the deadline passes; returns all received."""
    got = []
    while time.monotonic() < deadline:
        got.extend(consumer.receive(max_num, invisible_s))
        if want(got):
            break
    return got


# ---------------------------------------------------------------------------------------------
# shape of the server's replies (diagnostic: a wrong route or settings reply otherwise surfaces as
# obscure client-side errors in the tests below)


@pytest.mark.timeout(60)
def test_query_route_shape(endpoint, client_config, topic):
    res = raw_query_route(endpoint, client_config, topic)
    assert res.status.code == Code.OK, res.status
    assert len(res.message_queues) >= 1
    host, port = endpoint.rsplit(":", 1)
    writable = readable = 0
    for q in res.message_queues:
        assert q.topic.name == topic
        assert q.broker.id == 0, "the client only uses queues on broker id 0 (master)"
        eps = q.broker.endpoints
        assert eps.scheme in (AddressScheme.IPv4, AddressScheme.DOMAIN_NAME), eps
        assert (host, int(port)) in [(a.host, a.port) for a in eps.addresses], (
            "broker endpoints must be where clients reach this proxy; the client sends "
            "SendMessage/ReceiveMessage/Telemetry/Heartbeat there, not to the configured endpoint"
        )
        assert MessageType.NORMAL in q.accept_message_types, q
        writable += q.permission in (Permission.WRITE, Permission.READ_WRITE)
        readable += q.permission in (Permission.READ, Permission.READ_WRITE)
    assert writable >= 1 and readable >= 1


def _telemetry_exchange(endpoint, client_config, settings, rounds=2):
    """Write `settings` `rounds` times on one Telemetry stream; one reply per write, stream kept
    open between them (the client writes once at start and again every 5 minutes)."""
    requests = queue.Queue()

    def request_iter():
        while True:
            item = requests.get()
            if item is None:
                return
            yield item

    cmd = TelemetryCommand()
    cmd.settings.CopyFrom(settings)
    replies = []
    with grpc.insecure_channel(endpoint) as channel:
        call = MessagingServiceStub(channel).Telemetry(
            request_iter(),
            metadata=raw_metadata(client_config, f"pytest-raw-{uuid.uuid4().hex[:8]}"),
            timeout=30,
        )
        try:
            for _ in range(rounds):
                requests.put(cmd)
                replies.append(next(call))
        finally:
            requests.put(None)
            call.cancel()
    return replies


def _route_endpoints(endpoint, client_config, topic):
    res = raw_query_route(endpoint, client_config, topic)
    assert res.status.code == Code.OK, res.status
    return res.message_queues[0].broker.endpoints


@pytest.mark.timeout(60)
def test_telemetry_settings_reply_producer(endpoint, client_config, topic):
    s = Settings()
    s.client_type = ClientType.PRODUCER
    s.access_point.CopyFrom(_route_endpoints(endpoint, client_config, topic))
    s.request_timeout.seconds = REQUEST_TIMEOUT_S
    t = s.publishing.topics.add()
    t.name = topic
    s.publishing.max_body_size = 128 * MiB
    s.publishing.validate_message_type = True
    s.metric.on = False
    for reply in _telemetry_exchange(endpoint, client_config, s):
        # The client applies a settings reply only if status.code == OK ...
        assert reply.HasField("settings") and reply.status.code == Code.OK, reply
        # ... and then takes publishing.max_body_size as its body limit (0 = every send refused).
        assert reply.settings.HasField("publishing"), reply
        assert reply.settings.publishing.max_body_size >= MAX_BODY, reply


@pytest.mark.timeout(60)
def test_telemetry_settings_reply_push_consumer(endpoint, client_config, topic, group):
    s = Settings()
    s.client_type = ClientType.PUSH_CONSUMER
    s.access_point.CopyFrom(_route_endpoints(endpoint, client_config, topic))
    s.request_timeout.seconds = REQUEST_TIMEOUT_S
    s.subscription.group.name = group
    e = s.subscription.subscriptions.add()
    e.topic.name = topic
    e.expression.type = FilterExpression().filter_type
    e.expression.expression = "*"
    s.metric.on = False
    for reply in _telemetry_exchange(endpoint, client_config, s):
        assert reply.HasField("settings") and reply.status.code == Code.OK, reply
        sub = reply.settings.subscription
        assert reply.settings.HasField("subscription"), reply
        # The push consumer long-polls for exactly this long with a deadline of this plus its
        # request timeout; 0 would leave the server's own default racing a 10 s deadline.
        assert sub.long_polling_timeout.seconds >= 1, reply
        assert not sub.fifo, reply


def _raw_receive(endpoint, client_config, group, queue_pb, long_poll_s, invisible_s=LONG_INVISIBLE_S):
    req = ReceiveMessageRequest()
    req.group.name = group
    req.message_queue.CopyFrom(queue_pb)
    req.filter_expression.type = FilterExpression().filter_type
    req.filter_expression.expression = "*"
    req.batch_size = 16
    req.invisible_duration.seconds = invisible_s
    req.auto_renew = False
    req.long_polling_timeout.seconds = long_poll_s
    with grpc.insecure_channel(endpoint) as channel:
        return list(MessagingServiceStub(channel).ReceiveMessage(
            req,
            metadata=raw_metadata(client_config, f"pytest-raw-{uuid.uuid4().hex[:8]}"),
            timeout=long_poll_s + REQUEST_TIMEOUT_S,
        ))


def _expected_checksum(digest_type, body):
    # What rocketmq.v5.model.message.Message.__message_body_check_sum compares against (exact).
    if digest_type == DigestType.MD5:
        return hashlib.md5(body).hexdigest().upper()
    if digest_type == DigestType.SHA1:
        return hashlib.sha1(body).hexdigest().upper()
    if digest_type == DigestType.CRC32:
        return format(zlib.crc32(body) & 0xFFFFFFFF, "08X")
    return None


@pytest.mark.timeout(90)
def test_receive_stream_shape(endpoint, client_config, clients, topic, group):
    route = raw_query_route(endpoint, client_config, topic)
    assert route.status.code == Code.OK, route.status
    queues = [q for q in route.message_queues
              if q.permission in (Permission.READ, Permission.READ_WRITE)]
    assert queues

    # Nothing there yet: exactly one status frame, OK or MESSAGE_NOT_FOUND, no message.
    empty = _raw_receive(endpoint, client_config, group, queues[0], long_poll_s=1)
    kinds = [r.WhichOneof("content") for r in empty]
    assert kinds.count("status") == 1 and "message" not in kinds, empty
    status = next(r.status for r in empty if r.WhichOneof("content") == "status")
    assert status.code in (Code.OK, Code.MESSAGE_NOT_FOUND), status

    producer = start_producer(client_config, clients, [topic])
    body = b"shape of a receive stream"
    mid = producer.send(new_message(topic, body, tag="s", keys=["k1"], properties={"p": "v"})).message_id

    responses = []
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        for q in queues:
            responses = _raw_receive(endpoint, client_config, group, q, long_poll_s=2)
            if any(r.WhichOneof("content") == "message" for r in responses):
                break
        else:
            continue
        break
    kinds = [r.WhichOneof("content") for r in responses]
    assert "message" in kinds, f"message not received: {responses}"
    statuses = [r.status for r in responses if r.WhichOneof("content") == "status"]
    assert len(statuses) == 1 and statuses[0].code == Code.OK, statuses
    # The PushConsumer computes a latency from this frame and fails the whole batch without it.
    assert "delivery_timestamp" in kinds, f"no delivery_timestamp frame: {kinds}"

    msgs = [r.message for r in responses if r.WhichOneof("content") == "message"]
    assert [m.system_properties.message_id for m in msgs] == [mid]
    m = msgs[0]
    sp = m.system_properties
    assert m.topic.name == topic and m.body == body
    assert sp.tag == "s" and list(sp.keys) == ["k1"] and dict(m.user_properties) == {"p": "v"}
    assert sp.message_type == MessageType.NORMAL
    assert sp.body_encoding in (Encoding.IDENTITY, Encoding.GZIP)
    assert sp.receipt_handle, "no receipt handle"
    assert sp.HasField("delivery_attempt") and sp.delivery_attempt == 1, sp
    want = _expected_checksum(sp.body_digest.type, body)
    assert want is not None, f"body_digest type unset: {sp.body_digest}"
    assert sp.body_digest.checksum == want, sp.body_digest


# ---------------------------------------------------------------------------------------------
# a) 1,000 messages, 1 B .. 4 MiB, each received exactly once with everything intact


@pytest.mark.timeout(900)
def test_roundtrip_1000_messages_exactly_once(endpoint, client_config, clients, topic, group):
    n = 1000
    sizes = body_sizes(n, seed=20240501)
    assert sizes.count(1) >= 1 and sizes.count(MAX_BODY) >= 1
    assert sum(sizes) < 150 * MiB

    consumer = start_simple_consumer(client_config, clients, group, topic)
    producer = start_producer(client_config, clients, [topic])

    rng = random.Random(7)
    sent = {}  # message id -> what the consumer must see
    for i, size in enumerate(sizes):
        body = rng.randbytes(size)
        tag = f"tag{i % 5}"
        keys = {f"key-{i}", f"order-{i % 97}"}
        props = {"idx": str(i), "size": str(size), "kind": "roundtrip"}
        msg = new_message(topic, body, tag=tag, keys=sorted(keys), properties=props)
        receipt = producer.send(msg)
        assert receipt.message_id, f"message {i}: empty message id in the send receipt"
        assert receipt.message_id == msg.message_id, (
            "the server must keep the client-generated message id "
            f"({msg.message_id}), it answered {receipt.message_id}"
        )
        assert receipt.message_id not in sent, f"duplicate message id {receipt.message_id}"
        sent[receipt.message_id] = {"md5": md5(body), "size": size, "tag": tag, "keys": keys,
                                    "props": props}
    del body

    acked = set()
    problems = []
    deadline = time.monotonic() + 600
    while len(acked) < n and time.monotonic() < deadline:
        for m in consumer.receive(32, 60):
            mid = m.message_id
            if mid not in sent:
                problems.append(f"unexpected message id {mid}")
                continue
            if mid in acked:
                problems.append(f"{mid} delivered again after it was acked")
                continue
            want = sent[mid]
            assert not m.corrupted, f"{mid}: the client's body digest check failed"
            assert m.topic == topic
            assert len(m.body) == want["size"], f"{mid}: body {len(m.body)} B, sent {want['size']} B"
            assert md5(m.body) == want["md5"], f"{mid}: body differs from what was sent"
            assert m.tag == want["tag"], f"{mid}: tag {m.tag!r}, sent {want['tag']!r}"
            assert set(m.keys) == want["keys"], f"{mid}: keys {m.keys}, sent {want['keys']}"
            assert dict(m.properties) == want["props"], (
                f"{mid}: user properties {dict(m.properties)}, sent {want['props']}"
            )
            assert m.delivery_attempt == 1, f"{mid}: first delivery has attempt {m.delivery_attempt}"
            assert m.receipt_handle, f"{mid}: no receipt handle"
            consumer.ack(m)
            acked.add(mid)
    assert not problems, problems[:20]
    assert len(acked) == n, f"received and acked {len(acked)} of {n} within the deadline"

    # Everything acked: nothing more on any queue.
    for _ in range(max(1, min(readable_queue_count(endpoint, client_config, topic), 16))):
        left = consumer.receive(32, 60)
        assert left == [], f"got {[m.message_id for m in left]} after all {n} were acked"


# ---------------------------------------------------------------------------------------------
# b) an un-acked message comes back after its invisible duration with delivery_attempt 2


@pytest.mark.timeout(180)
def test_unacked_message_redelivered_after_invisible_duration(client_config, clients, topic, group):
    consumer = start_simple_consumer(client_config, clients, group, topic)
    producer = start_producer(client_config, clients, [topic])
    body = b"redeliver-me " + uuid.uuid4().bytes
    mid = producer.send(new_message(topic, body, tag="b", keys=["b1"])).message_id

    first = []
    deadline = time.monotonic() + 60
    while not first and time.monotonic() < deadline:
        requested_at = time.monotonic()  # the invisibility starts no earlier than this
        first = consumer.receive(1, SHORT_INVISIBLE_S)
    assert [m.message_id for m in first] == [mid], "the sent message was not received"
    assert first[0].delivery_attempt == 1
    # not acked

    back = None
    deadline = time.monotonic() + SHORT_INVISIBLE_S + 60
    while back is None and time.monotonic() < deadline:
        for m in consumer.receive(1, LONG_INVISIBLE_S):
            returned_at = time.monotonic()
            assert m.message_id == mid, f"unexpected message {m.message_id}"
            assert returned_at - requested_at >= SHORT_INVISIBLE_S - EARLY_TOLERANCE_S, (
                f"handed out again {returned_at - requested_at:.2f}s after the receive, "
                f"before its {SHORT_INVISIBLE_S}s invisible duration ended"
            )
            back = m
    assert back is not None, "the un-acked message did not come back"
    assert back.delivery_attempt == 2, f"delivery_attempt {back.delivery_attempt}, want 2"
    assert md5(back.body) == md5(body) and not back.corrupted

    consumer.ack(back)
    again = receive_until(consumer, time.monotonic() + SHORT_INVISIBLE_S + 2 * SIMPLE_AWAIT_S,
                          lambda got: len(got) > 0)
    assert again == [], f"acked message came back: {[m.message_id for m in again]}"


# ---------------------------------------------------------------------------------------------
# c) change_invisible_duration pushes the deadline out; the new receipt handle acks


@pytest.mark.timeout(180)
def test_change_invisible_duration_extends_deadline(client_config, clients, topic, group):
    consumer = start_simple_consumer(client_config, clients, group, topic)
    producer = start_producer(client_config, clients, [topic])
    mid = producer.send(new_message(topic, b"extend-me", tag="c")).message_id

    got = []
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:
        got = consumer.receive(1, SHORT_INVISIBLE_S)
    assert [m.message_id for m in got] == [mid]
    msg = got[0]
    received_at = time.monotonic()
    old_handle = msg.receipt_handle

    consumer.change_invisible_duration(msg, LONG_INVISIBLE_S)
    assert msg.receipt_handle, "ChangeInvisibleDuration must answer with a receipt handle"
    changed_at = time.monotonic()
    assert changed_at - received_at < SHORT_INVISIBLE_S, "too slow to test the extension"

    # Past the original deadline (plus margin) and well inside the new one: still invisible.
    early = receive_until(consumer, received_at + SHORT_INVISIBLE_S + 5, lambda g: len(g) > 0)
    assert early == [], (
        f"came back {time.monotonic() - received_at:.1f}s after the receive although its "
        f"invisible duration was extended to {LONG_INVISIBLE_S}s "
        f"(old handle {old_handle!r}, new {msg.receipt_handle!r})"
    )
    assert time.monotonic() - changed_at < LONG_INVISIBLE_S - 5, "check ran into the new deadline"

    consumer.ack(msg)  # with the handle ChangeInvisibleDuration returned
    after = receive_until(consumer, time.monotonic() + 2 * SIMPLE_AWAIT_S, lambda g: len(g) > 0)
    assert after == [], f"acked message came back: {[m.message_id for m in after]}"


# ---------------------------------------------------------------------------------------------
# d) PushConsumer: listener consumes everything; a failed delivery is retried with a higher attempt


class RecordingListener(MessageListener):
    """Fails the first delivery of messages carrying property fail-first=yes, succeeds otherwise."""

    def __init__(self):
        self.lock = threading.Lock()
        self.expected = None  # set of message ids, known once everything is sent
        self.attempts = defaultdict(list)  # message id -> [(delivery_attempt, result)]
        self.bodies = {}
        self.done = threading.Event()

    def consume(self, message):
        mid = message.message_id
        with self.lock:
            first = mid not in self.attempts
            fail = first and message.properties.get("fail-first") == "yes"
            result = ConsumeResult.FAILURE if fail else ConsumeResult.SUCCESS
            self.attempts[mid].append((message.delivery_attempt, result))
            self.bodies[mid] = (md5(message.body), message.corrupted)
            succeeded = {m for m, a in self.attempts.items() if a[-1][1] == ConsumeResult.SUCCESS}
            if self.expected is not None and self.expected <= succeeded:
                self.done.set()
        return result


@pytest.mark.timeout(240)
def test_push_consumer_consumes_and_retries_failure(client_config, clients, topic, group):
    n = 20
    fail_index = 7
    producer = start_producer(client_config, clients, [topic])

    sent = {}
    listener = RecordingListener()
    consumer = PushConsumer(client_config, group, listener, {topic: FilterExpression()},
                            consumption_thread_count=4)
    consumer.startup()  # waits up to 10 s for the Telemetry settings reply
    clients.add(consumer)
    time.sleep(3)  # let it query its assignment and start long-polling before anything is sent

    fail_id = None
    for i in range(n):
        body = f"push {i} ".encode() + uuid.uuid4().bytes
        props = {"idx": str(i)}
        if i == fail_index:
            props["fail-first"] = "yes"
        mid = producer.send(new_message(topic, body, tag="d", properties=props)).message_id
        sent[mid] = md5(body)
        if i == fail_index:
            fail_id = mid
    with listener.lock:
        listener.expected = set(sent)
        if listener.expected <= {m for m, a in listener.attempts.items()
                                 if a[-1][1] == ConsumeResult.SUCCESS}:
            listener.done.set()

    finished = listener.done.wait(120)
    with listener.lock:
        attempts = {m: list(a) for m, a in listener.attempts.items()}
        bodies = dict(listener.bodies)
    assert finished, (
        f"not all consumed within 120 s: "
        f"{ {m: a for m, a in attempts.items()} } missing "
        f"{set(sent) - set(attempts)}"
    )

    assert set(attempts) == set(sent), f"unexpected ids {set(attempts) - set(sent)}"
    for mid, digest in sent.items():
        assert bodies[mid] == (digest, False), f"{mid}: body differs or corrupted"

    tries = attempts[fail_id]
    assert tries[0] == (1, ConsumeResult.FAILURE), tries
    assert len(tries) >= 2, tries
    assert tries[-1][1] == ConsumeResult.SUCCESS, tries
    assert tries[1][0] is not None and tries[1][0] >= 2, (
        f"redelivery after a failure must carry a higher delivery_attempt: {tries}"
    )
    for mid in sent:
        if mid != fail_id:
            assert attempts[mid] == [(1, ConsumeResult.SUCCESS)], (mid, attempts[mid])


# ---------------------------------------------------------------------------------------------
# unknown topic


@pytest.mark.timeout(120)
def test_send_to_unknown_topic_raises(endpoint, client_config, clients, topic):
    producer = start_producer(client_config, clients)  # no topics: routes are fetched on send
    assert producer.send(new_message(topic, b"known topic works")).message_id

    unknown = f"no_such_topic_{uuid.uuid4().hex[:10]}"
    with pytest.raises(Exception) as err:
        producer.send(new_message(unknown, b"nowhere to go"))
    e = err.value
    if isinstance(e, ClientException) and e.code is not None:
        # a route was handed out and SendMessage itself refused the topic
        assert e.code in (Code.TOPIC_NOT_FOUND, Code.NOT_FOUND), e
    else:
        # QueryRoute refused the topic; the client then raises a plain Exception
        assert "route" in str(e), repr(e)

    res = raw_query_route(endpoint, client_config, unknown)
    assert res.status.code == Code.TOPIC_NOT_FOUND, res.status


def test_send_to_a_broker_at_its_disk_floor_raises_too_many_requests(tmp_path, artifact_dir, clients):
    """Back-pressure: a shard below its free-space floor refuses sends with TOO_MANY_REQUESTS,
    which the client raises at once as TooManyRequestsException (its "system busy" signal,
    which applications retry later), instead of a timeout."""
    config = tmp_path / "floor.toml"
    # A floor above any disk's free space.
    config.write_text("[broker]\ndisk_free_min_bytes = 4611686018427387904\n")
    data = tmp_path / "data"
    data.mkdir()
    logs = artifact_dir / "disk-floor"
    logs.mkdir(exist_ok=True)
    server = SluiceServer(sluice_bin(), data, logs, extra_args=("--config", str(config)))
    server.start()
    try:
        topic = unique_name("full")
        SluiceCli(sluice_bin(), server.endpoint).create_topic(topic)
        client_config = ClientConfiguration(server.endpoint, Credentials(), request_timeout=REQUEST_TIMEOUT_S)
        producer = start_producer(client_config, clients, (topic,))
        with pytest.raises(TooManyRequestsException) as err:
            producer.send(new_message(topic, b"no room for me"))
        assert err.value.code == Code.TOO_MANY_REQUESTS, err.value
        assert "disk_free_min_bytes" in str(err.value) and "Retry later" in str(err.value), err.value
        clients.shutdown(producer)
    finally:
        server.stop()

