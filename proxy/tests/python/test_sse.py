"""Lite topics over the proxy's HTTP port: Server-Sent Events that resume exactly where the
client left off (Last-Event-ID or ?from=), appends over POST, the `done` event, and a real
browser (headless Chromium) whose EventSource loses its connection mid-stream and still shows
the whole stream in order.

Every wait is bounded; no assertion is about timing.
"""

import http.client
import http.server
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

import pytest

from conftest import unique_name

WAIT_S = 60


def http_address(sluice):
    if sluice.server is None:
        pytest.skip("needs the proxy's HTTP port (not known with SLUICE_ENDPOINT)")
    host, port = sluice.server.http.rsplit(":", 1)
    return host, int(port)


def lite_topic(sluice, request):
    name = unique_name("sse", request.node.name)
    sluice.cli.run("topic", "create", name, "--type", "lite", "--queues", "4", "--endpoint", sluice.endpoint)
    return name


def post(addr, topic, lite, body, done=False):
    query = "?done=true" if done else ""
    req = urllib.request.Request(f"http://{addr[0]}:{addr[1]}/v1/lite/{topic}/{lite}/messages{query}",
                                 data=body.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as reply:
        return json.loads(reply.read())


class EventReader:
    """A raw SSE client: one HTTP connection, events parsed as they arrive."""

    def __init__(self, addr, path, headers=None):
        self.conn = http.client.HTTPConnection(addr[0], addr[1], timeout=WAIT_S)
        self.conn.request("GET", path, headers=headers or {})
        self.response = self.conn.getresponse()
        assert self.response.status == 200, self.response.read()
        assert self.response.getheader("content-type", "").startswith("text/event-stream")

    def next_event(self):
        """(event, id, data) of the next event; None when the stream ended."""
        fields = {}
        while True:
            line = self.response.readline()
            if not line:
                return None
            line = line.decode().rstrip("\n")
            if line == "":
                if "data" in fields:
                    return fields.get("event", "message"), fields.get("id"), fields["data"]
                fields = {}
                continue
            if line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            fields[key] = value[1:] if value.startswith(" ") else value

    def close(self):
        self.conn.close()


def test_sse_resumes_exactly_after_the_last_event_seen(sluice, request):
    addr = http_address(sluice)
    topic = lite_topic(sluice, request)
    lite = "chat-session-1"
    for i in range(5):
        assert post(addr, topic, lite, f"token {i}")["offset"] == i
    reader = EventReader(addr, f"/v1/lite/{topic}/{lite}/events")
    seen = [reader.next_event() for _ in range(3)]
    reader.close()  # the connection drops after the third event
    assert [(e, i) for e, i, _ in seen] == [("message", "0"), ("message", "1"), ("message", "2")]
    assert [json.loads(d)["body"] for _, _, d in seen] == ["token 0", "token 1", "token 2"]
    for i in range(5, 8):
        post(addr, topic, lite, f"token {i}", done=(i == 7))
    resumed = EventReader(addr, f"/v1/lite/{topic}/{lite}/events", {"Last-Event-ID": seen[-1][1]})
    events = []
    while (event := resumed.next_event()) is not None:
        events.append(event)
    assert [json.loads(d)["body"] for e, _, d in events if e == "message"] == [f"token {i}" for i in range(3, 8)]
    assert [i for e, i, _ in events if e == "message"] == [str(i) for i in range(3, 8)], "id is the offset"
    assert events[-1][0] == "done", "the stream ends with a done event"
    # ?from= starts at an offset; resuming after the done message gets `done` again at once.
    from_six = EventReader(addr, f"/v1/lite/{topic}/{lite}/events?from=6")
    assert json.loads(from_six.next_event()[2])["body"] == "token 6"
    from_six.close()
    after_done = EventReader(addr, f"/v1/lite/{topic}/{lite}/events", {"Last-Event-ID": "7"})
    assert after_done.next_event()[0] == "done"
    assert after_done.next_event() is None


def test_sse_refuses_bad_input_with_clear_errors(sluice, request):
    addr = http_address(sluice)
    topic = lite_topic(sluice, request)
    conn = http.client.HTTPConnection(*addr, timeout=10)
    for path, headers, status in [
        (f"/v1/lite/{topic}/has%20space/events", {}, 400),
        (f"/v1/lite/no_such_topic_{os.getpid()}/x/events", {}, 404),
        (f"/v1/lite/{topic}/x/events", {"Last-Event-ID": "not-a-number"}, 400),
    ]:
        conn.request("GET", path, headers=headers)
        reply = conn.getresponse()
        body = json.loads(reply.read())
        assert reply.status == status, (path, body)
        assert body["message"], body


class Relay:
    """A TCP relay between the browser and the proxy that the test can cut."""

    def __init__(self, target):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.sockets = []
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(None)
            with self.lock:
                self.sockets += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        """Kills every connection through the relay (new ones are still accepted)."""
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self):
        self.listener.close()
        self.cut()


