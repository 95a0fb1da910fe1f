"""Stand-ins for a pod and an ingress, built from the real artefacts.

`Pod` reads deploy/Dockerfile and a generated Deployment and starts
`actionloop` exactly as the container would: the image's entrypoint, its ENV
and WORKDIR and the files it COPYs (with the build arguments given), the
container's env, the ConfigMap's files at the mount path. The one change:
container paths live under a temporary root, and the port is a free one
(tests share the machine). Env from a Secret comes from the generated Secret,
or from one given as already in the cluster; a PersistentVolumeClaim, given
as already in the cluster, is a folder linked at the mount path; a Service's
DNS name in the env becomes the address of its local stand-in.

`Redis` runs the local redis-server as the bundled Redis Deployment's
container says (its command and args, /data as the working folder).

`Nginx` runs a private nginx configured from a generated Ingress: its path,
the WebSocket upgrade headers and the timeouts of its annotations.

`ApiServer` answers kubectl's discovery, so a real `kubectl apply
--dry-run=client` shows the object it would send, annotation included.

`play_probes` runs a container's probes on a `Pod` as the kubelet does, every
period scaled down; `Bucket` serves an action file over HTTP, failing first
if asked, as a flaky object store would.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from conftest import ACTIONLOOP, ROOT, TIME_FACTOR, free_port

from actionloop import kube

REQUIRE_SYSTEM = os.environ.get("ACTIONLOOP_REQUIRE_SYSTEM") == "1"


def need(program: str) -> str:
    """The path of a system program; CI installs them, elsewhere skip without."""
    path = shutil.which(program) or (f"/usr/sbin/{program}" if Path(f"/usr/sbin/{program}").exists() else None)
    if path is None:
        if REQUIRE_SYSTEM:
            raise AssertionError(f"{program} is required here (.ci/run installs it)")
        pytest.skip(f"{program} is not installed (.ci/run installs it)")
    return path


def generate(action: Path, *args: str) -> dict[str, dict[str, Any]]:
    """Run `actionloop kube` and return its documents by kind; the bundled Redis's as `redis/KIND`."""
    done = subprocess.run([ACTIONLOOP, "kube", str(action), *args], capture_output=True, check=True, timeout=30)
    docs = {}
    for doc in yaml.safe_load_all(done.stdout):
        component = doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        docs[f"redis/{doc['kind']}" if component == "redis" else doc["kind"]] = doc
    return docs


VARIABLE = re.compile(r"\$\{(\w+)(?::([-+])([^}]*))?\}|\$(\w+)")


def expand(text: str, variables: dict[str, str]) -> str:
    """Dockerfile environment replacement: $VAR, ${VAR}, ${VAR:-word}, ${VAR:+word}."""

    def one(match: re.Match[str]) -> str:
        value = variables.get(match[1] or match[4], "")
        if match[2] == "-":
            return value or match[3]
        if match[2] == "+":
            return match[3] if value else ""
        return value

    return VARIABLE.sub(one, text)


