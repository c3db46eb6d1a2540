"""Fixtures for the official-client tests: one `sluice local` per session (per pytest-xdist
worker), a fresh topic and a fresh consumer group per test, bounded shutdown of every client a
test starts.

Environment:
  SLUICE_BIN               the sluice binary (default: <repo>/target/debug/sluice)
  SLUICE_ENDPOINT          host:port of an already running proxy; when set no server is started
                           (topics are still made with `$SLUICE_BIN topic create --endpoint ...`)
  SLUICE_PY_ARTIFACT_DIR   where the server's stdout/stderr and the client's log go
                           (default: a directory under pytest's basetemp; a subdirectory per
                           pytest-xdist worker)
"""

import atexit
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

# Importing rocketmq configures its logger (a rotating file under ~/logs/rocketmq_python/);
# the client_logging fixture below redirects it.
from rocketmq import ClientConfiguration, Credentials

REPO = Path(__file__).resolve().parents[3]
DEFAULT_BIN = REPO / "target" / "debug" / "sluice"

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 30  # until the gRPC port accepts TCP
STOP_GRACE_S = 10  # SIGTERM, then SIGKILL
CLI_TIMEOUT_S = 60  # any one `sluice topic ...` invocation
CLIENT_SHUTDOWN_TIMEOUT_S = 30  # any one client's shutdown()
# The client's per-RPC deadline, whole seconds: the client copies it into Settings.request_timeout
# (a protobuf Duration's `seconds`, so it must be an int).
REQUEST_TIMEOUT_S = 10

CLIENT_LOGGER = "rocketmq-python-client"

_server = None  # the running SluiceServer, for failure reports


def sluice_bin():
    path = Path(os.environ.get("SLUICE_BIN") or DEFAULT_BIN)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"sluice binary not found or not executable: {path} "
            "(build it with `cargo build -p sluice` or point SLUICE_BIN at it)",
            pytrace=False,
        )
    return path


def unique_name(prefix, hint=""):
    """A name valid as a RocketMQ topic or group (^[%a-zA-Z0-9_-]+$), unique per call."""
    hint = re.sub(r"[^A-Za-z0-9_-]", "_", hint)[:40]
    return f"{prefix}_{hint}_{uuid.uuid4().hex[:10]}" if hint else f"{prefix}_{uuid.uuid4().hex[:10]}"


def _tail(path, lines=80):
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])


def _free_ports(n):
    """n distinct currently free TCP ports on HOST (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _set_parent_death_signal():
    """In the child before exec: get SIGTERM if pytest dies, so no server outlives the run."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except Exception:  # best effort only
            pass


class SluiceServer:
    """`sluice local` on free ports, stdout/stderr to files."""

    def __init__(self, binary, data_dir, log_dir, extra_args=()):
        self.binary = Path(binary)
        self.extra_args = list(extra_args)
        self.data_dir = Path(data_dir)
        self.log_dir = Path(log_dir)
        self.proc = None
        self.endpoint = None
        self.http = None
        self.stdout_path = self.log_dir / "sluice-local.stdout.log"
        self.stderr_path = self.log_dir / "sluice-local.stderr.log"

    def start(self):
        attempts = 3  # only retried when the port we picked was taken meanwhile
        for attempt in range(1, attempts + 1):
            grpc_port, http_port = _free_ports(2)
            self.endpoint = f"{HOST}:{grpc_port}"
            self.http = f"{HOST}:{http_port}"
            cmd = [
                str(self.binary), "local",
                "--data-dir", str(self.data_dir),
                "--grpc", self.endpoint,
                "--http", self.http,
                *self.extra_args,
            ]
            with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
                banner = f"\n==== attempt {attempt}: {' '.join(cmd)}\n".encode()
                out.write(banner)
                err.write(banner)
                out.flush()
                err.flush()
                self.proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=str(self.data_dir),
                    preexec_fn=_set_parent_death_signal,
                )
            atexit.register(self.stop)
            outcome = self._wait_listening(grpc_port)
            if outcome == "up":
                return
            tail = _tail(self.stderr_path)
            self.stop()
            if outcome == "exited" and re.search(r"in use", tail, re.I) and attempt < attempts:
                continue
            pytest.fail(
                (f"`sluice local` exited early (exit code {self.proc.returncode})"
                 if outcome == "exited" else
                 f"`sluice local` did not accept TCP on {self.endpoint} within {STARTUP_TIMEOUT_S}s")
                + "\n"
                f"command: {' '.join(cmd)}\n--- stderr (tail) ---\n{tail}\n"
                f"--- stdout (tail) ---\n{_tail(self.stdout_path)}",
                pytrace=False,
            )

    def _wait_listening(self, port):
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return "exited"
            try:
                with socket.create_connection((HOST, port), timeout=1):
                    return "up"
            except OSError:
                time.sleep(0.1)
        return "timeout"

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_GRACE_S)


