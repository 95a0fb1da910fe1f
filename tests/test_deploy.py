"""Kubernetes deployment, tested as far as this machine allows.

No cluster or Docker engine here: manifests are validated against the official
schemas offline; a pod is emulated from the Deployment and the Dockerfile; a
real nginx stands in for ingress-nginx; real headless Chromium drives the demo.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ACTIONLOOP, EXAMPLES, ROOT, TIME_FACTOR, ask, concurrently, make_zip
from deploy_helpers import Nginx, Pod, generate, need, validate
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

TIMEOUT = 20 * TIME_FACTOR


def test_checked_in_manifest_is_current() -> None:
    """deploy/hello.yaml is exactly what the generator prints for examples/hello.py."""
    done = subprocess.run(
        [ACTIONLOOP, "kube", "examples/hello.py", "--name", "hello", "--path", "/hello", "--demo"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert done.stdout.decode() == (ROOT / "deploy" / "hello.yaml").read_text()


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