def dockerfile(build_args: dict[str, str] | None = None) -> dict[str, Any]:
    """ENV, WORKDIR, ENTRYPOINT and the files COPYd to stay of deploy/Dockerfile, built with build_args.

    "copies" are (sources, destination, flags) of each COPY after the last RUN:
    those before it fed it, and the installed actionloop stands for that RUN.
    """
    text = (ROOT / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    image: dict[str, Any] = {"env": {}, "workdir": "/", "entrypoint": [], "copies": []}
    variables: dict[str, str] = {}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word in ("ENV", "COPY", "WORKDIR"):
            rest = expand(rest, variables)
        if word == "ARG":
            name, _, default = rest.strip().partition("=")
            variables[name] = (build_args or {}).get(name, default)
        elif word == "ENV":
            pairs = dict(part.split("=", 1) for part in shlex.split(rest))
            image["env"].update(pairs)
            variables.update(pairs)
        elif word == "RUN":
            image["copies"].clear()
        elif word == "COPY":
            *sources, destination = [part for part in rest.split() if not part.startswith("--")]
            image["copies"].append((sources, destination, [part for part in rest.split() if part.startswith("--")]))
        elif word == "WORKDIR":
            image["workdir"] = rest.strip()
        elif word == "ENTRYPOINT":
            image["entrypoint"] = json.loads(rest)
    return image


class Pod:
    """One container of a generated Deployment, started as the kubelet would."""

    def __init__(
        self,
        docs: dict[str, dict[str, Any]],
        root: Path,
        services: dict[str, int] | None = None,
        secrets: dict[str, dict[str, str]] | None = None,
        claims: dict[str, Path] | None = None,
        build_args: dict[str, str] | None = None,
        /,
        **env_overrides: str,
    ) -> None:
        """`services`: "NAME:PORT" of a Service to its stand-in's local port; `secrets`: Secrets already
        there; `claims`: PersistentVolumeClaims already there, each a folder; `build_args`: the image's."""
        self.docs = docs
        self.root = root
        self.services = services or {}
        self.secrets = secrets or {}
        self.claims = claims or {}
        spec = docs["Deployment"]["spec"]["template"]["spec"]
        self.grace = spec["terminationGracePeriodSeconds"]
        container = spec["containers"][0]
        self.container = container
        image = dockerfile(build_args)
        self.paths = [mount["mountPath"] for mount in container["volumeMounts"]]
        self._copy(image["copies"])
        self._mount(spec, container)
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        self.port = free_port()
        env = {"PATH": os.environ["PATH"], "HOME": str(self.host_path(image["workdir"]))}
        env.update(image["env"])
        env.update({item["name"]: self._env_value(item) for item in container["env"]})
        env = {key: self._map(value) for key, value in env.items()}
        # The one deviation: free ports instead of the containerPorts, which
        # must be where the runtime listens (OW_PORT and OW_API_PORT default to 8080 and 8081).
        assert ports["http"] == int(env.get("OW_PORT", 8080))
        env.update({"OW_PORT": str(self.port), "OW_HOST": "127.0.0.1"})
        self.api_port = 0
        if "api" in ports:
            assert ports["api"] == int(env.get("OW_API_PORT", 8081)) and "OW_API_TOKEN" in env
            self.api_port = free_port()
            env["OW_API_PORT"] = str(self.api_port)
        env.update(env_overrides)
        self.env = env
        command = [ACTIONLOOP if image["entrypoint"] == ["actionloop"] else image["entrypoint"][0]]
        self.log = open(root / "pod.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command,
            cwd=self.host_path(image["workdir"]),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def host_path(self, container_path: str) -> Path:
        return self.root / "fs" / container_path.lstrip("/")

    def _env_value(self, item: dict[str, Any]) -> str:
        """An env entry's value, as the kubelet resolves it (a missing Secret fails the pod)."""
        if "value" in item:
            return str(item["value"])
        ref = item["valueFrom"]["secretKeyRef"]
        secret = self.docs.get("Secret", {})
        if secret.get("metadata", {}).get("name") == ref["name"]:
            return base64.b64decode(secret["data"][ref["key"]]).decode()
        return self.secrets[ref["name"]][ref["key"]]

    def _map(self, value: str) -> str:
        for service, port in self.services.items():
            value = value.replace(f"//{service}/", f"//127.0.0.1:{port}/")
        for path in self.paths:
            if value == path or value.startswith(path + "/"):
                return str(self.host_path(path)) + value[len(path) :]
        return value

    def _copy(self, copies: list[tuple[list[str], str, list[str]]]) -> None:
        """The image's COPYs, from the repository root as build context, as every builder does them."""
        for sources, destination, flags in copies:
            # --chmod and friends need BuildKit; the classic builder fails on a source that matches nothing.
            assert not flags, f"COPY {' '.join(flags)}: not for every builder"
            for source in sources:
                found = sorted(ROOT.glob(source))
                assert found, f"COPY {source}: not in the context"
                for path in found:
                    target = self.host_path(destination)
                    target = target / path.name if destination.endswith("/") else target
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, target)  # the mode comes along
            self.paths.append(destination.rstrip("/"))

    def _mount(self, spec: dict[str, Any], container: dict[str, Any]) -> None:
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        for mount in container["volumeMounts"]:
            folder = self.host_path(mount["mountPath"])
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                folder.parent.mkdir(parents=True, exist_ok=True)
                folder.symlink_to(self.claims[volume["persistentVolumeClaim"]["claimName"]])
                continue
            folder.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                config_map = self.docs["ConfigMap"]
                assert volume["configMap"]["name"] == config_map["metadata"]["name"]
                for key, text in config_map.get("data", {}).items():
                    (folder / key).write_text(text)
                for key, data in config_map.get("binaryData", {}).items():
                    (folder / key).write_bytes(base64.b64decode(data))
                if mount.get("readOnly"):
                    folder.chmod(0o555)
        self.host_path(spec.get("workingDir", "/actionloop")).mkdir(parents=True, exist_ok=True)

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def api(self, method: str, path: str, token: str | None, body: Any = None) -> tuple[int, Any]:
        """One request to the management API on the stand-in of containerPort `api`."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}", data=data, method=method)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def accepts(self, port_name: str) -> bool:
        """Whether the stand-in of a named containerPort takes a TCP connection (a tcpSocket probe)."""
        port = {"http": self.port, "api": self.api_port}[port_name]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    def passes(self, probe: dict[str, Any]) -> bool:
        """One try of a tcpSocket or httpGet probe (on port http), as the kubelet's prober counts it."""
        if "tcpSocket" in probe:
            return self.accepts(probe["tcpSocket"]["port"])
        assert probe["httpGet"]["port"] == "http"
        try:
            return 200 <= self.get(probe["httpGet"]["path"])[0] < 400
        except (OSError, ValueError):
            return False

    def wait_ready(self, timeout: float = 20.0) -> Pod:
        """Poll the startup probe's port, if any, then the readiness probe's path, as the kubelet does."""
        startup = self.container.get("startupProbe", {}).get("tcpSocket")
        started = startup is None
        probe = self.container["readinessProbe"]["httpGet"]["path"]
        deadline = time.monotonic() + timeout * TIME_FACTOR
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"pod exited {self.process.returncode}: {self.logs()}")
            started = started or self.accepts(startup["port"])
            try:
                if started and self.get(probe)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"pod never ready: {self.logs()}")

    def logs(self) -> str:
        return (self.root / "pod.log").read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.grace * TIME_FACTOR)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()
        return self.process.returncode