class SluiceCli:
    """`sluice topic ...` against the running proxy."""

    def __init__(self, binary, endpoint):
        self.binary = Path(binary)
        self.endpoint = endpoint

    def run(self, *args, check=True):
        cmd = [str(self.binary), *args]
        try:
            res = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"`{' '.join(cmd)}` did not finish within {CLI_TIMEOUT_S}s: {e}", pytrace=False)
        if check and res.returncode != 0:
            pytest.fail(
                f"`{' '.join(cmd)}` exited {res.returncode}\n--- stdout ---\n{res.stdout}"
                f"\n--- stderr ---\n{res.stderr}",
                pytrace=False,
            )
        return res

    def create_topic(self, name, kind="normal"):
        self.run("topic", "create", name, "--type", kind, "--endpoint", self.endpoint)

    def delete_topic(self, name):
        return self.run("topic", "delete", name, "--endpoint", self.endpoint, check=False)


class Sluice:
    def __init__(self, endpoint, cli, server=None):
        self.endpoint = endpoint
        self.cli = cli
        self.server = server


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory):
    env = os.environ.get("SLUICE_PY_ARTIFACT_DIR")
    path = Path(env) if env else tmp_path_factory.mktemp("artifacts")
    # Under pytest-xdist each worker is a session with its own server: its own directory.
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        path = path / worker
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session", autouse=True)
def client_logging(artifact_dir):
    """Send the client's log to the artifact dir and let pytest capture it for failing tests."""
    logger = logging.getLogger(CLIENT_LOGGER)
    saved = (list(logger.handlers), logger.propagate, logger.level)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler = logging.FileHandler(artifact_dir / "rocketmq_client.log")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(threadName)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = True
    yield
    logger.removeHandler(handler)
    handler.close()
    for h in saved[0]:
        logger.addHandler(h)
    logger.propagate, logger.level = saved[1], saved[2]


@pytest.fixture(scope="session")
def sluice(tmp_path_factory, artifact_dir):
    """The proxy under test: SLUICE_ENDPOINT, or a `sluice local` started for this session."""
    global _server
    binary = sluice_bin()
    external = os.environ.get("SLUICE_ENDPOINT")
    if external:
        yield Sluice(external, SluiceCli(binary, external))
        return
    server = SluiceServer(binary, tmp_path_factory.mktemp("sluice-data"), artifact_dir)
    server.start()
    _server = server
    try:
        yield Sluice(server.endpoint, SluiceCli(binary, server.endpoint), server)
    finally:
        _server = None
        server.stop()
        # The broker preallocates its segments (GiBs); pytest would keep three runs of them.
        shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def endpoint(sluice):
    return sluice.endpoint


@pytest.fixture(scope="session")
def client_config(endpoint):
    # Plain "host:port" (no scheme) -> IPv4 endpoints, insecure gRPC channel (tls_enable=False is
    # every client's default). Credentials() must be passed: None breaks request signing.
    return ClientConfiguration(endpoint, Credentials(), request_timeout=REQUEST_TIMEOUT_S)


@pytest.fixture(autouse=True)
def server_still_alive(request):
    """After each test: the server must not have died under it."""
    yield
    server = _server
    if server is not None and server.proc is not None and not server.alive():
        pytest.fail(
            f"`sluice local` exited (code {server.proc.returncode}) during {request.node.name}\n"
            f"--- stderr (tail) ---\n{_tail(server.stderr_path)}",
            pytrace=False,
        )


@pytest.fixture
def topic(sluice, request):
    """A freshly created normal topic, deleted (best effort) afterwards."""
    name = unique_name("t", request.node.name)
    sluice.cli.create_topic(name, "normal")
    yield name
    sluice.cli.delete_topic(name)


@pytest.fixture
def group(request):
    return unique_name("g", request.node.name)


class Clients:
    """Clients a test started; shut down at teardown, each bounded in time."""

    def __init__(self):
        self._clients = []

    def add(self, client):
        self._clients.append(client)
        return client

    def shutdown(self, client):
        if client in self._clients:
            self._clients.remove(client)
        return _bounded_shutdown(client)

    def close_all(self):
        errors = []
        while self._clients:
            err = _bounded_shutdown(self._clients.pop())
            if err:
                errors.append(err)
        return errors


def _bounded_shutdown(client):
    """shutdown() in a helper thread; a hung shutdown must not hang the run."""
    result = {}

    def run():
        try:
            client.shutdown()
        except Exception as e:  # reported, not raised: teardown keeps going
            result["error"] = e

    t = threading.Thread(target=run, name="client-shutdown", daemon=True)
    t.start()
    t.join(CLIENT_SHUTDOWN_TIMEOUT_S)
    if t.is_alive():
        return f"{client} shutdown did not finish within {CLIENT_SHUTDOWN_TIMEOUT_S}s"
    if "error" in result:
        return f"{client} shutdown raised {result['error']!r}"
    return None


@pytest.fixture
def clients():
    c = Clients()
    yield c
    errors = c.close_all()
    if errors:
        logging.getLogger(__name__).warning("client shutdown problems: %s", errors)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    server = _server
    if report.failed and server is not None:
        report.sections.append(("sluice local stderr (tail)", _tail(server.stderr_path, 60)))
