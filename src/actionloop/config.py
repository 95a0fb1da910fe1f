"""One frozen settings object, built from environment variables and flags.

The `OW_*` names of the reference proxy keep their meaning (contract part A); the
settings this project adds are listed in SETTINGS with their variables, so the
README table and the parser cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

MIB = 1 << 20


@dataclass(frozen=True)
class Setting:
    field: str
    env: str
    doc: str


SETTINGS = (
    Setting("port", "OW_PORT", "HTTP port"),
    Setting("host", "OW_HOST", "address to listen on"),
    Setting("action_dir", "OW_ACTION_DIR", "folder of the numbered action folders"),
    Setting("websocket", "OW_WEBSOCKET", "path of the WebSocket endpoint; empty: none"),
    Setting("origins", "OW_WEBSOCKET_ORIGIN", "allowed Origin hosts or origins, comma-separated"),
    Setting("autoinit", "OW_AUTOINIT", "file or https:// URL to initialise the action from at start-up"),
    Setting("autoinit_sha256", "OW_AUTOINIT_SHA256", "sha256 the auto-init code must have; required for a URL"),
    Setting("autoinit_main", "OW_AUTOINIT_MAIN", "entry point of the auto-init action"),
    Setting(
        "autoinit_poll", "OW_AUTOINIT_POLL", "seconds between checks of the auto-init file for a new version; 0: none"
    ),
    Setting("wait_for_ack", "OW_WAIT_FOR_ACK", "actions acknowledge start-up on fd 3"),
    Setting("log_init_error", "OW_LOG_INIT_ERROR", "init failures go to the log, not the reply"),
    Setting("execution_env", "OW_EXECUTION_ENV", "execution environment stamped on actions"),
    Setting("compiler", "OW_COMPILER", "script that compiles non-Python sources"),
    Setting("debug", "OW_DEBUG", "verbose logs; /init may be repeated"),
    Setting("max_body", "OW_MAX_BODY", "largest /init or /run body, bytes"),
    Setting("max_message", "OW_WEBSOCKET_MAX_MESSAGE", "largest WebSocket message, bytes"),
    Setting("max_result", "OW_MAX_RESULT", "largest result line of an action, bytes"),
    Setting("max_archive", "OW_MAX_ARCHIVE", "largest unpacked size of a zip or tar.gz, bytes"),
    Setting("start_timeout", "OW_START_TIMEOUT", "seconds an action may take to start"),
    Setting("stop_grace", "OW_STOP_GRACE", "seconds between SIGTERM and SIGKILL"),
    Setting("drain_timeout", "OW_DRAIN_TIMEOUT", "seconds in-flight work may take after SIGTERM"),
    Setting("drain_delay", "OW_DRAIN_DELAY", "seconds after SIGTERM that new connections are still taken"),
    Setting("ping_interval", "OW_WEBSOCKET_PING", "seconds between keep-alive pings; 0: none"),
    Setting("demo", "OW_DEMO", "serve the demo page at /"),
    Setting("message_timeout", "OW_WEBSOCKET_TIMEOUT", "seconds a WebSocket message may take; 0: no limit"),
    Setting("mode", "OW_PROCESS_MODE", "shared, pool or connection"),
    Setting("pool_size", "OW_POOL_SIZE", "action processes in pool mode; 0: one per CPU"),
    Setting("max_processes", "OW_MAX_PROCESSES", "most action processes at once in connection mode"),
    Setting("max_connections", "OW_WEBSOCKET_MAX_CONNECTIONS", "most WebSocket connections at once"),
    Setting("idle_timeout", "OW_WEBSOCKET_IDLE_TIMEOUT", "seconds without a message before closing; 0: never"),
    Setting("token", "OW_WEBSOCKET_TOKEN", "shared secret a WebSocket client must present"),
    Setting("head_timeout", "OW_HEAD_TIMEOUT", "seconds a new connection may take to send its request head"),
    Setting("body_timeout", "OW_BODY_TIMEOUT", "seconds an /init or /run body may stall between reads"),
    Setting("keepalive_timeout", "OW_KEEPALIVE_TIMEOUT", "seconds an HTTP connection may wait for its next request"),
    Setting("api_token", "OW_API_TOKEN", "bearer token of the management API; empty: no API"),
    Setting("api_port", "OW_API_PORT", "port of the management API"),
    Setting("redis_url", "OW_REDIS_URL", "Redis that joins the replicas (redis://HOST:PORT/DB); empty: this one alone"),
    Setting("events", "OW_WEBSOCKET_EVENTS", "invoke the action on connect and disconnect"),
)


@dataclass(frozen=True)
class Config:
    port: int = 8080
    host: str = "0.0.0.0"
    action_dir: Path = Path("action")
    websocket: str = ""
    origins: tuple[str, ...] = ()
    autoinit: str = ""
    autoinit_main: str = "main"
    autoinit_sha256: str = ""
    # Live update (README): a stat every 2 s costs nothing beside the
    # kubelet's own delay of up to a minute in putting a ConfigMap in place.
    autoinit_poll: float = 2.0
    wait_for_ack: bool = False
    log_init_error: bool = False
    execution_env: str = ""
    compiler: str = ""
    debug: bool = False
    max_body: int = 64 * MIB
    max_message: int = 4 * MIB
    max_result: int = 64 * MIB
    max_archive: int = 512 * MIB
    start_timeout: float = 60.0
    stop_grace: float = 5.0
    drain_timeout: float = 20.0
    # After SIGTERM, /readyz fails at once, but the endpoints change takes a
    # while to reach every kube-proxy and ingress controller (typically 1-3 s);
    # until then they still send new connections here, which must not be refused.
    drain_delay: float = 5.0
    # Well under ingress-nginx's default 60 s read timeout (and proxies' idle cut).
    ping_interval: float = 20.0
    demo: bool = False
    message_timeout: float = 60.0
    mode: str = "shared"
    pool_size: int = 0
    max_processes: int = 100
    max_connections: int = 10000
    idle_timeout: float = 3600.0
    token: str = ""
    # Slow clients hold descriptors: every stage of an HTTP connection has a
    # limit (README: Limits). Apache's 20 s for a head and a stalled body;
    # nginx's 75 s keep-alive, longer than the 60 s idle timeout of common
    # proxies and load balancers, so they close first and never reuse a
    # connection we are closing.
    head_timeout: float = 20.0
    body_timeout: float = 20.0
    keepalive_timeout: float = 75.0
    api_token: str = ""
    api_port: int = 8081
    redis_url: str = ""
    events: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("shared", "pool", "connection"):
            raise ValueError(f"process mode {self.mode!r} is not one of shared, pool, connection")
        if self.websocket and (why := path_problem(self.websocket)):
            raise ValueError(f"OW_WEBSOCKET={self.websocket!r}: {why}")
        self._check_autoinit()

    def _check_autoinit(self) -> None:
        """Code from a URL runs only if it is the code expected (source.py)."""
        if "://" in self.autoinit:
            from .source import shown, url_problem  # never a URL's credential in a message

            if why := url_problem(self.autoinit):
                raise ValueError(f"OW_AUTOINIT={shown(self.autoinit)!r}: {why}")
        if self.autoinit_sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", self.autoinit_sha256):
            raise ValueError(f"OW_AUTOINIT_SHA256={self.autoinit_sha256!r}: not a sha256 (64 hex digits)")
        if self.autoinit_sha256 and not self.autoinit:
            # A hash with no code to check: a pod of `actionloop kube
            # --action-in-image` whose image was built without ACTION would
            # otherwise serve no action at all, quietly.
            raise ValueError("OW_AUTOINIT_SHA256 is set but OW_AUTOINIT is not: there is no code to check")
        if "://" in self.autoinit and not self.autoinit_sha256:
            raise ValueError(
                "OW_AUTOINIT is a URL: set OW_AUTOINIT_SHA256 to the sha256 of its content (sha256sum FILE)"
            )

    @property
    def processes(self) -> int:
        """How many processes pool mode runs."""
        return self.pool_size or os.cpu_count() or 1

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def path_problem(path: str) -> str:
    """Why `path` cannot be the WebSocket path (an Ingress path too); "" if it can."""
    if not path.startswith("/"):
        return "a path starts with / (such as /hello)"
    if re.search(r"[\x00-\x20\x7f?#%]", path):
        return "a path has no spaces, control characters, ?, # or %"
    if "//" in path or re.search(r"/\.\.?(/|$)", path):
        return "a path has no empty, . or .. segments"
    return ""


def _convert(kind: Any, text: str) -> Any:
    if kind in (bool, "bool"):
        # The reference treats any non-empty value as set.
        return text.strip().lower() not in ("", "0", "false", "no", "off")
    if kind in ("tuple[str, ...]",):
        return tuple(part for part in text.replace(" ", ",").split(",") if part)
    if kind in ("Path",):
        return Path(text)
    if kind in ("int",):
        return int(text)
    if kind in ("float",):
        return float(text)
    return text


def add_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """A `--flag` for every setting (its variable named in the help)."""
    kinds = {f.name: f.type for f in dataclasses.fields(Config)}
    for setting in SETTINGS:
        if setting.field in skip:
            continue
        flag = "--" + setting.field.replace("_", "-")
        kind = kinds[setting.field]
        if kind == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=f"{setting.doc} ({setting.env})")
        else:
            parser.add_argument(
                flag,
                type=functools.partial(_convert, kind),
                default=None,
                metavar=setting.field.upper(),
                help=f"{setting.doc} ({setting.env})",
            )


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (None where not given)."""
    return {s.field: getattr(args, s.field, None) for s in SETTINGS}


def from_env(environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Settings from the environment (default: os.environ), then `overrides` not None (flags); bad ones raise.

    One Config is built from both: the checks see the settings as a whole
    (OW_AUTOINIT_SHA256 from the environment with the file of `serve FILE`).
    """
    environ = os.environ if environ is None else environ
    kinds = {f.name: f.type for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        text = environ.get(setting.env)
        if text is None or (text == "" and kinds[setting.field] != "bool"):
            continue
        try:
            values[setting.field] = _convert(kinds[setting.field], text)
        except ValueError as exc:
            raise ValueError(f"{setting.env}={text!r}: {exc}") from exc
    values.update({field: value for field, value in (overrides or {}).items() if value is not None})
    return Config(**values)
