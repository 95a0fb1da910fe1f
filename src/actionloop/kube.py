"""Settings to Kubernetes manifests (plain dicts); YAML only at the edge.

One action file becomes a complete deployment (contract part B): a ConfigMap
holding the code, a Deployment running the runtime image with OW_WEBSOCKET and
OW_AUTOINIT pointing into the mounted ConfigMap, a Service and an Ingress
whose timeouts keep WebSockets open. The paths below must agree with
deploy/Dockerfile (WORKDIR, user).

An action too big for a ConfigMap comes instead from a URL (pinned by its
SHA-256), from a PersistentVolumeClaim mounted where the ConfigMap would be,
or from the image itself (deploy/Dockerfile's ACTION build argument, pinned
by the SHA-256 of the local file too). With more than one replica, or an
autoscaler, a PodDisruptionBudget keeps all but one pod up through voluntary
disruptions.

With the management API (contract part D) the token comes from a Secret, the
API port is a second Service port that the Ingress never routes, and Redis,
given or bundled as one Deployment without persistence, joins the replicas.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import secrets
import urllib.parse
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

import yaml

from . import __version__
from .archive import ELF_MAGIC, GZIP_MAGIC, ZIP_MAGIC

CODE_MOUNT = "/etc/actionloop/code"
WORKDIR = "/actionloop"
ACTION_DIR = f"{WORKDIR}/action"
PORT = 8080
USER_ID = 10001
# ingress-nginx cuts a silent proxied connection after proxy-read-timeout
# (60 s by default); pings every PING_INTERVAL keep it well inside that.
INGRESS_TIMEOUT = 3600
PING_INTERVAL = 20
DRAIN_TIMEOUT = 20
# After SIGTERM, new connections are still taken this long (OW_DRAIN_DELAY):
# the time the endpoints change takes to reach kube-proxy and the ingress.
DRAIN_DELAY = 5
# The runtime's OW_STOP_GRACE (its default: not set in the manifests).
STOP_GRACE = 5
API_PORT = 8081
API_TOKEN_KEY = "token"
# Changes when the generated token does, so applying new manifests restarts
# every pod: replicas never disagree on the token.
TOKEN_ANNOTATION = "actionloop/api-token-sha256"
DEFAULT_IMAGE = f"actionloop:{__version__}"  # what deploy/Dockerfile builds; in no registry
# ValidateConfigMap refuses data and binaryData values that sum to more bytes
# than this (binaryData counted decoded, keys not at all).
CONFIGMAP_LIMIT = 1024 * 1024
# Client-side `kubectl apply` copies the whole object, as JSON, into this
# annotation, and an object's annotations may total this many bytes, keys
# included (apimachinery's TotalAnnotationSizeLimitB).
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
ANNOTATIONS_LIMIT = 256 * 1024
CPU_TARGET = 70  # percent of the CPU request, averaged over the pods
# How long auto-init may take before the ports open (container(): startupProbe).
STARTUP_PERIOD = 1  # seconds: ready within a second of listening
STARTUP_SECONDS = 600
MIB = 1 << 20
MEMORY_REQUEST = "64Mi"
MEMORY_LIMIT = "256Mi"
# Auto-init holds the action's bytes in memory while it unpacks them (a
# download once, a file read whole: source.read), beside the runtime's own
# 45 MiB or so and the action processes: the limit for a big FILE is its size
# and this much more, if that is over MEMORY_LIMIT.
MEMORY_MARGIN = 192 * MIB
# resource.Quantity's grammar (apimachinery), less the sign and the milli of
# no use for bytes: digits, maybe a fraction, then a binary or decimal suffix
# or an exponent.
QUANTITY = re.compile(r"(\d+\.?\d*|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?\d+|k|M|G|T|P|E)?")
SUFFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
SUFFIXES |= {f"{prefix}i": 1 << (10 * n) for n, prefix in enumerate("KMGTPE", 1)}
REDIS_IMAGE = "redis:7-alpine"
REDIS_PORT = 6379
REDIS_DATA = "/data"  # the image's WORKDIR
# The redis user and group of the redis:7-alpine image.
REDIS_USER = 999
REDIS_GROUP = 1000


@dataclass(frozen=True)
class KubeSpec:
    name: str
    filename: str
    path: str = "/hello"
    host: str = ""
    replicas: int = 1
    image: str = DEFAULT_IMAGE
    namespace: str = ""
    main: str = "main"
    demo: bool = False
    ingress_class: str = "nginx"
    tls_secret: str = ""  # a kubernetes.io/tls Secret for the Ingress's host
    api: bool = False
    api_token: str = ""  # for a new Secret NAME-api; manifests() draws one if empty
    api_token_secret: str = ""  # an existing Secret instead, with the key API_TOKEN_KEY
    redis_url: str = ""
    with_redis: bool = False
    events: bool = False
    # Where the code comes from instead of a ConfigMap: at most one of these.
    url: str = ""
    code_sha256: str = ""  # of FILE, for a URL or the image; manifests() computes it
    volume_claim: str = ""
    action_in_image: bool = False
    memory: str = ""  # the memory limit; "": MEMORY_LIMIT, or more for a big file (memory_limit)
    min_replicas: int = 0  # an autoscaler from min to max replicas; 0: none
    max_replicas: int = 0
    cpu_target: int = CPU_TARGET

    @property
    def in_config_map(self) -> bool:
        return not (self.url or self.volume_claim or self.action_in_image)

    @property
    def autoscaled(self) -> bool:
        return self.max_replicas > 0

    @property
    def several(self) -> bool:
        """More than one pod, or maybe so (not counting a rollout's extra one)."""
        return self.replicas > 1 or self.autoscaled

    @property
    def management(self) -> bool:
        """The API is on: asked for, or implied, since Redis only joins the replicas' APIs."""
        return self.api or self.with_redis or bool(self.redis_url or self.api_token_secret)

    @property
    def token_secret(self) -> str:
        return self.api_token_secret or f"{self.name}-api"

    @property
    def redis(self) -> str:
        """OW_REDIS_URL: the one given, or the bundled Redis Service's DNS name."""
        return f"redis://{self.name}-redis:{REDIS_PORT}/0" if self.with_redis else self.redis_url


def quantity_bytes(text: str) -> int:
    """Bytes in a Kubernetes quantity of memory ("256Mi", "1G", "1e9"), rounded up; ValueError if it is none."""
    match = QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity of memory: e.g. 512Mi, 2Gi, 1G or 1073741824 (bytes)")
    number, suffix = Decimal(match[1]), match[2] or ""
    scaled = number * SUFFIXES[suffix] if suffix in SUFFIXES else number.scaleb(int(suffix[1:]))
    return math.ceil(scaled)


def memory_needed(size: int) -> int:
    """The memory limit for an action of `size` bytes, whole MiB: the default, or more for a big one."""
    mib = -(-(size + MEMORY_MARGIN) // MIB)
    return max(mib * MIB, quantity_bytes(MEMORY_LIMIT))


def memory_limit(spec: KubeSpec, size: int) -> str:
    """The container's memory limit: the one given, else what memory_needed says."""
    if spec.memory:
        return spec.memory
    needed = memory_needed(size)
    return MEMORY_LIMIT if needed == quantity_bytes(MEMORY_LIMIT) else f"{needed // MIB}Mi"


def config_key(filename: str) -> str:
    """A ConfigMap key from a file name (keys allow [-._a-zA-Z0-9])."""
    return re.sub(r"[^-._a-zA-Z0-9]", "_", filename) or "action"


def is_binary(code: bytes) -> bool:
    if code.startswith((ZIP_MAGIC, GZIP_MAGIC, ELF_MAGIC)):
        return True
    try:
        code.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def labels(spec: KubeSpec, component: str = "actionloop") -> dict[str, str]:
    return {"app.kubernetes.io/name": spec.name, "app.kubernetes.io/component": component}


def metadata(spec: KubeSpec, name: str | None = None, component: str = "actionloop") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name or spec.name, "labels": labels(spec, component)}
    if spec.namespace:
        meta["namespace"] = spec.namespace
    return meta


def config_map(spec: KubeSpec, code: bytes) -> dict[str, Any]:
    key = config_key(spec.filename)
    doc: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(spec, f"{spec.name}-code")}
    if is_binary(code):
        doc["binaryData"] = {key: base64.b64encode(code).decode()}
    else:
        doc["data"] = {key: code.decode("utf-8")}
    return doc


