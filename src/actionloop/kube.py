"""Settings to Kubernetes manifests (plain dicts); YAML only at the edge.

One action file becomes a complete deployment (SPEC.md part B): a ConfigMap
holding the code, a Deployment running the runtime image with OW_WEBSOCKET and
OW_AUTOINIT pointing into the mounted ConfigMap, a Service and an Ingress
whose timeouts keep WebSockets open. The paths below must agree with
deploy/Dockerfile (WORKDIR, user).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
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


@dataclass(frozen=True)
class KubeSpec:
    name: str
    filename: str
    path: str = "/hello"
    host: str = ""
    replicas: int = 1
    image: str = f"actionloop:{__version__}"
    namespace: str = ""
    main: str = "main"
    demo: bool = False
    ingress_class: str = "nginx"


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


def labels(spec: KubeSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": spec.name, "app.kubernetes.io/component": "actionloop"}


def metadata(spec: KubeSpec, name: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name or spec.name, "labels": labels(spec)}
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


def container(spec: KubeSpec) -> dict[str, Any]:
    env = {
        "OW_WEBSOCKET": spec.path,
        "OW_AUTOINIT": f"{CODE_MOUNT}/{config_key(spec.filename)}",
        "OW_AUTOINIT_MAIN": spec.main,
        "OW_WEBSOCKET_PING": str(PING_INTERVAL),
        "OW_DRAIN_TIMEOUT": str(DRAIN_TIMEOUT),
    }
    if spec.host:
        # Browsers on other sites may not open WebSockets here (SPEC.md part B).
        env["OW_WEBSOCKET_ORIGIN"] = spec.host
    if spec.demo:
        env["OW_DEMO"] = "1"
    probe = {"port": "http"}
    return {
        "name": "action",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "readinessProbe": {"httpGet": {"path": "/readyz", **probe}, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/healthz", **probe}, "periodSeconds": 10, "failureThreshold": 3},
        "resources": {
            "requests": {"cpu": "100m", "memory": "64Mi"},
            "limits": {"cpu": "1", "memory": "256Mi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "code", "mountPath": CODE_MOUNT, "readOnly": True},
            {"name": "action", "mountPath": ACTION_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def deployment(spec: KubeSpec) -> dict[str, Any]:
    pod = {
        "metadata": {"labels": labels(spec)},
        "spec": {
            # Drain (in-flight messages, 1001 to clients) fits inside the grace period.
            "terminationGracePeriodSeconds": DRAIN_TIMEOUT + 10,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": USER_ID,
                "runAsGroup": USER_ID,
                "fsGroup": USER_ID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container(spec)],
            "volumes": [
                {"name": "code", "configMap": {"name": f"{spec.name}-code"}},
                {"name": "action", "emptyDir": {}},
                {"name": "tmp", "emptyDir": {}},
            ],
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(spec),
        "spec": {"replicas": spec.replicas, "selector": {"matchLabels": labels(spec)}, "template": pod},
    }


def service(spec: KubeSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(spec),
        "spec": {
            "selector": labels(spec),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
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
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": meta,
        "spec": {"ingressClassName": spec.ingress_class, "rules": [rule]},
    }


def manifests(spec: KubeSpec, code: bytes) -> list[dict[str, Any]]:
    docs = [config_map(spec, code), deployment(spec), service(spec), ingress(spec)]
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
