"""TLS with the unchanged official Python client (rocketmq-python-client 5.1.2): `tls_enable=True`
against `sluice local --tls-cert --tls-key`, with a certificate made by `openssl` for 127.0.0.1.

The client takes no CA of its own: it calls grpc.ssl_channel_credentials() with gRPC's default
roots, which GRPC_DEFAULT_SSL_ROOTS_FILE_PATH points at the test CA. gRPC reads that variable once
per process, so each client runs in a child Python with it set.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SluiceCli, SluiceServer, _tail, sluice_bin, unique_name

CHILD_TIMEOUT_S = 90

# The child: send two messages, then receive and ack them; prints one JSON line of results.
CLIENT = r"""
import json, sys, time
from rocketmq import ClientConfiguration, Credentials, FilterExpression, Message, Producer, SimpleConsumer

endpoint, topic, group, tls = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "tls"
config = ClientConfiguration(endpoint, Credentials(), request_timeout=5)
result = {"sent": [], "received": [], "error": None}
producer = consumer = None
try:
    producer = Producer(config, (topic,), tls_enable=tls)
    producer.startup()
    for body in (b"over-tls-1", b"over-tls-2"):
        m = Message()
        m.topic = topic
        m.body = body
        result["sent"].append(producer.send(m).message_id)
    consumer = SimpleConsumer(config, group, {topic: FilterExpression()}, await_duration=2, tls_enable=tls)
    consumer.startup()
    deadline = time.monotonic() + 30
    while len(result["received"]) < 2 and time.monotonic() < deadline:
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
print(json.dumps(result), flush=True)
"""


def openssl(cwd, *args):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A test CA and a server certificate it signed for 127.0.0.1."""
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl(d, "req", "-x509", *ec, "-days", "2", "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=sluice-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    openssl(d, "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                                  "extendedKeyUsage=serverAuth\n")
    openssl(d, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "server.ext", "-out", "server.pem")
    return d


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, artifact_dir, certs):
    log_dir = artifact_dir / "tls"
    log_dir.mkdir(exist_ok=True)
    server = SluiceServer(sluice_bin(), tmp_path_factory.mktemp("sluice-tls-data"), log_dir,
                          ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")])
    server.start()
    yield server
    server.stop()


def create_topic(server, certs, request):
    name = unique_name("t", request.node.name)
    SluiceCli(sluice_bin(), server.endpoint).run(
        "topic", "create", name, "--type", "normal", "--endpoint", server.endpoint, "--tls-ca", str(certs / "ca.pem"))
    return name


def run_client(server, certs, topic, group, mode):
    env = dict(os.environ, GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=str(certs / "ca.pem"))
    res = subprocess.run([sys.executable, "-c", CLIENT, server.endpoint, topic, group, mode],
                         env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                         cwd=Path(__file__).parent)
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    assert lines, f"the client printed no result (exit {res.returncode})\n{res.stderr[-4000:]}"
    return json.loads(lines[-1])


@pytest.mark.timeout(150)
def test_tls_client_sends_and_receives(tls_server, certs, request):
    topic = create_topic(tls_server, certs, request)
    result = run_client(tls_server, certs, topic, unique_name("g", request.node.name), "tls")
    assert result["error"] is None, f"{result}\n--- sluice stderr ---\n{_tail(tls_server.stderr_path)}"
    assert len(result["sent"]) == 2
    assert sorted(result["received"]) == ["over-tls-1", "over-tls-2"]


@pytest.mark.timeout(150)
def test_plaintext_client_is_refused_by_the_tls_port(tls_server, certs, request):
    topic = create_topic(tls_server, certs, request)
    result = run_client(tls_server, certs, topic, unique_name("g", request.node.name), "plaintext")
    assert result["error"] is not None and result["sent"] == [], f"a plaintext client was served: {result}"
    assert "without TLS to the gRPC port" in _tail(tls_server.stderr_path, 400)