def too_big(spec: KubeSpec, code: bytes) -> str:
    """Why the action cannot go into a ConfigMap, with the ways it can go; "" if it fits."""
    if not spec.in_config_map or len(code) <= CONFIGMAP_LIMIT:
        return ""
    return (
        f"{spec.filename} is {len(code):,} bytes, more than a ConfigMap holds ({CONFIGMAP_LIMIT:,} bytes). "
        f"Ship it one of three other ways (README: Deploy on Kubernetes): "
        f"upload it and pass --url https://HOST/{spec.filename} (each pod downloads it and checks "
        f"its SHA-256 against this file's); or copy it as {spec.filename} onto a PersistentVolumeClaim "
        f"and pass --volume-claim CLAIM; or build it into the image with "
        f"`docker build -f deploy/Dockerfile --build-arg ACTION=FILE -t IMAGE .` (FILE inside the build "
        f"context), push IMAGE and pass --image IMAGE --action-in-image."
    )


def last_applied_size(doc: dict[str, Any]) -> int:
    """Bytes the annotation of client-side `kubectl apply` would add to doc.

    kubectl (util.GetModifiedConfiguration) encodes the object with an empty
    annotations map and the namespace it fills in, with Go's JSON encoder:
    compact, a final newline, and `<`, `>`, `&`, U+2028 and U+2029 written as
    six-byte escapes, where Python's JSON keeps them as they are.
    """
    meta = {**doc["metadata"], "annotations": {}}
    meta.setdefault("namespace", "n" * 63)  # kubectl's current one: at most 63 characters
    text = json.dumps({**doc, "metadata": meta}, ensure_ascii=False, separators=(",", ":"))
    escaped = sum(text.count(char) for char in "<>&") * 5 + sum(text.count(char) for char in "\u2028\u2029") * 3
    return len(LAST_APPLIED) + len(text.encode()) + escaped + 1


