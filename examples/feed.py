"""Feed: ONE stream consumer per pod, however many clients it serves.

The reason this runtime exists. A backend such as Kafka wants few consumers,
not one per browser. Here the action process is long-lived, so its module
code runs once per pod. It starts one thread holding one Redis connection
that reads a Redis stream (the stand-in for a Kafka topic) and pushes each new
entry to the pod's subscribers. Those are WebSocket clients that sent
`{"subscribe": true}`. Each gets
`{"stream": STREAM, "id": ENTRY_ID, "fields": {...}}`, in stream order.

    OW_API_TOKEN=$(openssl rand -hex 16) FEED_REDIS_URL=redis://127.0.0.1:6379/0 \\
        actionloop serve examples/feed.py --ws /feed
    redis-cli XADD feed '*' price 42       # every subscriber hears it

Settings: FEED_REDIS_URL (default: OW_REDIS_URL, else redis://127.0.0.1:6379/0)
and FEED_STREAM (default `feed`). Run it in `shared` mode (the default): a
pool would start a consumer per process.

Every pod reads the whole stream, so each pod pushes to its own clients only.
It publishes to its own channel, `feed@POD` (HOSTNAME, the pod's name in
Kubernetes). A channel `feed` shared by all pods would hear every entry once
from each pod whenever OW_REDIS_URL joins them. Replicas that share a
hostname, on one machine say, each need their own HOSTNAME.
"""

import os
import socket
import sys
import threading
import time

import actionloop_api
import redis  # the runtime's own dependency, so it is there

STREAM = os.environ.get("FEED_STREAM", "feed")
CHANNEL = "feed@" + (os.environ.get("HOSTNAME") or socket.gethostname())
URL = os.environ.get("FEED_REDIS_URL") or os.environ.get("OW_REDIS_URL") or "redis://127.0.0.1:6379/0"
# One connection, named so that CLIENT LIST shows the consumer of each pod.
# socket_timeout outlasts the XREAD block below: a dead link is noticed, a quiet stream is not an error.
CONSUMER = redis.Redis.from_url(
    URL, decode_responses=True, single_connection_client=True, client_name=CHANNEL, socket_timeout=15
)


def newest():
    """The id of the stream's last entry: what comes after it is new ("0-0" for an empty stream)."""
    last = CONSUMER.xrevrange(STREAM, count=1)
    return last[0][0] if last else "0-0"


def consume(after):
    """Forever: wait for entries after `after`, push each, remember where we are."""
    while True:
        try:
            after = after or newest()
            for _, entries in CONSUMER.xread({STREAM: after}, block=5000) or []:
                for entry, fields in entries:
                    push(entry, fields)
                    after = entry
        except redis.RedisError as exc:  # Redis went away: try again, from where we were
            print(f"feed: {exc}; retrying in 1 s", file=sys.stderr, flush=True)
            time.sleep(1)


def push(entry, fields):
    try:
        actionloop_api.publish(CHANNEL, {"stream": STREAM, "id": entry, "fields": fields})
    except (OSError, actionloop_api.APIError) as exc:  # the runtime is busy or stopping: this entry is lost
        print(f"feed: entry {entry} not pushed: {exc}", file=sys.stderr, flush=True)


def started():
    """Where the consumer starts: now, so an entry added once this module is loaded is not missed."""
    try:
        return newest()
    except redis.RedisError:
        return None  # unreachable for now: the thread asks again


threading.Thread(target=consume, args=(started(),), name="feed consumer", daemon=True).start()


def main(args):
    me = os.environ.get("__OW_CONNECTION_ID")
    if me is None:
        return {"error": "Subscribe over a WebSocket."}
    if isinstance(args, dict) and args.get("subscribe") is True:
        actionloop_api.subscribe(me, CHANNEL)
        return {"subscribed": STREAM}
    if isinstance(args, dict) and args.get("subscribe") is False:
        actionloop_api.unsubscribe(me, CHANNEL)
        return {"unsubscribed": STREAM}
    return {"error": 'Send {"subscribe": true} (or false).'}
