"""Kubernetes deployment, tested as far as this machine allows.

No cluster or Docker engine here: manifests are validated against the official
schemas offline; a pod is emulated from the Deployment and the Dockerfile; a
real nginx stands in for ingress-nginx; real headless Chromium drives the demo.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import ACTIONLOOP, EXAMPLES, ROOT, TIME_FACTOR, ask, concurrently, make_zip
from deploy_helpers import Nginx, Pod, Redis, generate, need, validate
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

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
    ],
)
def test_manifests_validate(args: tuple[str, ...]) -> None:
    """Every generated document validates against the Kubernetes 1.33 schemas."""
    docs = generate(EXAMPLES / "hello.py", *args)
    assert set(docs) >= {"ConfigMap", "Deployment", "Service", "Ingress"}
    for doc in docs.values():
        validate(doc)
    deployment = docs["Deployment"]["spec"]
    container = deployment["template"]["spec"]["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"]}
    timeout = int(docs["Ingress"]["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"])
    assert float(env["OW_WEBSOCKET_PING"]) * 2 < min(timeout, 60)
    assert deployment["template"]["spec"]["terminationGracePeriodSeconds"] > float(env["OW_DRAIN_TIMEOUT"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


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

    def start(action: Path, *args: str, **env: str) -> Pod:
        started = Pod(generate(action, "--name", "hello", *args), tmp_path / f"pod{len(pods)}", **env)
        pods.append(started)
        return started.wait_ready()

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
    proxy = Nginx(generate(EXAMPLES / "hello.py", "--name", "hello")["Ingress"], running.port, tmp_path / "nginx")
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
    proxy = Nginx(ingress, running.port, tmp_path / "nginx", read_timeout=3)
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


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_demo_page_in_chromium(pod: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real headless Chromium opens the demo page, types a name, clicks Send, sees the greeting."""
    chromium = need("chromium")
    playwright_api = pytest.importorskip("playwright.sync_api")
    for var in ("HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        folder = tmp_path / var.lower()
        folder.mkdir()
        monkeypatch.setenv(var, str(folder))
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
# The management API, Redis and connection events (SPEC.md part D).


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
        (("--with-redis", "--replicas", "3"), 0, ""),
    ],
)
def test_kube_flags_refused_or_warned(args: tuple[str, ...], status: int, says: str) -> None:
    """A bad Redis URL or both Redis flags are refused; an API over replicas without Redis is warned about."""
    done = subprocess.run(
        [ACTIONLOOP, "kube", str(EXAMPLES / "hello.py"), "--name", "chat", *args],
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == status
    assert says in done.stderr.decode() if says else done.stderr == b""


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
