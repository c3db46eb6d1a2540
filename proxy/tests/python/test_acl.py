"""Access control with the unchanged official Python client (rocketmq-python-client 5.1.2):
`Credentials(ak, sk)` against `sluice local` with `proxy.acl = true`, rules set by `sluice acl`.

Each client runs in a child Python, so a client the proxy refuses cannot leave threads behind in
the test process.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SluiceCli, SluiceServer, _tail, sluice_bin, unique_name

CHILD_TIMEOUT_S = 90

KEYS = {"root": "secret-root", "app1": "secret-1", "app2": "secret-2"}

CONFIG = """
[proxy]
acl = true
access_keys = [
  { access_key = "root", secret_key = "secret-root", admin = true },
  { access_key = "app1", secret_key = "secret-1" },
  { access_key = "app2", secret_key = "secret-2" },
]
"""

# The child: send one message as (ak, sk), then (with a group) receive and ack it; prints one
# JSON line of results. The client raises a generic "failed to fetch route" when its route query
# is refused and logs the status itself, so the child keeps the client's error log lines too.
CLIENT = r"""
import json, logging, sys, time
from rocketmq import ClientConfiguration, Credentials, FilterExpression, Message, Producer, SimpleConsumer

logged = []
class Keep(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.ERROR:
            logged.append(record.getMessage()[:2000])
logging.getLogger("rocketmq-python-client").addHandler(Keep())

endpoint, topic, group, ak, sk = sys.argv[1:6]
config = ClientConfiguration(endpoint, Credentials(ak, sk), request_timeout=5)
result = {"sent": [], "received": [], "error": None, "stage": "producer"}
producer = consumer = None
try:
    producer = Producer(config, (topic,))
    producer.startup()
    m = Message()
    m.topic = topic
    m.body = b"under-acl"
    result["sent"].append(producer.send(m).message_id)
    if group:
        result["stage"] = "consumer"
        consumer = SimpleConsumer(config, group, {topic: FilterExpression()}, await_duration=2)
        consumer.startup()
        deadline = time.monotonic() + 30
        while not result["received"] and time.monotonic() < deadline:
            for m in consumer.receive(16, 30):
                result["received"].append(m.body.decode())
                consumer.ack(m)
except Exception as e:
    result["error"] = f"{type(e).__name__}: {e}"
finally:
    for client in (consumer, producer):
        try:
            if client is not None:
                client.shutdown()
        except Exception:
            pass
result["logged"] = logged[-20:]
print(json.dumps(result), flush=True)
"""


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory, artifact_dir):
    log_dir = artifact_dir / "acl"
    log_dir.mkdir(exist_ok=True)
    config = tmp_path_factory.mktemp("acl-config") / "acl.toml"
    config.write_text(CONFIG)
    server = SluiceServer(sluice_bin(), tmp_path_factory.mktemp("sluice-acl-data"), log_dir, ["--config", str(config)])
    server.start()
    yield server
    server.stop()


def admin(server, *args):
    """A `sluice` admin command signed with the admin key."""
    return SluiceCli(sluice_bin(), server.endpoint).run(
        *args, "--endpoint", server.endpoint, "--access-key", "root", "--secret-key", KEYS["root"])


def run_client(server, topic, group, ak):
    res = subprocess.run([sys.executable, "-c", CLIENT, server.endpoint, topic, group, ak, KEYS.get(ak, "wrong")],
                         capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, cwd=Path(__file__).parent)
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    assert lines, f"the client printed no result (exit {res.returncode})\n{res.stderr[-4000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def topics(acl_server):
    """app1 may publish and subscribe to `orders_…*` as groups `billing_…*`; app2 only publishes to `audit_…`."""
    prefix, audit, billing = unique_name("orders"), unique_name("audit"), unique_name("billing")
    orders = prefix + "_eu"
    for name in (orders, audit):
        admin(acl_server, "topic", "create", name, "--type", "normal")
    admin(acl_server, "acl", "set", "app1", f"topic:{prefix}*", "--allow", "pub,sub")
    admin(acl_server, "acl", "set", "app1", f"group:{billing}*", "--allow", "sub")
    admin(acl_server, "acl", "set", "app2", f"topic:{audit}", "--allow", "pub")
    return {"orders": orders, "audit": audit, "billing": billing}


def refusal(result):
    """The client's error and the statuses it logged."""
    return " | ".join([result["error"] or "", *result["logged"]])


def forbidden(result):
    return result["error"] is not None and "40300" in refusal(result)


@pytest.mark.timeout(150)
def test_allowed_key_sends_and_receives(acl_server, topics):
    result = run_client(acl_server, topics["orders"], topics["billing"] + "-1", "app1")
    assert result["error"] is None, f"{result}\n--- sluice stderr ---\n{_tail(acl_server.stderr_path)}"
    assert len(result["sent"]) == 1 and result["received"] == ["under-acl"]


@pytest.mark.timeout(150)
def test_another_keys_topic_is_forbidden(acl_server, topics):
    result = run_client(acl_server, topics["audit"], "", "app1")
    assert result["sent"] == [], f"app1 published to app2's topic: {result}"
    assert forbidden(result) and f'topic "{topics["audit"]}"' in refusal(result), result


@pytest.mark.timeout(150)
def test_a_group_without_a_rule_is_forbidden(acl_server, topics):
    result = run_client(acl_server, topics["orders"], unique_name("other"), "app1")
    assert result["stage"] == "consumer" and result["received"] == [], result
    assert forbidden(result) and "group" in refusal(result), result


@pytest.mark.timeout(150)
def test_wrong_secret_is_unauthorized(acl_server, topics):
    result = run_client(acl_server, topics["orders"], "", "nobody")
    assert result["sent"] == [] and result["error"] is not None, result
    assert "40100" in refusal(result) and "unknown access key" in refusal(result), result
