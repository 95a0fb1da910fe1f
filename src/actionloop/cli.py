"""The `actionloop` command.

- `actionloop [-debug] [--port N] [--action-dir DIR]`: the container
  entrypoint, configured by the `OW_*` variables like the reference proxy.
- `actionloop -version`, `actionloop -compile MAIN` (action on stdin, the
  prepared action as a zip on stdout), as in the reference proxy.
- `actionloop serve FILE [--ws PATH] [--main NAME] [--port N]`: run one file
  as a WebSocket server, through the same code path as auto-init.
- `actionloop kube FILE --name NAME`: print Kubernetes manifests for one file
  (kube_cli.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, archive, source
from .config import Config, add_flags, flag_values, from_env
from .errors import ActionLoopError
from .listener import Endpoints, listen
from .prepare import prepare
from .reaper import adopt_orphans, sweep_orphans
from .runtime import Runtime, log
from .watch import Watcher, one_line
from .websocket import Sockets, drain

if TYPE_CHECKING:  # imported where used: a pod started with env only needs neither
    import argparse

COMMANDS = """\
commands:
  serve FILE  run an action file as a WebSocket server (actionloop serve -h)
  kube FILE   print Kubernetes manifests that serve an action file (actionloop kube -h)
"""

# `serve FILE` with a Python source: the action's `__main__.py` is this, which
# compiles FILE's bytes under FILE's own name, so tracebacks name FILE, not the
# temporary copy. The code has lines of its own: a traceback through here shows
# only the short first line.
NAMED_SOURCE = """\
# Written by actionloop serve: {path}, compiled under its own name.
exec(compile(
    {code!r},
    {path!r},
    "exec",
))
"""


def entry_parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="actionloop",
        description="OpenWhisk ActionLoop runtime with a WebSocket mode.",
        epilog=COMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    # Single-dash spellings are the reference proxy's; double-dash the usual.
    parser.add_argument("-debug", "--debug", action="store_true", default=None, help="verbose; allow re-init")
    parser.add_argument("-version", "--version", action="store_true", help="print the version and exit")
    parser.add_argument("-compile", "--compile", metavar="MAIN", help="prepare the action on stdin as a zip on stdout")
    add_flags(parser, skip=("debug",))
    return parser


def serve_parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="actionloop serve", description="Run an action file as a WebSocket server.", allow_abbrev=False
    )
    parser.add_argument("file", help="the action: Python source, zip, tar.gz or executable")
    parser.add_argument("--ws", default="/ws", help="WebSocket path (default /ws)")
    parser.add_argument("--main", help="entry point (default main)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--origin", action="extend", type=origin_list, help="allowed Origins, comma-separated (repeatable)"
    )
    parser.add_argument("--no-demo", action="store_true", help="do not serve the demo page at /")
    add_flags(parser, skip=("websocket", "autoinit", "autoinit_main", "host", "origins", "demo"))
    return parser


def origin_list(text: str) -> list[str]:
    """`--origin a.example,b.example`: split like OW_WEBSOCKET_ORIGIN; none at all is an error."""
    import argparse

    origins = [origin for origin in text.replace(" ", ",").split(",") if origin]
    if not origins:
        # Not "any origin", which an empty list would mean.
        raise argparse.ArgumentTypeError("no origin given")
    return origins


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["serve"]:
            return serve_file(serve_parser().parse_args(argv[1:]))
        if argv[:1] == ["kube"]:
            from . import kube_cli  # PyYAML and the kube flags: only for this command

            return kube_cli.main(argv[1:])
        # The usual in a pod: no arguments, settings from the environment only.
        args = entry_parser().parse_args(argv) if argv else None
        if args is not None and args.version:
            print(f"actionloop {__version__}")
            return 0
        config = from_env(overrides=flag_values(args) if args is not None else None)
    except ValueError as exc:
        log(f"actionloop: bad setting: {exc}")
        return 2
    if args is not None and args.compile:
        return compile_action(args.compile, config)
    return run(config)


def serve_file(args: argparse.Namespace) -> int:
    given = flag_values(args) | {
        "websocket": args.ws,
        "autoinit": args.file,
        "autoinit_main": args.main,
        "host": args.host,
        "origins": tuple(args.origin) if args.origin else None,
        "demo": not args.no_demo,
    }
    config = from_env(overrides=given)
    import tempfile

    if args.action_dir is not None:
        return run(config, announce=True)
    with tempfile.TemporaryDirectory(prefix="actionloop-") as folder:
        config = config.replace(action_dir=Path(folder))
        return run(config, announce=True, read_from=named_source(config, Path(folder)))


def named_source(config: Config, folder: Path) -> str:
    """For a plain Python source, a NAMED_SOURCE for it in `folder`; else ""."""
    if config.autoinit_sha256 or source.is_url(config.autoinit):
        return ""  # the bytes checked and loaded must be the file's own
    try:
        code = Path(config.autoinit).read_bytes()
    except OSError:
        return ""  # auto-init says so, naming the file
    named = named_code(config, code)
    if named is code:
        return ""
    stand_in = folder / "named_source.py"
    stand_in.write_bytes(named)
    return str(stand_in)


def named_code(config: Config, code: bytes) -> bytes:
    """A plain Python source wrapped in NAMED_SOURCE (at start-up and at each
    live update); anything else, the same bytes."""
    # Only what prepare gives to the Python launcher; anything else goes as it is.
    archives = (archive.ZIP_MAGIC, archive.GZIP_MAGIC)
    if config.compiler or not code.strip() or code.startswith(archives) or archive.is_executable_bytes(code):
        return code
    return NAMED_SOURCE.format(path=str(Path(config.autoinit).absolute()), code=code).encode()


def compile_action(main: str, config: Config) -> int:
    """Reference `-compile MAIN`: stdin holds the action, stdout gets a zip."""
    import tempfile

    code = sys.stdin.buffer.read()
    with tempfile.TemporaryDirectory(prefix="actionloop-compile-") as folder:
        src, dest = Path(folder, "src"), Path(folder, "bin")
        src.mkdir()
        try:
            archive.unpack(code, True, src, config.max_archive)
            prepare(src, dest, main, config.compiler, config.execution_env)
        except ActionLoopError as exc:
            log(exc.message)
            return 1
        sys.stdout.buffer.write(archive.pack(dest))
    return 0


def setup_logging(config: Config) -> None:
    """In plain OpenWhisk mode our streams are the action's: stay quiet."""
    quiet = not (config.debug or config.websocket)
    level = logging.DEBUG if config.debug else logging.CRITICAL if quiet else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def run(config: Config, announce: bool = False, read_from: str = "") -> int:
    """Serve until SIGTERM or SIGINT; auto-init reads `read_from` if given, else config.autoinit."""
    setup_logging(config)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config, announce, read_from))
    return uvloop.run(serve(config, announce, read_from))


