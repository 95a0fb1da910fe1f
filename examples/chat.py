"""Chat: rooms are channels, presence comes from the connection events.

One replica:

    OW_API_TOKEN=$(openssl rand -hex 16) OW_WEBSOCKET_EVENTS=1 \\
        actionloop serve examples/chat.py --ws /chat

then open examples/chat.html?ws=ws://127.0.0.1:8080/chat in two browser tabs.
Several replicas share rooms and presence when each is started with
OW_REDIS_URL set (the Redis that joins them; this action keeps who is where
in it too, so it must be the environment variable, not the flag).

A client sends, and is answered:

    {"join": ROOM, "name": NAME}     {"joined": ROOM}
    {"leave": ROOM}                  {"left": ROOM}
    {"say": TEXT, "room": ROOM}      {"said": ROOM}

and every member of ROOM hears, on the channel ROOM:

    {"room": ROOM, "from": NAME, "text": TEXT}
    {"room": ROOM, "event": "join" or "leave", "name": NAME,
     "members": {CONNECTION_ID: NAME, ...}, "version": N}

"members" is who is in the room after that change. "version" counts the
room's changes: two replicas may publish their changes out of order, so a
client keeps the members of the highest version it has heard.

A connection that ends without leaving is taken out of its rooms by the
disconnect event, on the replica that held it. A replica that dies (SIGKILL,
a lost node) hears no disconnect events, so each join also drops the
members that the runtime no longer knows (actionloop_api.describe).
"""

import os

import actionloop_api


class Rooms:
    """Who is in which room, in this process's memory: enough for one replica."""

    def __init__(self):
        self.members = {}  # room -> {connection: name}
        self.rooms = {}  # connection -> {room: name}
        self.versions = {}  # room -> how many changes so far

    def enter(self, room, connection, name):
        self.members.setdefault(room, {})[connection] = name
        self.rooms.setdefault(connection, {})[room] = name
        return self.changed(room)

    def exit(self, room, connection):
        drop(self.members, room, connection)
        drop(self.rooms, connection, room)
        return self.changed(room)

    def of(self, connection):
        """The rooms of a connection, with the name it has in each."""
        return dict(self.rooms.get(connection, {}))

    def changed(self, room):
        self.versions[room] = self.versions.get(room, 0) + 1
        return self.versions[room], dict(self.members.get(room, {}))


def drop(table, key, item):
    """Take item out of table[key], and table[key] out of table once it is empty."""
    inner = table.get(key, {})
    inner.pop(item, None)
    if not inner:
        table.pop(key, None)


class SharedRooms:
    """The same in Redis, so that every replica sees every room."""

    def __init__(self, url):
        import redis  # the runtime's own dependency, so it is there

        self.redis = redis.Redis.from_url(url, decode_responses=True)

    def enter(self, room, connection, name):
        change = self.redis.pipeline()  # MULTI ... EXEC: the change, its version and the members at once
        change.hset("chat:members:" + room, connection, name)
        change.hset("chat:rooms:" + connection, room, name)
        return self.changed(change, room)

    def exit(self, room, connection):
        change = self.redis.pipeline()
        change.hdel("chat:members:" + room, connection)
        change.hdel("chat:rooms:" + connection, room)
        return self.changed(change, room)

    def of(self, connection):
        return self.redis.hgetall("chat:rooms:" + connection)

    def changed(self, change, room):
        change.hincrby("chat:versions", room, 1)
        change.hgetall("chat:members:" + room)
        *_, version, members = change.execute()
        return version, members


ROOMS = SharedRooms(os.environ["OW_REDIS_URL"]) if os.environ.get("OW_REDIS_URL") else Rooms()


def main(args):
    if not isinstance(args, dict):
        return {"error": "Send a JSON object."}
    event = args.get("__ow_event")
    if event == "connect":
        return {}  # everyone may connect; presence starts when they join a room
    if event == "disconnect":
        gone = args["__ow_connection_id"]
        for room, name in ROOMS.of(gone).items():
            announce(room, "leave", name, *ROOMS.exit(room, gone))
        return {}
    me = os.environ.get("__OW_CONNECTION_ID")
    if me is None:
        return {"error": "Chat over a WebSocket."}
    if isinstance(args.get("join"), str) and args["join"]:
        return join(me, args["join"], str(args.get("name") or "anonymous")[:40])
    if isinstance(args.get("leave"), str):
        return leave(me, args["leave"])
    if isinstance(args.get("say"), str) and isinstance(args.get("room"), str):
        return say(me, args["room"], args["say"])
    return {"error": 'Send {"join": ROOM, "name": NAME}, {"leave": ROOM} or {"say": TEXT, "room": ROOM}.'}


def join(me, room, name):
    actionloop_api.subscribe(me, room)  # first, so the joiner hears its own arrival and all after it
    version, members = ROOMS.enter(room, me, name)
    for other in list(members):
        if other != me and actionloop_api.describe(other) is None:  # its replica died without a disconnect event
            version, members = ROOMS.exit(room, other)
    announce(room, "join", name, version, members)
    return {"joined": room}


def leave(me, room):
    name = ROOMS.of(me).get(room)
    if name is None:
        return {"error": f"You are not in {room!r}."}
    actionloop_api.unsubscribe(me, room)
    announce(room, "leave", name, *ROOMS.exit(room, me))
    return {"left": room}


def say(me, room, text):
    name = ROOMS.of(me).get(room)
    if name is None:
        return {"error": f"Join {room!r} before you say something there."}
    actionloop_api.publish(room, {"room": room, "from": name, "text": text})
    return {"said": room}


def announce(room, event, name, version, members):
    message = {"room": room, "event": event, "name": name, "members": members, "version": version}
    actionloop_api.publish(room, message)