def play_probes(pod: Pod, scale: float, timeout: float) -> str:
    """The kubelet's probes of the pod's container until it is ready or would be killed, every
    initialDelaySeconds and periodSeconds multiplied by `scale`: "ready", or "killed by the KIND".

    As the kubelet (pkg/kubelet/prober): the startupProbe alone runs until it
    passes; then the liveness and readiness probes. failureThreshold failures
    in a row of the startup or the liveness probe kill the container; the
    readiness probe only takes it out of the Service.
    """
    kinds = ("startupProbe", "livenessProbe", "readinessProbe")
    probes = {kind: pod.container[kind] for kind in kinds if kind in pod.container}
    started = "startupProbe" not in probes
    failures = dict.fromkeys(probes, 0)
    now = time.monotonic()
    due = {kind: now + probe.get("initialDelaySeconds", 0) * scale for kind, probe in probes.items()}
    deadline = now + timeout
    while (now := time.monotonic()) < deadline:
        for kind, probe in probes.items():
            if (kind == "startupProbe") == started or now < due[kind]:
                continue
            due[kind] = now + probe.get("periodSeconds", 10) * scale
            if not pod.passes(probe):
                failures[kind] += 1
                if kind != "readinessProbe" and failures[kind] >= probe.get("failureThreshold", 3):
                    return f"killed by the {kind}"
            elif kind == "readinessProbe":
                return "ready"
            elif kind == "startupProbe":
                started = True
                due = {other: now for other in due}
            else:
                failures[kind] = 0
        time.sleep(0.01)
    raise AssertionError(f"neither ready nor killed in {timeout} s: {pod.logs()}")


class Bucket(http.server.ThreadingHTTPServer):
    """Serves one file at /NAME, as an object store would; the first `failures` GETs get a 503."""

    daemon_threads = True

    def __init__(self, path: Path, failures: int = 0) -> None:
        bucket = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                bucket.requests += 1
                if self.path != f"/{path.name}":
                    self.send_error(404)
                    return
                if bucket.requests <= failures:
                    self.send_error(503)
                    return
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.requests = 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}/{path.name}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class RedisServer:
    """A private redis-server: loopback only, no persistence, its own folder;
    stopped by its pid. start() again after stop() takes the same port: an
    outage, then the same Redis, empty."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [need("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "no", "--dir", str(self.folder), "--logfile", str(self.folder / "log")]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10 * TIME_FACTOR
        while not redis_answers(self.port):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError("redis-server did not answer PING")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL to its process group if it lingers; reaped."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10 * TIME_FACTOR)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class Redis:
    """The bundled Redis Deployment's container, played by the local redis-server."""

    def __init__(self, deployment: dict[str, Any], root: Path) -> None:
        spec = deployment["spec"]["template"]["spec"]
        container = spec["containers"][0]
        binary = need(container["command"][0])
        (mount,) = container["volumeMounts"]
        data = root / "fs" / mount["mountPath"].lstrip("/")
        data.mkdir(parents=True)
        self.port = free_port()
        # The deviations: a free port, and loopback only.
        args = [binary, *container["args"], "--port", str(self.port), "--bind", "127.0.0.1"]
        self.log = open(root / "redis.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            args, cwd=data, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.root = root
        self._wait()

    def ping(self) -> bool:
        return redis_answers(self.port)

    def _wait(self) -> None:
        deadline = time.monotonic() + 10 * TIME_FACTOR
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"redis-server exited: {(self.root / 'redis.log').read_text()}")
            if self.ping():
                return
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        stop_process(self.process)
        self.log.close()


