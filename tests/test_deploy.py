"""Kubernetes deployment, tested as far as this machine allows.

No cluster or Docker engine here: manifests are validated against the official
schemas offline; a pod is emulated from the Deployment and the Dockerfile; a
real nginx stands in for ingress-nginx; real headless Chromium drives the demo.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import ACTIONLOOP, EXAMPLES, ROOT, TIME_FACTOR, ask, concurrently, make_zip
from deploy_helpers import (
    CHROMIUM_ARGS,
    ApiServer,
    Bucket,
    Nginx,
    Pod,
    Redis,
    browser_home,
    dockerfile,
    expand,
    generate,
    kube,
    need,
    play_probes,
    validate,
)
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from actionloop.config import from_env
from actionloop.kube_cli import kube_parser

TIMEOUT = 20 * TIME_FACTOR


# Each checked-in example and the command that prints it (README: Deploy on Kubernetes).
EXAMPLE_MANIFESTS = {
    "hello.yaml": ("--name", "hello", "--path", "/hello", "--demo"),
    "hello-redis.yaml": (
        "--name",
        "hello",
        "--path",
        "/hello",
        "--demo",
        "--replicas",
        "2",
        "--with-redis",
        "--api-token-secret",
        "hello-api",
    ),
}


@pytest.mark.parametrize("example", sorted(EXAMPLE_MANIFESTS))
def test_checked_in_manifest_is_current(example: str) -> None:
    """Each deploy/*.yaml example is exactly what the generator prints for examples/hello.py."""
    done = subprocess.run(
        [ACTIONLOOP, "kube", "examples/hello.py", *EXAMPLE_MANIFESTS[example]],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert done.stdout.decode() == (ROOT / "deploy" / example).read_text()


@pytest.mark.parametrize(
    "args",
    [
        ("--name", "hello", "--demo"),
        (
            "--name",
            "echo",
            "--path",
            "/ws/echo",
            "--host",
            "echo.example.com",
            "--replicas",
            "3",
            "--namespace",
            "actions",
        ),
        ("--name", "big", "--url", "https://downloads.example.com/hello.py", "--replicas", "2"),
        ("--name", "big", "--volume-claim", "actions", "--autoscale", "2:10", "--cpu-target", "50"),
        ("--name", "big", "--image", "registry.example.com/big:1", "--action-in-image", "--with-redis"),
    ],
)
def test_manifests_validate(args: tuple[str, ...]) -> None:
    """Every generated document validates against the Kubernetes 1.33 schemas."""
    docs = generate(EXAMPLES / "hello.py", *args)
    assert set(docs) >= {"Deployment", "Service", "Ingress"}
    assert ("ConfigMap" in docs) == (not {"--url", "--volume-claim", "--action-in-image"} & set(args))
    for doc in docs.values():
        validate(doc)
    deployment = docs["Deployment"]["spec"]
    pod_spec = deployment["template"]["spec"]
    container = pod_spec["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    timeout = int(docs["Ingress"]["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"])
    assert float(env["OW_WEBSOCKET_PING"]) * 2 < min(timeout, 60)
    assert pod_spec["terminationGracePeriodSeconds"] > float(env["OW_DRAIN_TIMEOUT"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # A Service named `ow` must not set OW_PORT=tcp://... in the pods.
    assert pod_spec["enableServiceLinks"] is False
    # A new pod is ready before an old one is told to drain.
    assert deployment["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}


def test_readme_names_every_kube_flag() -> None:
    """README: Deploy on Kubernetes names every flag of `actionloop kube`."""
    readme = (ROOT / "README.md").read_text()
    flags = {flag for action in kube_parser()._actions for flag in action.option_strings if flag.startswith("--")}
    assert {flag for flag in flags - {"--help"} if f"{flag} " not in readme and f"{flag}`" not in readme} == set()


def test_zip_goes_to_binary_data(tmp_path: Path) -> None:
    """A zip action is carried as binaryData and still validates."""
    action = tmp_path / "action.zip"
    action.write_bytes(make_zip({"__main__.py": "def main(a):\n    return a\n"}))
    docs = generate(action, "--name", "zipped")
    assert "action.zip" in docs["ConfigMap"]["binaryData"]
    validate(docs["ConfigMap"])


def test_schema_check_can_fail() -> None:
    """The validator refuses what Kubernetes would (so the checks above mean something)."""
    docs = generate(EXAMPLES / "hello.py", "--name", "hello")
    broken = json.loads(json.dumps(docs["Deployment"]))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(Exception):  # noqa: B017 - any validation error will do
        validate(broken)


@pytest.fixture
def pod(tmp_path: Path) -> Any:
    pods: list[Pod] = []

    def start(
        action: Path,
        *args: str,
        claims: dict[str, Path] | None = None,
        build_args: dict[str, str] | None = None,
        ready: bool = True,
        **env: str,
    ) -> Pod:
        docs = generate(action, "--name", "hello", *args)
        started = Pod(docs, tmp_path / f"pod{len(pods)}", None, None, claims, build_args, **env)
        pods.append(started)
        return started.wait_ready() if ready else started

    yield start
    for started in pods:
        started.stop()


def test_pod_serves_and_probes(pod: Any) -> None:
    """The emulated pod becomes ready, answers on its WebSocket path and stays live."""
    running = pod(EXAMPLES / "hello.py", "--path", "/hello")
    assert running.get("/healthz")[0] == 200
    with connect(f"ws://127.0.0.1:{running.port}/hello", open_timeout=TIMEOUT) as ws:
        assert ask(ws, {"name": "pod"}) == {"greeting": "Hello, pod!"}
    assert "hello called with name='pod'" in running.logs()


SLOW = (
    "import time\ndef main(args):\n    time.sleep(args.get('sleep', 0))\n    return {'slept': args.get('sleep', 0)}\n"
)


def test_pod_drains_on_sigterm(pod: Any, tmp_path: Path) -> None:
    """SIGTERM: in-flight reply delivered, then 1001; no new connections; exit 0."""
    action = tmp_path / "slow.py"
    action.write_text(SLOW)
    running = pod(action, "--path", "/slow")
    url = f"ws://127.0.0.1:{running.port}/slow"
    with connect(url, open_timeout=TIMEOUT) as busy, connect(url, open_timeout=TIMEOUT) as idle:
        assert ask(idle, {}) == {"slept": 0}
        busy.send(json.dumps({"sleep": 1}))
        time.sleep(0.3)
        running.process.send_signal(15)
        with pytest.raises(ConnectionClosed) as idle_closed:
            idle.recv(timeout=TIMEOUT)
        assert idle_closed.value.rcvd is not None and idle_closed.value.rcvd.code == 1001
        assert json.loads(busy.recv(timeout=TIMEOUT)) == {"slept": 1}
        with pytest.raises(ConnectionClosed) as busy_closed:
            busy.recv(timeout=TIMEOUT)
        assert busy_closed.value.rcvd is not None and busy_closed.value.rcvd.code == 1001
        with pytest.raises((OSError, InvalidStatus)):
            connect(url, open_timeout=2).close()
    assert running.process.wait(running.grace) == 0


def test_through_nginx(pod: Any, tmp_path: Path) -> None:
    """A WebSocket conversation through nginx configured from the Ingress."""
    running = pod(EXAMPLES / "hello.py", "--path", "/hello")
    proxy = Nginx(generate(EXAMPLES / "hello.py", "--name", "hello")["Ingress"], [running.port], tmp_path / "nginx")
    try:
        with connect(f"ws://127.0.0.1:{proxy.port}/hello", open_timeout=TIMEOUT) as ws:
            for i in range(20):
                assert ask(ws, {"name": f"n{i}"}) == {"greeting": f"Hello, n{i}!"}
    finally:
        proxy.stop()


@pytest.mark.parametrize("ping", ["1", "0"])
def test_idle_connection_survives_nginx_timeout(pod: Any, tmp_path: Path, ping: str) -> None:
    """With a 3 s proxy read timeout, 1 s pings keep a silent connection open 10 s; without pings nginx cuts it."""
    need("nginx")
    running = pod(EXAMPLES / "hello.py", "--path", "/hello", OW_WEBSOCKET_PING=ping)
    ingress = generate(EXAMPLES / "hello.py", "--name", "hello")["Ingress"]
    proxy = Nginx(ingress, [running.port], tmp_path / "nginx", read_timeout=3)
    try:
        with connect(f"ws://127.0.0.1:{proxy.port}/hello", open_timeout=TIMEOUT, ping_interval=None) as ws:
            assert ask(ws, {"name": "before"}) == {"greeting": "Hello, before!"}
            time.sleep(10)
            if ping == "1":
                assert ask(ws, {"name": "after"}) == {"greeting": "Hello, after!"}
            else:
                with pytest.raises(ConnectionClosed):
                    ask(ws, {"name": "after"})
    finally:
        proxy.stop()


def test_demo_page_in_chromium(pod: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real headless Chromium opens the demo page, types a name, clicks Send, sees the greeting."""
    chromium = need("chromium")
    playwright_api = pytest.importorskip("playwright.sync_api")
    browser_home(tmp_path, monkeypatch)
    running = pod(EXAMPLES / "hello.py", "--path", "/hello", "--demo")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{running.port}/", timeout=TIMEOUT * 1000)
            page.wait_for_selector("#send:not([disabled])", timeout=TIMEOUT * 1000)
            page.fill("#name", "Chromium")
            page.click("#send")
            page.wait_for_function(
                "document.getElementById('reply').textContent.includes('Hello, Chromium!')", timeout=TIMEOUT * 1000
            )
            assert json.loads(page.text_content("#reply") or "") == {"greeting": "Hello, Chromium!"}
            page.screenshot(path=str(tmp_path / "demo.png"))
        finally:
            browser.close()


def test_many_clients_through_pod(pod: Any) -> None:
    """Ten clients at once through the pod each get their own replies."""
    running = pod(EXAMPLES / "hello.py", "--path", "/hello")

    def client(n: int) -> None:
        with connect(f"ws://127.0.0.1:{running.port}/hello", open_timeout=TIMEOUT) as ws:
            for i in range(5):
                assert ask(ws, {"name": f"{n}-{i}"}) == {"greeting": f"Hello, {n}-{i}!"}

    concurrently(10, client)


# --------------------------------------------------------------------------
# The management API, Redis and connection events (contract part D).


def env_of(docs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The action container's env entries by name."""
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item for item in container["env"]}


def secret_token(docs: dict[str, dict[str, Any]]) -> str:
    return base64.b64decode(docs["Secret"]["data"]["token"]).decode()


@pytest.mark.parametrize(
    "args",
    [
        ("--api",),
        ("--with-redis", "--replicas", "2", "--events", "--host", "chat.example.com", "--demo"),
        ("--redis", "rediss://cache.example.com:6380/2", "--api-token-secret", "mine", "--namespace", "actions"),
    ],
)
def test_api_manifests_validate(args: tuple[str, ...]) -> None:
    """With the API on, every document validates; port `api` is on the Service but never the Ingress; the token is a secretKeyRef."""
    docs = generate(EXAMPLES / "hello.py", "--name", "chat", *args)
    for doc in docs.values():
        validate(doc)
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "api", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    # Ready only once the API listens too (it opens after the public port).
    assert container["startupProbe"]["tcpSocket"] == {"port": "api"}
    env = env_of(docs)
    assert env["OW_API_PORT"]["value"] == "8081"
    ref = env["OW_API_TOKEN"]["valueFrom"]["secretKeyRef"]
    if "--api-token-secret" in args:
        assert ref == {"name": "mine", "key": "token"} and "Secret" not in docs
    else:
        assert ref == {"name": "chat-api", "key": "token"} and docs["Secret"]["metadata"]["name"] == "chat-api"
        assert len(secret_token(docs)) >= 43  # 32 random bytes
    ports = {port["name"]: port for port in docs["Service"]["spec"]["ports"]}
    assert ports["api"] == {"name": "api", "port": 8081, "targetPort": "api", "protocol": "TCP"}
    backends = [p["backend"] for rule in docs["Ingress"]["spec"]["rules"] for p in rule["http"]["paths"]]
    assert backends and all(b["service"] == {"name": "chat", "port": {"name": "http"}} for b in backends)
    assert ("OW_WEBSOCKET_EVENTS" in env) == ("--events" in args)
    if "--events" in args:
        assert env["OW_WEBSOCKET_EVENTS"]["value"] == "1"
    if "--redis" in args:
        assert env["OW_REDIS_URL"]["value"] == "rediss://cache.example.com:6380/2"
        assert not any(kind.startswith("redis/") for kind in docs)


def test_bundled_redis_manifests() -> None:
    """--with-redis: one Redis without persistence, non-root and read-only, its Service named in OW_REDIS_URL, reachable only from the runtime's pods."""
    docs = generate(EXAMPLES / "hello.py", "--name", "chat", "--with-redis")
    deployment, service, policy = docs["redis/Deployment"], docs["redis/Service"], docs["redis/NetworkPolicy"]
    url = urlsplit(env_of(docs)["OW_REDIS_URL"]["value"])
    (port,) = service["spec"]["ports"]
    assert (url.scheme, url.hostname, url.port) == ("redis", service["metadata"]["name"], port["port"])
    assert service["metadata"]["name"] == "chat-redis" and deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"] == pod["metadata"]["labels"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] != docs["Service"]["spec"]["selector"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "redis:7-alpine"
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    args = container["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    assert container["resources"]["limits"] and container["resources"]["requests"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True and pod["spec"]["securityContext"]["runAsUser"] > 0
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert [(m["mountPath"], volumes[m["name"]]) for m in container["volumeMounts"]] == [
        ("/data", {"name": "data", "emptyDir": {}})
    ]
    assert policy["spec"]["podSelector"]["matchLabels"] == pod["metadata"]["labels"]
    assert policy["spec"]["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": docs["Service"]["spec"]["selector"]}}
    ]


def test_no_flag_no_api() -> None:
    """Without the new flags: no Secret, no API port, no Redis, no events (deploy/hello.yaml is the full check)."""
    docs = generate(EXAMPLES / "hello.py", "--name", "hello")
    assert set(docs) == {"ConfigMap", "Deployment", "Service", "Ingress"}
    assert not {"OW_API_TOKEN", "OW_API_PORT", "OW_REDIS_URL", "OW_WEBSOCKET_EVENTS"} & set(env_of(docs))
    assert [port["name"] for port in docs["Service"]["spec"]["ports"]] == ["http"]


def test_generated_token_is_new_each_time_and_rolls_the_pods() -> None:
    """Each run draws a new token; the pod template carries its hash, so applying it restarts every replica."""
    first, second = (generate(EXAMPLES / "hello.py", "--name", "chat", "--api") for _ in range(2))
    assert secret_token(first) != secret_token(second)
    for docs in (first, second):
        annotations = docs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {"actionloop/api-token-sha256": hashlib.sha256(secret_token(docs).encode()).hexdigest()}
    existing = generate(EXAMPLES / "hello.py", "--name", "chat", "--api-token-secret", "mine")
    assert "annotations" not in existing["Deployment"]["spec"]["template"]["metadata"]


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (("--redis", "cache:6379"), 2, "redis://"),
        (("--redis", "redis://cache:6379/0", "--with-redis"), 2, "not allowed with"),
        (("--api", "--replicas", "3"), 0, "only its own connections"),
        (("--api", "--autoscale", "2:4", "--image", "r/a:1"), 0, "only its own connections"),
        (("--with-redis", "--replicas", "3", "--image", "registry.example.com/actionloop:1"), 0, ""),
        ((), 0, "the image actionloop:0.1.0 is in no registry: build deploy/Dockerfile"),
        (("--url", "ftp://files.example.com/hello.py"), 2, "https://"),
        (("--url", "https://files.example.com/a b.py"), 2, "no spaces"),
        (("--url", "https://alice:pw@files.example.com/h.py", "--image", "r/a:1"), 0, "keep OW_AUTOINIT in a Secret"),
        (("--url", "https://files.example.com/h.py?X-Amz-Signature=s", "--image", "r/a:1"), 0, "in a Secret"),
        (("--path", "hello"), 2, "a path starts with /"),
        (("--host", "10.0.0.7"), 2, "not an IP address"),
        (("--host", "hello.example.com:8080"), 2, "without port, scheme or wildcard"),
        (("--host", "*.example.com"), 2, "without port, scheme or wildcard"),
        (("--host", "https://hello.example.com"), 2, "without port, scheme or wildcard"),
        (("--host", "Hello.example.com"), 2, "without port, scheme or wildcard"),
        (("--path", "//x"), 2, "no empty, . or .. segments"),
        (("--path", "/a/../b"), 2, "no empty, . or .. segments"),
        (("--path", "/x?y"), 2, "no spaces, control characters, ?, # or %"),
        (("--url", "https://a.example.com/h.py", "--volume-claim", "c"), 2, "not allowed with"),
        (("--url", "https://a.example.com/h.py", "--image", "r/a:1", "--action-in-image"), 2, "not allowed with"),
        (("--volume-claim", "c", "--image", "r/a:1", "--action-in-image"), 2, "not allowed with"),
        (("--action-in-image",), 2, "--action-in-image needs --image"),
        (("--replicas", "2", "--autoscale", "2:5"), 2, "not allowed with"),
        (("--autoscale", "0:5"), 2, "MIN is at least 1"),
        (("--autoscale", "5:2"), 2, "MAX at least MIN"),
        (("--autoscale", "5"), 2, "MIN:MAX"),
        (("--cpu-target", "50"), 2, "--cpu-target needs --autoscale"),
        (("--autoscale", "1:3", "--cpu-target", "0"), 2, "at least 1"),
        (("--memory", "512Mi", "--image", "r/a:1"), 0, ""),
        (("--memory", "1.5Gi", "--image", "r/a:1"), 0, ""),
        (("--memory", "256MB"), 2, "not a Kubernetes quantity of memory"),
        (("--memory", "256m"), 2, "not a Kubernetes quantity of memory"),
        (("--memory", "32Mi"), 2, "at least 64Mi"),
        (("--volume-claim", "Actions_1"), 2, "argument --volume-claim: 'Actions_1' is not a valid name"),
        (("--volume-claim", "actions.v1", "--image", "r/a:1"), 0, ""),
        (("--api-token-secret", "api_token"), 2, "argument --api-token-secret: 'api_token' is not a valid name"),
        (("--tls-secret", "tls.", "--host", "h.example.com"), 2, "argument --tls-secret: 'tls.' is not a valid name"),
        (("--namespace", "a.b"), 2, "argument --namespace: 'a.b' is not a valid name"),
        (("--ingress-class", "Nginx"), 2, "argument --ingress-class: 'Nginx' is not a valid name"),
        (("--name", "Chat"), 2, "argument --name: 'Chat' is not a valid name"),
        (("--name", "1chat"), 2, "starting with a letter"),
        (("--name", "c" * 58), 2, "57 at most"),
        (("--name", "c" * 57, "--with-redis", "--image", "r/a:1"), 0, ""),
    ],
)
def test_kube_flags_refused_or_warned(args: tuple[str, ...], status: int, says: str) -> None:
    """Bad or clashing flags are refused (exit 2, nothing printed); an API over replicas without Redis
    and the unpublished default image are warned about."""
    done = subprocess.run(
        [ACTIONLOOP, "kube", str(EXAMPLES / "hello.py"), "--name", "chat", *args],
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == status
    assert says in done.stderr.decode() if says else done.stderr == b""
    assert (done.stdout != b"") == (status == 0)


EVENTS_ACTION = """\
import os

def main(args):
    if args.get("__ow_event") == "connect" and args["__ow_query"].get("deny"):
        return {"statusCode": 403, "body": "denied"}
    if args.get("__ow_event"):
        return {}
    return {"id": os.environ["__OW_CONNECTION_ID"]}
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    """Start what a set of manifests runs: the bundled Redis, if any, then the runtime's replicas."""
    started: list[Pod | Redis] = []

    def start(docs: dict[str, dict[str, Any]], **secrets: dict[str, str]) -> list[Pod]:
        services = {}
        if "redis/Deployment" in docs:
            redis = Redis(docs["redis/Deployment"], tmp_path / "redis")
            started.append(redis)
            service = docs["redis/Service"]
            services[f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"] = redis.port
        pods = []
        for n in range(docs["Deployment"]["spec"]["replicas"]):
            pod = Pod(docs, tmp_path / f"pod{n}", services, secrets)
            started.append(pod)
            pods.append(pod.wait_ready())
        return pods

    yield start
    for process in reversed(started):
        process.stop()


def wait_for_redis(pod: Pod) -> None:
    deadline = time.monotonic() + TIMEOUT
    while pod.get("/readyz")[1].get("redis") != "up":
        assert time.monotonic() < deadline, pod.logs()
        time.sleep(0.05)


def test_replicas_share_the_bundled_redis(cluster: Any, tmp_path: Path) -> None:
    """--with-redis --replicas 2 --events: the API of one replica, with the Secret's token, pushes to a connection of the other."""
    action = tmp_path / "chat.py"
    action.write_text(EVENTS_ACTION)
    docs = generate(action, "--name", "chat", "--path", "/chat", "--with-redis", "--replicas", "2", "--events")
    first, second = cluster(docs)
    for pod in (first, second):
        wait_for_redis(pod)
    token = secret_token(docs)
    with connect(f"ws://127.0.0.1:{first.port}/chat", open_timeout=TIMEOUT) as ws:
        me = ask(ws, {})["id"]
        assert second.api("GET", f"/connections/{me}", None)[0] == 401
        assert second.api("GET", f"/connections/{me}", "wrong")[0] == 403
        status, described = second.api("GET", f"/connections/{me}", token)
        assert status == 200 and described["id"] == me and me.startswith(described["replica"])
        assert second.api("POST", f"/connections/{me}", token, {"pushed": "across"}) == (200, {"sent": True})
        assert json.loads(ws.recv(timeout=TIMEOUT)) == {"pushed": "across"}
        # The public port serves no API, token or not.
        public = urllib.request.Request(f"http://127.0.0.1:{first.port}/connections/{me}")
        public.add_header("Authorization", f"Bearer {token}")
        with pytest.raises(urllib.error.HTTPError) as not_here:
            urllib.request.urlopen(public, timeout=5)
        assert not_here.value.code == 404
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{second.port}/chat?deny=1", open_timeout=TIMEOUT).close()
    assert refused.value.response.status_code == 403


def test_existing_secret_gives_the_token(cluster: Any) -> None:
    """--api-token-secret: the pod takes its token from the Secret already in the cluster."""
    docs = generate(EXAMPLES / "hello.py", "--name", "hello", "--api-token-secret", "mine")
    (pod,) = cluster(docs, mine={"token": "from-the-cluster"})
    assert pod.api("POST", "/broadcast", "from-the-cluster", {"hi": 1}) == (200, {"broadcast": True})
    assert pod.api("POST", "/broadcast", "other", {"hi": 1})[0] == 403


def test_ingress_tls(tmp_path: Path) -> None:
    """--tls-secret puts TLS for --host on the Ingress (valid against the schemas); without --host it is refused."""
    docs = generate(
        EXAMPLES / "hello.py", "--name", "hello", "--host", "hello.example.com", "--tls-secret", "hello-tls"
    )
    validate(docs["Ingress"])
    assert docs["Ingress"]["spec"]["tls"] == [{"hosts": ["hello.example.com"], "secretName": "hello-tls"}]
    assert "tls" not in generate(EXAMPLES / "hello.py", "--name", "hello")["Ingress"]["spec"]
    done = subprocess.run(
        [ACTIONLOOP, "kube", str(EXAMPLES / "hello.py"), "--name", "h", "--tls-secret", "s"],
        capture_output=True,
        timeout=30,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 2 and b"--tls-secret needs --host" in done.stderr


# --------------------------------------------------------------------------
# Actions of any size, and day two: rollouts, disruptions, autoscaling.

IMAGE = "registry.example.com/actionloop:1"


def kube_cli(action: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """`actionloop kube` as a user runs it, exit status, stdout and stderr kept."""
    command = [ACTIONLOOP, "kube", str(action), "--name", "big", "--image", IMAGE, *args]
    return subprocess.run(command, capture_output=True, check=False, timeout=60)


def printed(done: subprocess.CompletedProcess[bytes]) -> dict[str, dict[str, Any]]:
    return {
        doc["kind"]: doc for doc in yaml.load_all(done.stdout, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    }


@pytest.mark.parametrize("byte", [b"#", b"\xff"], ids=["data", "binaryData"])
def test_configmap_limit(tmp_path: Path, byte: bytes) -> None:
    """Exactly 1 MiB of code (binaryData counted decoded) still goes in a ConfigMap; a byte more is
    refused, exit 2 and nothing printed, with one paragraph naming the three other ways, which take it."""
    action = tmp_path / "big.py"
    action.write_bytes(byte * (kube.CONFIGMAP_LIMIT - 1) + b"\n")
    fits = kube_cli(action)
    assert fits.returncode == 0, fits.stderr
    config_map = printed(fits)["ConfigMap"]
    validate(config_map)
    if byte == b"#":
        assert len(config_map["data"]["big.py"].encode()) == kube.CONFIGMAP_LIMIT
    else:
        assert len(base64.b64decode(config_map["binaryData"]["big.py"])) == kube.CONFIGMAP_LIMIT
    action.write_bytes(byte * kube.CONFIGMAP_LIMIT + b"\n")
    refused = kube_cli(action)
    assert refused.returncode == 2 and refused.stdout == b""
    said = refused.stderr.decode()
    assert said.count("\n") == 1 and "1,048,577 bytes" in said and "(1,048,576 bytes)" in said
    for way in (
        "--url https://HOST/big.py",
        "--volume-claim CLAIM",
        "docker build -f deploy/Dockerfile --build-arg ACTION=FILE -t IMAGE .",
        "--image IMAGE --action-in-image",
    ):
        assert way in said
    for args in (("--url", "https://files.example.com/big.py"), ("--volume-claim", "actions"), ("--action-in-image",)):
        taken = kube_cli(action, *args)
        assert taken.returncode == 0 and "ConfigMap" not in printed(taken)


@pytest.mark.parametrize(
    ("code", "warned"),
    [
        (b"#" * 250_000 + b"\n", False),
        (b"#" * 262_144 + b"\n", True),
        (b"<" * 50_000 + b"#" * 200_000 + b"\n", True),  # Go's JSON writes each < in 6 bytes
        (b"\xff" * 200_000, True),  # binaryData is base64 in the JSON: 4/3 of the bytes
    ],
    ids=["250000", "262145", "escaped", "binary"],
)
def test_apply_annotation_warning(tmp_path: Path, code: bytes, warned: bool) -> None:
    """Past 256 KiB of annotation, client-side `kubectl apply` fails: warned, with --server-side, manifests printed."""
    action = tmp_path / "mid.py"
    action.write_bytes(code)
    done = kube_cli(action)
    assert done.returncode == 0 and "ConfigMap" in printed(done)
    said = done.stderr.decode()
    assert ("kubectl apply --server-side -f -" in said) == warned
    assert ("262,144 bytes" in said) == warned


def test_annotation_size_is_kubectls(tmp_path: Path) -> None:
    """The size the warning goes by is the annotation real kubectl apply writes (escapes, base64, namespace)."""
    kubectl = shutil.which("kubectl") or pytest.skip("kubectl is not installed (an optional cross-check)")
    source = tmp_path / "odd.py"
    source.write_text("s = '<a> & \u2028 \u00e9 \"q\"'\n\tx = 1\n")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "no-config")}
    api = ApiServer()
    try:
        for action in (source, binary):
            # The longest namespace, which is what kube assumes when none is given.
            config_map = generate(action, "--name", "sized", "--namespace", "n" * 63, "--image", IMAGE)["ConfigMap"]
            given = tmp_path / "configmap.json"
            given.write_text(json.dumps(config_map))
            applied = [kubectl, "--server", api.url, "apply", "--dry-run=client", "--validate=false", "-o", "json"]
            done = subprocess.run([*applied, "-f", str(given)], env=env, capture_output=True, check=True, timeout=60)
            annotation = json.loads(done.stdout)["metadata"]["annotations"][kube.LAST_APPLIED]
            assert kube.last_applied_size(config_map) == len(kube.LAST_APPLIED) + len(annotation.encode())
    finally:
        api.stop()


HELLO_SHA256 = hashlib.sha256((EXAMPLES / "hello.py").read_bytes()).hexdigest()
URL = "https://downloads.example.com/hello.py"


@pytest.mark.parametrize(
    ("args", "autoinit", "volume"),
    [
        ((), {"OW_AUTOINIT": "/etc/actionloop/code/hello.py"}, {"configMap": {"name": "hello-code"}}),
        (("--url", URL), {"OW_AUTOINIT": URL, "OW_AUTOINIT_SHA256": HELLO_SHA256}, None),
        (
            ("--volume-claim", "actions"),
            {"OW_AUTOINIT": "/etc/actionloop/code/hello.py"},
            {"persistentVolumeClaim": {"claimName": "actions", "readOnly": True}},
        ),
        (("--action-in-image",), {"OW_AUTOINIT_SHA256": HELLO_SHA256}, None),
    ],
    ids=["configmap", "url", "volume-claim", "action-in-image"],
)
def test_where_the_code_comes_from(args: tuple[str, ...], autoinit: dict[str, str], volume: Any) -> None:
    """Each way to ship the code gives the pod its own OW_AUTOINIT (none: the image's), the SHA-256 of FILE
    where it is not on a volume the user may update, and a code volume, if any."""
    docs = generate(EXAMPLES / "hello.py", "--name", "hello", "--image", IMAGE, *args)
    for doc in docs.values():
        validate(doc)
    assert ("ConfigMap" in docs) == (not args)
    env = env_of(docs)
    assert {name: env[name]["value"] for name in ("OW_AUTOINIT", "OW_AUTOINIT_SHA256") if name in env} == autoinit
    pod_spec = docs["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: {key: value for key, value in v.items() if key != "name"} for v in pod_spec["volumes"]}
    mounts = {m["mountPath"]: m for m in pod_spec["containers"][0]["volumeMounts"]}
    assert volumes.get("code") == volume
    assert volumes["action"] == {"emptyDir": {}} and "/actionloop/action" in mounts
    if volume is None:
        assert "/etc/actionloop/code" not in mounts
    else:
        assert mounts["/etc/actionloop/code"] == {"name": "code", "mountPath": "/etc/actionloop/code", "readOnly": True}


@pytest.mark.parametrize(
    ("args", "replicas", "budget", "autoscale"),
    [
        ((), 1, False, None),
        (("--replicas", "3"), 3, True, None),
        (("--autoscale", "2:8"), None, True, (2, 8, 70)),
        (("--autoscale", "1:4", "--cpu-target", "55"), None, True, (1, 4, 55)),
    ],
)
def test_disruption_budget_and_autoscaler(
    args: tuple[str, ...], replicas: int | None, budget: bool, autoscale: tuple[int, int, int] | None
) -> None:
    """A PodDisruptionBudget (one pod at a time) with several pods or autoscaling; the autoscaler, on CPU,
    owns the count, so the Deployment states none."""
    docs = generate(EXAMPLES / "hello.py", "--name", "hello", "--image", IMAGE, *args)
    deployment = docs["Deployment"]
    assert deployment["spec"].get("replicas") == replicas
    assert ("PodDisruptionBudget" in docs) == budget
    assert ("HorizontalPodAutoscaler" in docs) == (autoscale is not None)
    if budget:
        pdb = docs["PodDisruptionBudget"]
        validate(pdb)
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": deployment["spec"]["selector"]}
    if autoscale is not None:
        hpa = docs["HorizontalPodAutoscaler"]
        validate(hpa)
        validate(deployment)
        spec = hpa["spec"]
        target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
        assert spec["scaleTargetRef"] == target
        assert (spec["minReplicas"], spec["maxReplicas"]) == autoscale[:2]
        (metric,) = spec["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": autoscale[2]}
        # Utilization is a share of the request, which must therefore be set.
        assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]


def test_dockerfile_action_build_arg() -> None:
    """deploy/Dockerfile: with ACTION the file is copied to a fixed path OW_AUTOINIT names; without it the
    placeholder deploy/no-action is, and OW_AUTOINIT is empty, which the runtime takes as not set."""
    built = dockerfile({"ACTION": "examples/hello.py"})
    assert built["copies"] == [(["examples/hello.py"], "/opt/actionloop/action", [])]
    assert built["env"]["OW_AUTOINIT"] == "/opt/actionloop/action"
    plain = dockerfile()
    assert plain["copies"] == [(["deploy/no-action"], "/opt/actionloop/action", [])]
    assert plain["env"]["OW_AUTOINIT"] == ""
    assert from_env({"OW_AUTOINIT": ""}).autoinit == ""


def test_dockerfile_needs_no_buildkit() -> None:
    """Every COPY of deploy/Dockerfile works with the classic builder too: no --chmod (or other flag) and
    no wildcard, which fails it when nothing matches; each default source is a file in the context."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    copies = [line.split()[1:] for line in text.splitlines() if line.startswith("COPY ")]
    assert copies and not [part for parts in copies for part in parts if part.startswith("--")]
    sources = [expand(part, {}) for parts in copies for part in parts[:-1]]
    assert not [source for source in sources if set(source) & set("*?[")]
    assert all((ROOT / source).exists() for source in sources), sources
    assert "needs BuildKit" not in (ROOT / "README.md").read_text()


def test_pod_with_action_in_image(pod: Any) -> None:
    """--action-in-image: a pod of the image built with ACTION=examples/hello.py (its COPY and ENV played) answers."""
    running = pod(
        EXAMPLES / "hello.py",
        "--path",
        "/hello",
        "--image",
        IMAGE,
        "--action-in-image",
        build_args={"ACTION": "examples/hello.py"},
    )
    assert "OW_AUTOINIT" not in {item["name"] for item in running.container["env"]}
    with connect(f"ws://127.0.0.1:{running.port}/hello", open_timeout=TIMEOUT) as ws:
        assert ask(ws, {"name": "image"}) == {"greeting": "Hello, image!"}


GREETER = "def main(args):\n    return {{'greeting': '{word}, ' + args.get('name', '') + '!'}}\n"


def test_pod_from_volume_claim(pod: Any, tmp_path: Path) -> None:
    """--volume-claim: a pod started as the spec says runs the file on the claim, and a new version
    written there is served on the open connection (live update)."""
    claim = tmp_path / "claim"
    claim.mkdir()
    action = claim / "greet.py"
    action.write_text(GREETER.format(word="Hello"))
    running = pod(action, "--path", "/greet", "--image", IMAGE, "--volume-claim", "actions", claims={"actions": claim})
    with connect(f"ws://127.0.0.1:{running.port}/greet", open_timeout=TIMEOUT) as ws:
        assert ask(ws, {"name": "claim"}) == {"greeting": "Hello, claim!"}
        new = claim / "greet.py.new"  # as `kubectl cp` to a temporary name, then `mv`, would
        new.write_text(GREETER.format(word="Bonjour"))
        new.replace(action)
        deadline = time.monotonic() + TIMEOUT
        while (reply := ask(ws, {"name": "claim"})) != {"greeting": "Bonjour, claim!"}:
            assert reply == {"greeting": "Hello, claim!"} and time.monotonic() < deadline
            time.sleep(0.1)


# --------------------------------------------------------------------------
# Slow start-ups, big actions, and an image pinned to its file.

SCALE = 0.1  # the kubelet's probe periods, played ten times faster


@pytest.mark.parametrize(
    "args",
    [(), ("--api",), ("--url", URL), ("--volume-claim", "actions"), ("--action-in-image", "--with-redis")],
    ids=["configmap", "api", "url", "volume-claim", "action-in-image"],
)
def test_startup_probe_allows_ten_minutes(args: tuple[str, ...]) -> None:
    """Every Deployment has a startup probe on the port that opens last (api with the API, else http),
    allowing 10 minutes before the liveness and readiness probes begin."""
    docs = generate(EXAMPLES / "hello.py", "--name", "hello", "--image", IMAGE, *args)
    validate(docs["Deployment"])
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    startup = container["startupProbe"]
    assert startup["tcpSocket"] == {"port": "api" if {"--api", "--with-redis"} & set(args) else "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] < 60  # why it must not start first


@pytest.mark.parametrize("startup", [True, False], ids=["as-generated", "without-startup-probe"])
def test_slow_start_is_waited_for(pod: Any, startup: bool) -> None:
    """A pod whose auto-init outlasts the liveness probe's patience (two 503s from the bucket, retried
    after 1 and 2 s: over 30 s in a cluster, with periods 10 times shorter here) becomes ready; without
    the startup probe, the liveness probe would have had it killed."""
    bucket = Bucket(EXAMPLES / "hello.py", failures=2)
    try:
        started = time.monotonic()
        running = pod(EXAMPLES / "hello.py", "--path", "/hello", "--image", IMAGE, "--url", bucket.url, ready=False)
        if not startup:
            del running.container["startupProbe"]
        verdict = play_probes(running, SCALE, 60 * TIME_FACTOR)
        took = time.monotonic() - started
    finally:
        bucket.stop()
    if not startup:
        assert verdict == "killed by the livenessProbe"
        return
    assert verdict == "ready", running.logs()
    liveness = running.container["livenessProbe"]
    assert took > liveness["periodSeconds"] * liveness["failureThreshold"] * SCALE
    assert bucket.requests == 3 and "again in 2 s" in running.logs()
    with connect(f"ws://127.0.0.1:{running.port}/hello", open_timeout=TIMEOUT) as ws:
        assert ask(ws, {"name": "late"}) == {"greeting": "Hello, late!"}


def sparse(path: Path, size: int) -> Path:
    with path.open("wb") as file:
        file.truncate(size)
    return path


def memory_of(done: subprocess.CompletedProcess[bytes]) -> dict[str, str]:
    resources = printed(done)["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    validate(printed(done)["Deployment"])
    assert resources["requests"]["memory"] == "64Mi"
    return {"limit": resources["limits"]["memory"]}


def test_memory_limit_grows_with_the_file(tmp_path: Path) -> None:
    """The memory limit is 256Mi up to a FILE of 64 MiB; past that it is FILE's size and 192 MiB, in whole
    MiB, said on stderr; --memory sets it, with a warning when it is less than a big FILE needs; the
    request stays 64Mi."""
    action = sparse(tmp_path / "big.zip", 64 << 20)
    small = kube_cli(action, "--volume-claim", "actions")
    assert memory_of(small) == {"limit": "256Mi"} and b"memory" not in small.stderr
    action = sparse(action, (64 << 20) + 1)
    grown = kube_cli(action, "--url", "https://files.example.com/big.zip")
    assert memory_of(grown) == {"limit": "257Mi"}
    assert grown.stderr.decode() == (
        "actionloop kube: auto-init holds big.zip's 67,108,865 bytes in memory while it unpacks them: "
        "the pods' memory limit is 257Mi instead of 256Mi (--memory sets it)\n"
    )
    small = kube_cli(EXAMPLES / "hello.py", "--memory", "128Mi")
    assert memory_of(small) == {"limit": "128Mi"} and small.stderr == b""
    given = kube_cli(action, "--volume-claim", "actions", "--memory", "1Gi")
    assert memory_of(given) == {"limit": "1Gi"} and given.stderr == b""
    short = kube_cli(action, "--action-in-image", "--memory", "256Mi")
    assert memory_of(short) == {"limit": "256Mi"}
    assert "--memory 256Mi may be too little" in short.stderr.decode() and "257Mi" in short.stderr.decode()


def resident_peak(pid: int) -> int:
    """Bytes: the peak resident memory (VmHWM) of a process and of each of its children, added up."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    status = Path(f"/proc/{pid}/status").read_text()
    (peak,) = [int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
    return peak + sum(resident_peak(int(child)) for child in children)


def test_big_action_fits_its_memory_limit(pod: Any, tmp_path: Path) -> None:
    """A pod that auto-inits a 224 MiB zip from a claim stays under the memory limit its manifests set
    (the runtime and its action process at their peaks, added up), and answers."""
    claim = tmp_path / "claim"
    claim.mkdir()
    action = claim / "big.zip"
    with zipfile.ZipFile(action, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("__main__.py", "def main(args):\n    return {'big': True}\n")
        with archive.open("data.bin", "w", force_zip64=True) as data:
            for _ in range(224):
                data.write(bytes(1 << 20))
    running = pod(action, "--path", "/big", "--image", IMAGE, "--volume-claim", "actions", claims={"actions": claim})
    with connect(f"ws://127.0.0.1:{running.port}/big", open_timeout=TIMEOUT) as ws:
        assert ask(ws, {}) == {"big": True}
    peak = resident_peak(running.process.pid)
    limit = running.container["resources"]["limits"]["memory"]
    assert peak > action.stat().st_size  # the bytes were held at once
    assert peak < kube.quantity_bytes(limit), (peak, limit)


OTHER = "def main(args):\n    return {'other': True}\n"


def test_image_is_pinned_to_file(tmp_path: Path) -> None:
    """--action-in-image: the pod template carries FILE's SHA-256, so a new FILE is a new template (a
    rollout, even under a reused tag)."""
    other = tmp_path / "other.py"
    other.write_text(OTHER)
    first, second = (
        generate(action, "--name", "h", "--image", IMAGE, "--action-in-image")
        for action in (EXAMPLES / "hello.py", other)
    )
    assert env_of(first)["OW_AUTOINIT_SHA256"]["value"] == HELLO_SHA256
    assert first["Deployment"]["spec"]["template"] != second["Deployment"]["spec"]["template"]


@pytest.mark.parametrize(
    ("build_args", "status", "says"),
    [
        ({"ACTION": "examples/counter.py"}, 1, f"but OW_AUTOINIT_SHA256 is {HELLO_SHA256}: not loaded"),
        ({}, 2, "bad setting: OW_AUTOINIT_SHA256 is set but OW_AUTOINIT is not"),
    ],
    ids=["another-file", "no-action"],
)
def test_image_of_another_file_fails(pod: Any, build_args: dict[str, str], status: int, says: str) -> None:
    """--action-in-image with FILE examples/hello.py: a pod of an image built from another file, or
    without ACTION, exits at once, saying why, instead of serving the wrong action or none."""
    running = pod(EXAMPLES / "hello.py", "--image", IMAGE, "--action-in-image", build_args=build_args, ready=False)
    assert running.process.wait(TIMEOUT) == status
    assert says in running.logs()