def autoinit_env(spec: KubeSpec) -> dict[str, str]:
    """OW_AUTOINIT where the pod finds the code (and the hash that pins a URL)."""
    if spec.action_in_image:
        # The image's own OW_AUTOINIT (deploy/Dockerfile, ACTION), checked
        # against FILE: an image built from another file, or none, fails
        # loudly, and a new FILE changes the pod template, hence a rollout,
        # even under a reused tag.
        return {"OW_AUTOINIT_SHA256": spec.code_sha256}
    if spec.url:
        return {"OW_AUTOINIT": spec.url, "OW_AUTOINIT_SHA256": spec.code_sha256}
    if spec.volume_claim:
        return {"OW_AUTOINIT": f"{CODE_MOUNT}/{spec.filename}"}
    return {"OW_AUTOINIT": f"{CODE_MOUNT}/{config_key(spec.filename)}"}


def code_volume(spec: KubeSpec) -> dict[str, Any] | None:
    """The volume mounted at CODE_MOUNT: the ConfigMap or the claim; None for a URL or the image."""
    if spec.volume_claim:
        return {"name": "code", "persistentVolumeClaim": {"claimName": spec.volume_claim, "readOnly": True}}
    if spec.in_config_map:
        return {"name": "code", "configMap": {"name": f"{spec.name}-code"}}
    return None