async def serve(config: Config, announce: bool, read_from: str = "") -> int:
    """The runtime's life: auto-init, listen, wait for a signal, drain; its exit status."""
    runtime = Runtime(config)
    adopt_orphans()
    try:
        return await serve_runtime(runtime, announce, read_from)
    finally:
        # Whatever the way out, the action processes stop (no orphans). The
        # drain has had its time: what is still queued is dropped.
        await runtime.close(wait=0)
        sweep_orphans()
        if runtime.hub.bus is not None:
            await runtime.hub.bus.close()


async def serve_runtime(runtime: Runtime, announce: bool, read_from: str) -> int:
    config = runtime.config
    watcher = None
    if config.autoinit:
        import functools

        # Live update (README): watched from before the first read, so no change is missed.
        wrap = functools.partial(named_code, config) if read_from else None
        watcher = Watcher(runtime, config.autoinit, config.autoinit_main, config.autoinit_poll, wrap)
        watcher.baseline()
        try:
            await runtime.autoinit(read_from or config.autoinit, config.autoinit_main, config.autoinit_sha256)
        except ActionLoopError as exc:
            # Loud, so Kubernetes shows a failing pod (contract part C).
            log(f"actionloop: auto-init from {source.shown(config.autoinit)} failed: {one_line(exc.message)}")
            return 1
    if config.redis_url:
        from .bus import RedisBus  # redis is needed only here

        bus = RedisBus(config.redis_url, runtime.hub)
        runtime.hub.bus = bus
        bus.start()
    sockets = Sockets()
    endpoints = Endpoints(runtime, sockets)
    try:
        listening = await listen(endpoints)
    except OSError as exc:
        log(f"actionloop: cannot listen on {config.host}:{config.port}: {exc.strerror}")
        await endpoints.close()
        return 1
    management = None
    if config.api_token:
        from . import api  # aiohttp: only for the API, or on first HTTP request

        try:
            management = await api.start(runtime.hub, config)
        except OSError as exc:
            log(f"actionloop: cannot listen on {config.host}:{config.api_port} (management API): {exc.strerror}")
            listening.close()
            await endpoints.close()
            return 1
    if announce or config.websocket:
        port = listening.sockets[0].getsockname()[1]
        host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
        message = f"actionloop {__version__}: WebSocket at ws://{host}:{port}{config.websocket}"
        if config.demo:
            message += f"\nactionloop {__version__}: demo page at http://{host}:{port}/"
        (print if announce else log)(message)
        sys.stdout.flush()
    if watcher is not None:
        watcher.start()
    await wait_for_signal()
    # Graceful shutdown (contract part C). Not ready at once, yet new
    # connections are still taken for OW_DRAIN_DELAY, until every proxy has
    # heard that this pod is going (README: Shutdown); a second signal cuts
    # that short. Then no new connections; WebSockets hear 1001 once their
    # replies are out; requests in hand finish; then stop.
    sockets.leaving = True
    if config.drain_delay > 0:
        await wait_for_signal(config.drain_delay)
    listening.close()
    drain(sockets)
    closing = [endpoints.close(), sockets.closed(config.drain_timeout)]
    if watcher is not None:
        closing.append(watcher.close())  # no new version now; one being started completes
    await asyncio.gather(*closing)
    # The drain closed connections: their disconnect events run before the stop.
    await runtime.events_settled(config.stop_grace)
    if management is not None:
        await management.cleanup()
    return 0


async def wait_for_signal(timeout: float | None = None) -> None:
    """Until SIGTERM or SIGINT, or `timeout` seconds."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), timeout)
    except TimeoutError:
        pass