# Headless Chromium on these machines: as root its sandbox cannot start; the
# rest keeps it quiet.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def browser_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A browser writes under HOME and the XDG folders: the test's own."""
    for var in ("HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        folder = tmp_path / var.lower()
        folder.mkdir()
        monkeypatch.setenv(var, str(folder))


NGINX_CONF = """
daemon off;
worker_processes 1;
# ingress-nginx's: old workers keep their WebSockets this long after a reload.
worker_shutdown_timeout 240s;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    upstream replicas {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
{locations}
    }}
}}
"""
SERVER = "        server 127.0.0.1:{port} {fails};"
LOCATION = """        location {path} {{
            proxy_pass http://replicas;
            proxy_next_upstream {retry};
            proxy_next_upstream_tries 3;
            proxy_connect_timeout 5s;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout {read}s;
            proxy_send_timeout {send}s;
        }}"""
# What the balancer does with a connect that fails: ingress-nginx tries the
# next server and marks the failed one (nginx's own defaults); kube-proxy
# (iptables) passes the refusal to the client and marks nothing.
BALANCERS = {
    "ingress": {"retry": "error timeout", "fails": "max_fails=1 fail_timeout=10s"},
    "kube-proxy": {"retry": "off", "fails": "max_fails=0"},
}


class Nginx:
    """A private nginx doing what ingress-nginx does with the generated Ingress,
    over the replicas on `ports` (in turn), changed by reloads.

    `kind` is the balancer played (BALANCERS); `read_timeout` replaces the
    Ingress's; `extra` are more location blocks (a static page, say).
    """

    def __init__(
        self,
        ingress: dict[str, Any],
        ports: list[int],
        prefix: Path,
        *,
        kind: str = "ingress",
        read_timeout: int | None = None,
        extra: str = "",
    ) -> None:
        binary = need("nginx")
        self.kind = BALANCERS[kind]
        annotations = ingress["metadata"]["annotations"]
        read = read_timeout or int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"])
        send = int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"])
        paths = [p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
        retry = self.kind["retry"]
        locations = [LOCATION.format(path=p, read=read, send=send, retry=retry) for p in paths]
        self.locations = "\n".join([extra, *locations] if extra else locations)
        self.port = free_port()
        self.prefix = prefix
        prefix.mkdir(parents=True, exist_ok=True)
        self.conf = prefix / "nginx.conf"
        self.write(ports)
        self.args = [binary, "-c", str(self.conf), "-p", f"{prefix}/", "-e", f"{prefix}/error.log"]
        self.process = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10 * TIME_FACTOR
        while not (prefix / "nginx.pid").exists() or not self.accepts():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"nginx did not start: {self.log()}")
            time.sleep(0.05)

    def accepts(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def write(self, ports: list[int]) -> None:
        servers = "\n".join(SERVER.format(port=port, fails=self.kind["fails"]) for port in ports)
        conf = NGINX_CONF.format(prefix=self.prefix, port=self.port, servers=servers, locations=self.locations)
        self.conf.write_text(conf)

    def reload(self, ports: list[int]) -> None:
        """New upstream servers: new workers take new connections, old ones keep theirs."""
        self.write(ports)
        subprocess.run([*self.args, "-s", "reload"], capture_output=True, check=True, timeout=10)

    def log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def refused_upstream(self) -> int:
        """Connects to a replica refused (the ingress tried the next server)."""
        return self.log().count("connect() failed (111: Connection refused) while connecting to upstream")

    def upstream_errors(self) -> list[str]:
        return [line for line in self.log().splitlines() if "[error]" in line and "upstream" in line]

    def stop(self) -> None:
        subprocess.run([*self.args, "-s", "quit"], capture_output=True, check=False, timeout=10)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class ApiServer:
    """Just enough of a Kubernetes API server for `kubectl apply --dry-run=client`:
    core/v1 discovery with ConfigMaps, and every object absent (so kubectl
    prints what it would create, last-applied annotation and all)."""

    RESOURCES: ClassVar[dict[str, Any]] = {
        "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
        "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []},
        "/api/v1": {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": "v1",
            "resources": [
                {
                    "name": "configmaps",
                    "singularName": "configmap",
                    "namespaced": True,
                    "kind": "ConfigMap",
                    "verbs": ["get", "create", "patch"],
                }
            ],
        },
    }

    def __init__(self) -> None:
        resources = self.RESOURCES

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = resources.get(self.path.partition("?")[0])
                missing = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}
                body = json.dumps(found or missing).encode()
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def validate(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, "1.33", strict=True)


__all__ = ["ApiServer", "Bucket", "Nginx", "Pod", "Redis", "generate", "kube", "need", "play_probes", "validate"]