def container(spec: KubeSpec) -> dict[str, Any]:
    env = {
        "OW_WEBSOCKET": spec.path,
        **autoinit_env(spec),
        "OW_AUTOINIT_MAIN": spec.main,
        "OW_WEBSOCKET_PING": str(PING_INTERVAL),
        "OW_DRAIN_TIMEOUT": str(DRAIN_TIMEOUT),
        "OW_DRAIN_DELAY": str(DRAIN_DELAY),
    }
    if spec.host:
        # Browsers on other sites may not open WebSockets here (contract part B).
        env["OW_WEBSOCKET_ORIGIN"] = spec.host
    if spec.demo:
        env["OW_DEMO"] = "1"
    ports = [{"name": "http", "containerPort": PORT, "protocol": "TCP"}]
    if spec.management:
        env["OW_API_PORT"] = str(API_PORT)
        ports.append({"name": "api", "containerPort": API_PORT, "protocol": "TCP"})
    if spec.redis:
        env["OW_REDIS_URL"] = spec.redis
    if spec.events:
        env["OW_WEBSOCKET_EVENTS"] = "1"
    env_list: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in env.items()]
    if spec.management:
        token = {"secretKeyRef": {"name": spec.token_secret, "key": API_TOKEN_KEY}}
        env_list.append({"name": "OW_API_TOKEN", "valueFrom": token})
    mounts: list[dict[str, Any]] = [{"name": "action", "mountPath": ACTION_DIR}, {"name": "tmp", "mountPath": "/tmp"}]
    if code_volume(spec) is not None:
        mounts.insert(0, {"name": "code", "mountPath": CODE_MOUNT, "readOnly": True})
    probe = {"port": "http"}
    # Auto-init comes before the ports open (cli.serve_runtime), and may take
    # minutes: without a startup probe the liveness probe would kill a pod
    # that starts in over 30 s, again and again. This one holds the others
    # back for up to STARTUP_SECONDS; a pod not listening by then is killed
    # and restarted. The API, when on, opens its port just after the public
    # one: readiness then waits for both.
    started = {"tcpSocket": {"port": "api" if spec.management else "http"}}
    probes: dict[str, Any] = {
        "startupProbe": {
            **started,
            "periodSeconds": STARTUP_PERIOD,
            "failureThreshold": STARTUP_SECONDS // STARTUP_PERIOD,
        },
        "readinessProbe": {"httpGet": {"path": "/readyz", **probe}, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/healthz", **probe}, "periodSeconds": 10, "failureThreshold": 3},
    }
    return {
        "name": "action",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "ports": ports,
        "env": env_list,
        **probes,
        "resources": {
            "requests": {"cpu": "100m", "memory": MEMORY_REQUEST},
            "limits": {"cpu": "1", "memory": spec.memory or MEMORY_LIMIT},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }


def deployment(spec: KubeSpec) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [{"name": "action", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    if (code := code_volume(spec)) is not None:
        volumes.insert(0, code)
    pod_meta: dict[str, Any] = {"labels": labels(spec)}
    if spec.api_token and not spec.api_token_secret:
        pod_meta["annotations"] = {TOKEN_ANNOTATION: hashlib.sha256(spec.api_token.encode()).hexdigest()}
    pod = {
        "metadata": pod_meta,
        "spec": {
            # The whole shutdown (README: Shutdown) fits, with 4 s to spare:
            # delay 5 + drain 20 + last closes 1 + action stop 5 = 31 s.
            "terminationGracePeriodSeconds": DRAIN_DELAY + DRAIN_TIMEOUT + 1 + STOP_GRACE + 4,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": USER_ID,
                "runAsGroup": USER_ID,
                "fsGroup": USER_ID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            # A Service named like an OW_ setting (`ow` gives OW_PORT=tcp://...)
            # would otherwise set it in every pod of the namespace.
            "enableServiceLinks": False,
            "containers": [container(spec)],
            "volumes": volumes,
        },
    }
    body: dict[str, Any] = {
        # A new pod is ready before an old one drains (README: Shutdown):
        # a rollout never has fewer pods serving than asked for.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "selector": {"matchLabels": labels(spec)},
        "template": pod,
    }
    if not spec.autoscaled:  # else the autoscaler owns the count, and apply must not reset it
        body = {"replicas": spec.replicas, **body}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(spec), "spec": body}


def disruption_budget(spec: KubeSpec) -> dict[str, Any]:
    """A node drain or other voluntary eviction takes one pod at a time, each drained in turn."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(spec),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(spec)}},
    }


def autoscaler(spec: KubeSpec) -> dict[str, Any]:
    cpu = {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": spec.cpu_target}}
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(spec),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name},
            "minReplicas": spec.min_replicas,
            "maxReplicas": spec.max_replicas,
            "metrics": [{"type": "Resource", "resource": cpu}],
            # Every pod removed closes its WebSockets (1001) and its clients
            # reconnect to the others: one pod a minute spreads those waves.
            "behavior": {"scaleDown": {"policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]}},
        },
    }


def service(spec: KubeSpec) -> dict[str, Any]:
    ports = [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    if spec.management:
        # Inside the cluster only: the Ingress routes the http port alone.
        ports.append({"name": "api", "port": API_PORT, "targetPort": "api", "protocol": "TCP"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(spec),
        "spec": {"selector": labels(spec), "ports": ports},
    }


def ingress(spec: KubeSpec) -> dict[str, Any]:
    meta = metadata(spec)
    meta["annotations"] = {
        "nginx.ingress.kubernetes.io/proxy-read-timeout": str(INGRESS_TIMEOUT),
        "nginx.ingress.kubernetes.io/proxy-send-timeout": str(INGRESS_TIMEOUT),
    }
    backend = {"service": {"name": spec.name, "port": {"name": "http"}}}
    # With the demo page, "/" carries both the page and the WebSocket path.
    path = "/" if spec.demo else spec.path
    rule: dict[str, Any] = {"http": {"paths": [{"path": path, "pathType": "Prefix", "backend": backend}]}}
    if spec.host:
        rule = {"host": spec.host, **rule}
    body: dict[str, Any] = {"ingressClassName": spec.ingress_class, "rules": [rule]}
    if spec.tls_secret:  # wss:// and https:// at the ingress; the pods speak plain HTTP behind it
        body["tls"] = [{"hosts": [spec.host], "secretName": spec.tls_secret}]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": meta, "spec": body}


def secret(spec: KubeSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(spec, spec.token_secret),
        "type": "Opaque",
        "data": {API_TOKEN_KEY: base64.b64encode(spec.api_token.encode()).decode()},
    }


def redis_deployment(spec: KubeSpec) -> dict[str, Any]:
    container = {
        "name": "redis",
        "image": REDIS_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["redis-server"],
        # No persistence: Redis holds only who is connected where, and every
        # replica writes its connections anew after a restart (bus.py).
        # Unprotected: only this app's pods reach it (redis_policy).
        "args": ["--save", "", "--appendonly", "no", "--protected-mode", "no"],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 10, "failureThreshold": 3},
        "resources": {
            "requests": {"cpu": "50m", "memory": "32Mi"},
            "limits": {"cpu": "500m", "memory": "256Mi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "data", "mountPath": REDIS_DATA}],
    }
    pod = {
        "metadata": {"labels": labels(spec, "redis")},
        "spec": {
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": REDIS_USER,
                "runAsGroup": REDIS_GROUP,
                "fsGroup": REDIS_GROUP,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "enableServiceLinks": False,  # Redis needs no Service's address in its env
            "containers": [container],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(spec, f"{spec.name}-redis", "redis"),
        "spec": {
            "replicas": 1,
            # Never two at once: replicas on different Redises would not see each other.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels(spec, "redis")},
            "template": pod,
        },
    }


def redis_service(spec: KubeSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(spec, f"{spec.name}-redis", "redis"),
        "spec": {
            "selector": labels(spec, "redis"),
            "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}],
        },
    }


def redis_policy(spec: KubeSpec) -> dict[str, Any]:
    """Only the runtime's pods may reach the bundled Redis (it has no password)."""
    allowed = {
        "from": [{"podSelector": {"matchLabels": labels(spec)}}],
        "ports": [{"port": "redis", "protocol": "TCP"}],
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(spec, f"{spec.name}-redis", "redis"),
        "spec": {
            "podSelector": {"matchLabels": labels(spec, "redis")},
            "policyTypes": ["Ingress"],
            "ingress": [allowed],
        },
    }


def new_token() -> str:
    return secrets.token_urlsafe(32)


def caveats(spec: KubeSpec, code: bytes) -> list[str]:
    """What the manifests will do that the user may not expect."""
    found = []
    if spec.image == DEFAULT_IMAGE:
        found.append(
            f"the image {DEFAULT_IMAGE} is in no registry: build deploy/Dockerfile "
            f"(docker build -f deploy/Dockerfile -t REGISTRY/actionloop:{__version__} .), "
            "push it where the cluster pulls from, and pass --image"
        )
    if spec.in_config_map and last_applied_size(config_map(spec, code)) > ANNOTATIONS_LIMIT:
        found.append(
            f"the ConfigMap {spec.name}-code is too big for client-side `kubectl apply` (it copies the "
            f"object into an annotation, and annotations may hold {ANNOTATIONS_LIMIT:,} bytes): "
            "use `kubectl apply --server-side -f -` (or `kubectl create -f -`)"
        )
    if spec.url and (urllib.parse.urlsplit(spec.url).username is not None or urllib.parse.urlsplit(spec.url).query):
        found.append(
            "the --url carries a credential (user:password@ or a query such as a signature) and the "
            "Deployment shows it in plain text: keep OW_AUTOINIT in a Secret instead (README: Auto-init from a URL)"
        )
    if spec.management and spec.several and not spec.redis:
        alone = "the API of each replica reaches only its own connections"
        found.append(f"{alone}: add --with-redis or --redis URL")
    found += memory_caveats(spec, len(code))
    return found


def memory_caveats(spec: KubeSpec, size: int) -> list[str]:
    """A big FILE: the default limit raised, or a --memory below what it needs (a small one: nothing)."""
    needed = memory_needed(size)
    if needed == quantity_bytes(MEMORY_LIMIT):
        return []
    held = f"auto-init holds {spec.filename}'s {size:,} bytes in memory while it unpacks them"
    if not spec.memory:
        limit = memory_limit(spec, size)
        return [f"{held}: the pods' memory limit is {limit} instead of {MEMORY_LIMIT} (--memory sets it)"]
    if quantity_bytes(spec.memory) < needed:
        return [f"--memory {spec.memory} may be too little: {held} (about {needed // MIB}Mi)"]
    return []


def manifests(spec: KubeSpec, code: bytes) -> list[dict[str, Any]]:
    if spec.management and not spec.api_token_secret and not spec.api_token:
        spec = replace(spec, api_token=new_token())
    if spec.url or spec.action_in_image:
        spec = replace(spec, code_sha256=hashlib.sha256(code).hexdigest())
    spec = replace(spec, memory=memory_limit(spec, len(code)))
    docs = [config_map(spec, code)] if spec.in_config_map else []
    if spec.management and not spec.api_token_secret:
        docs.append(secret(spec))
    if spec.with_redis:
        docs += [redis_deployment(spec), redis_service(spec), redis_policy(spec)]
    docs += [deployment(spec), service(spec), ingress(spec)]
    if spec.several:
        docs.append(disruption_budget(spec))
    if spec.autoscaled:
        docs.append(autoscaler(spec))
    if spec.namespace:
        docs.insert(0, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": spec.namespace}})
    return docs


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the action's code) as readable literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _represent_str)


def to_yaml(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