PAGE = """<!doctype html>
<html><body><pre id="out"></pre><script>
const got = [];
let opens = 0;
const es = new EventSource("%(events)s");
es.onopen = () => { opens += 1; fetch("/progress", {method: "POST", body: JSON.stringify({opens, n: got.length})}); };
es.addEventListener("message", (e) => {
  got.push(JSON.parse(e.data).body);
  document.getElementById("out").textContent = got.join("\\n");
  fetch("/progress", {method: "POST", body: JSON.stringify({opens, n: got.length})});
});
es.addEventListener("done", () => {
  es.close();
  fetch("/result", {method: "POST", body: JSON.stringify({got, opens, shown: document.getElementById("out").textContent})});
});
</script></body></html>
"""


class PageServer:
    """Serves the page and collects what it reports."""

    def __init__(self, page):
        self.progress = {"opens": 0, "n": 0}
        self.result = None
        self.changed = threading.Condition()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = page.encode()
                self.send_response(200)
                self.send_header("content-type", "text/html")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                data = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with outer.changed:
                    if self.path == "/result":
                        outer.result = data
                    elif (data["opens"], data["n"]) >= (outer.progress["opens"], outer.progress["n"]):
                        # The page's reports are fetches it does not await, so they can arrive
                        # out of order: an older one must not overwrite a newer one.
                        outer.progress = data
                    outer.changed.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, what, predicate, within_s=WAIT_S):
        deadline = time.monotonic() + within_s
        with self.changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"the page did not get to: {what} (progress {self.progress})", pytrace=False)
                self.changed.wait(left)

    def close(self):
        self.server.shutdown()


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no chromium: install Debian's `chromium` (scripts/setup.sh does)", pytrace=False)


@pytest.mark.timeout(180)
def test_a_browser_eventsource_resumes_after_its_connection_is_killed(sluice, request):
    addr = http_address(sluice)
    topic = lite_topic(sluice, request)
    lite = "browser-session"
    relay = Relay(addr)
    page = PageServer(PAGE % {"events": f"http://127.0.0.1:{relay.port}/v1/lite/{topic}/{lite}/events"})
    profile = tempfile.mkdtemp(prefix="sluice-chromium-")
    browser = subprocess.Popen(
        [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"http://127.0.0.1:{page.port}/"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        page.wait_for("the stream opened", lambda: page.progress["opens"] >= 1)
        for i in range(5):
            post(addr, topic, lite, f"part {i}")
        page.wait_for("five messages", lambda: page.progress["n"] >= 5)
        relay.cut()  # the browser's connection dies mid-stream
        for i in range(5, 10):
            post(addr, topic, lite, f"part {i}", done=(i == 9))
        page.wait_for("the done event", lambda: page.result is not None)
        want = [f"part {i}" for i in range(10)]
        assert page.result["got"] == want, "the whole stream, in order, each part once"
        assert page.result["shown"] == "\n".join(want), "and the page shows it"
        assert page.result["opens"] >= 2, "the EventSource reconnected"
        assert relay.accepted >= 2
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=10)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait(timeout=10)
        page.close()
        relay.close()
        shutil.rmtree(profile, ignore_errors=True)
