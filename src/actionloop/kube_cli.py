"""The `actionloop kube` command: its flags, their checks, manifests on stdout.

Every value that would make Kubernetes refuse an object, or make a pod fail
at start, is refused here (exit 2) with the rule it breaks: names, paths,
URLs, memory quantities, flags that exclude each other. What the manifests
will do that a user may not expect is said on stderr (kube.caveats), and the
manifests still printed. kube.py turns the settings into the documents.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from . import __version__, kube
from .config import path_problem
from .runtime import log
from .source import url_problem


def main(argv: list[str]) -> int:
    return print_manifests(kube_parser().parse_args(argv))


def kube_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actionloop kube",
        description="Print Kubernetes manifests (YAML) that serve an action file over WebSocket.",
        allow_abbrev=False,
    )
    parser.add_argument("file", type=Path, help="the action: Python source, zip, tar.gz or executable")
    parser.add_argument(
        "--name",
        required=True,
        type=app_name,
        help="name of the ConfigMap, Deployment, Service and Ingress (lowercase letters, digits and -)",
    )
    parser.add_argument("--path", default="/hello", type=ws_path, help="WebSocket path (default /hello)")
    parser.add_argument("--host", type=ingress_host, help="Ingress host; also the only allowed browser Origin")
    count = parser.add_mutually_exclusive_group()
    count.add_argument("--replicas", type=int, help="pods (default 1)")
    count.add_argument(
        "--autoscale",
        metavar="MIN:MAX",
        type=replica_range,
        help="a HorizontalPodAutoscaler on CPU keeps MIN to MAX pods instead",
    )
    parser.add_argument(
        "--cpu-target",
        metavar="PERCENT",
        type=percent,
        help="with --autoscale: the average CPU use it aims at, in percent of the CPU request (default 70)",
    )
    parser.add_argument("--image", help=f"runtime image (default actionloop:{__version__}, which no registry has)")
    parser.add_argument("--namespace", type=dns_label, help="namespace to create and use")
    parser.add_argument("--main", default="main", help="entry point (default main)")
    parser.add_argument("--ingress-class", default="nginx", type=dns_subdomain, help="ingressClassName (default nginx)")
    parser.add_argument(
        "--tls-secret",
        metavar="SECRET",
        type=dns_subdomain,
        help="TLS at the Ingress for --host, with this kubernetes.io/tls Secret (wss://, https://)",
    )
    parser.add_argument(
        "--memory",
        metavar="LIMIT",
        type=memory_limit,
        help="the pods' memory limit, a Kubernetes quantity (default 256Mi, more for a FILE over 64 MiB: "
        "auto-init holds it in memory while it unpacks it)",
    )
    parser.add_argument("--demo", action="store_true", help="also serve the demo page at /")
    large = parser.add_argument_group(
        "the code elsewhere than in a ConfigMap, which holds 1 MiB (README: Deploy on Kubernetes)"
    ).add_mutually_exclusive_group()
    large.add_argument(
        "--url",
        type=http_url,
        help="each pod downloads FILE, uploaded there, and checks it has FILE's SHA-256",
    )
    large.add_argument(
        "--volume-claim",
        metavar="CLAIM",
        type=dns_subdomain,
        help="FILE is on this existing PersistentVolumeClaim, under its base name",
    )
    large.add_argument(
        "--action-in-image",
        action="store_true",
        help="--image was built with the action (deploy/Dockerfile --build-arg ACTION=FILE)",
    )
    push = parser.add_argument_group("push, channels and events (README: Push, channels and events)")
    push.add_argument(
        "--api",
        action="store_true",
        help="the management API on port 8081: a Service port `api` the Ingress never routes, "
        "its token a new random one in a Secret NAME-api",
    )
    push.add_argument(
        "--api-token-secret",
        metavar="SECRET",
        type=dns_subdomain,
        help="take the API token from this existing Secret (key `token`) instead; implies --api",
    )
    redis = push.add_mutually_exclusive_group()
    redis.add_argument(
        "--redis",
        metavar="URL",
        type=redis_url,
        help="Redis that joins the replicas' APIs (OW_REDIS_URL, redis://HOST:PORT/DB); implies --api",
    )
    redis.add_argument(
        "--with-redis",
        action="store_true",
        help="also deploy one Redis without persistence (Deployment and Service NAME-redis) and use it; implies --api",
    )
    push.add_argument(
        "--events", action="store_true", help="invoke the action on connect and disconnect (OW_WEBSOCKET_EVENTS=1)"
    )
    return parser


# Object names (apimachinery's validation): most are DNS-1123 subdomains; a
# namespace is a DNS-1123 label, a Service name a DNS-1035 label.
DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN = rf"{DNS_LABEL}(\.{DNS_LABEL})*"
DNS_1035_LABEL = r"[a-z]([-a-z0-9]*[a-z0-9])?"
# NAME-redis, the bundled Redis's Service, is a DNS-1035 label of 63 at most too.
NAME_LENGTH = 63 - len("-redis")


def dns_subdomain(text: str) -> str:
    """A Secret, claim or class name, refused now rather than by the API server."""
    return object_name(text, DNS_SUBDOMAIN, 253, "lowercase letters, digits, - and ., a letter or digit at each end")


def dns_label(text: str) -> str:
    return object_name(text, DNS_LABEL, 63, "lowercase letters, digits and -, a letter or digit at each end")


def ingress_host(text: str) -> str:
    """--host: an Ingress rule's host (the API server takes no IP address and
    no port), and the one browser Origin allowed, so no wildcard either."""
    if re.fullmatch(r"[0-9.]+", text):
        raise argparse.ArgumentTypeError(f"{text!r}: an Ingress host is a name, not an IP address")
    rule = "a host name (lowercase letters, digits, - and .), without port, scheme or wildcard"
    return object_name(text, DNS_SUBDOMAIN, 253, rule)


def app_name(text: str) -> str:
    """--name: the Service's name (a DNS-1035 label), and NAME-redis's too."""
    rule = "lowercase letters, digits and -, starting with a letter and ending with a letter or digit"
    return object_name(text, DNS_1035_LABEL, NAME_LENGTH, rule)


def object_name(text: str, pattern: str, length: int, rule: str) -> str:
    if not re.fullmatch(pattern, text) or len(text) > length:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid name in Kubernetes: {rule}, {length} at most")
    return text


def memory_limit(text: str) -> str:
    """--memory: a quantity Kubernetes takes, and no less than the request."""
    try:
        size = kube.quantity_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size < kube.quantity_bytes(kube.MEMORY_REQUEST):
        raise argparse.ArgumentTypeError(f"at least {kube.MEMORY_REQUEST}, the pods' memory request")
    return text


def redis_url(text: str) -> str:
    """`--redis URL`: a URL redis-py takes, refused now rather than by every pod at start-up."""
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise argparse.ArgumentTypeError("a Redis URL starts with redis://, rediss:// or unix://")
    return text


def http_url(text: str) -> str:
    """`--url URL`: what the runtime will fetch (README: Auto-init from a URL)."""
    if why := url_problem(text):
        raise argparse.ArgumentTypeError(why)
    return text


def ws_path(text: str) -> str:
    """`--path`: the WebSocket path, and an Ingress path, refused now rather than by the pods or the API server."""
    if why := path_problem(text):
        raise argparse.ArgumentTypeError(why)
    return text


def replica_range(text: str) -> tuple[int, int]:
    """`--autoscale MIN:MAX`, refused unless 1 <= MIN <= MAX."""
    low, _, high = text.partition(":")
    try:
        least, most = int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError("MIN:MAX, two whole numbers, e.g. 2:10") from None
    if not 1 <= least <= most:
        raise argparse.ArgumentTypeError("MIN is at least 1 and MAX at least MIN")
    return least, most


def percent(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("a whole number of percent, at least 1")
    return int(text)


def kube_refusal(args: argparse.Namespace) -> str:
    """Flags that make no sense together (argparse checks the rest)."""
    if args.tls_secret and not args.host:
        return "--tls-secret needs --host: a certificate is for a host name"
    if args.action_in_image and not args.image:
        return "--action-in-image needs --image: the image built with the action (deploy/Dockerfile, ACTION)"
    if args.cpu_target is not None and args.autoscale is None:
        return "--cpu-target needs --autoscale"
    return ""


def print_manifests(args: argparse.Namespace) -> int:
    if refusal := kube_refusal(args):
        log(f"actionloop kube: {refusal}")
        return 2

    spec = kube.KubeSpec(
        name=args.name,
        filename=args.file.name,
        path=args.path,
        host=args.host or "",
        replicas=1 if args.replicas is None else args.replicas,
        image=args.image or kube.DEFAULT_IMAGE,
        namespace=args.namespace or "",
        main=args.main,
        demo=args.demo,
        ingress_class=args.ingress_class,
        tls_secret=args.tls_secret or "",
        api=args.api,
        api_token_secret=args.api_token_secret or "",
        redis_url=args.redis or "",
        with_redis=args.with_redis,
        events=args.events,
        url=args.url or "",
        volume_claim=args.volume_claim or "",
        action_in_image=args.action_in_image,
        memory=args.memory or "",
        min_replicas=args.autoscale[0] if args.autoscale else 0,
        max_replicas=args.autoscale[1] if args.autoscale else 0,
        cpu_target=args.cpu_target or kube.CPU_TARGET,
    )
    try:
        code = args.file.read_bytes()
    except OSError as exc:
        log(f"actionloop kube: cannot read {args.file}: {exc.strerror}")
        return 1
    if refusal := kube.too_big(spec, code):
        log(f"actionloop kube: {refusal}")
        return 2
    for caveat in kube.caveats(spec, code):
        log(f"actionloop kube: {caveat}")
    sys.stdout.write(kube.to_yaml(kube.manifests(spec, code)))
    return 0
