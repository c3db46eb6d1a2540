"""Request–reply between agents over lite topics: `sluice request` / `sluice reply` and the
proxy's HTTP route. A request carries reply_to = a2a/{taskId}; the requester leaves no
subscription behind, so the reply topic is reclaimed after its TTL.

Every wait is bounded; no assertion is about timing.
"""

import json
import subprocess
import urllib.error
import urllib.request

import pytest

from conftest import CLI_TIMEOUT_S, unique_name, sluice_bin
from test_sse import http_address


def topics(sluice, request):
    tasks = unique_name("tasks", request.node.name)
    replies = unique_name("replies", request.node.name)
    sluice.cli.run("topic", "create", tasks, "--endpoint", sluice.endpoint)
    sluice.cli.run("topic", "create", replies, "--type", "lite", "--lite-ttl-minutes", "1",
                   "--endpoint", sluice.endpoint)
    return tasks, replies


def start_replier(sluice, tasks, group, count, body=None):
    cmd = [str(sluice_bin()), "reply", "--topic", tasks, "--group", group, "--count", str(count),
           "--wait-secs", "2", "--endpoint", sluice.endpoint]
    if body is not None:
        cmd += ["--body", body]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def lite_clients(sluice):
    stats = json.loads(sluice.cli.run("--json", "stats", "--endpoint", sluice.endpoint).stdout)
    return sum(b["counters"].get("lite_clients", 0) for b in stats["brokers"])


def test_sluice_request_gets_the_reply_and_leaves_no_subscription(sluice, request):
    tasks, replies = topics(sluice, request)
    replier = start_replier(sluice, tasks, unique_name("workers"), 2)
    try:
        for text in ("summarize chapter 1", "translate it"):
            res = sluice.cli.run("--json", "request", "--topic", tasks, "--reply-topic", replies,
                                 "--timeout-secs", "30", text, "--endpoint", sluice.endpoint)
            reply = json.loads(res.stdout)
            assert reply["body"] == text, "the replier echoes the request"
            assert reply["lite_topic"].startswith("a2a/"), reply
            assert reply["properties"]["in_reply_to"], reply
        out, err = replier.communicate(timeout=CLI_TIMEOUT_S)
        assert replier.returncode == 0, err
    finally:
        if replier.poll() is None:
            replier.kill()
    assert lite_clients(sluice) == 0, "the requester unsubscribed when it left"


def test_sluice_request_times_out_with_a_clear_error(sluice, request):
    tasks, replies = topics(sluice, request)
    res = sluice.cli.run("request", "--topic", tasks, "--reply-topic", replies, "--timeout-secs", "1",
                         "nobody listens", "--endpoint", sluice.endpoint, check=False)
    assert res.returncode != 0
    assert "no reply" in res.stderr, res.stderr


def http_request(addr, tasks, replies, body, timeout_ms):
    url = f"http://{addr[0]}:{addr[1]}/v1/request/{tasks}?reply_topic={replies}&timeout_ms={timeout_ms}"
    req = urllib.request.Request(url, data=body.encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_ms / 1000 + 30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_http_request_route_returns_the_reply_or_504(sluice, request):
    addr = http_address(sluice)
    tasks, replies = topics(sluice, request)
    status, body = http_request(addr, tasks, replies, "anyone?", 500)
    assert status == 504, body
    assert "no reply" in body["message"]
    replier = start_replier(sluice, tasks, unique_name("workers"), 2, body="42")
    try:
        status, body = http_request(addr, tasks, replies, "the answer?", 30_000)
        assert status == 200, body
        assert body["reply"]["body"] == "42"
        assert body["reply_to"] == f"a2a/{body['task_id']}"
        assert body["reply"]["properties"]["in_reply_to"] == body["task_id"]
    finally:
        replier.kill()
        replier.wait(timeout=CLI_TIMEOUT_S)
