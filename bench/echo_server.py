"""The practical limit: hello computed inside a picows server, no action process."""

import json
import sys

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server


class Hello(WSListener):
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            args = json.loads(frame.get_payload_as_bytes())
            reply = json.dumps({"greeting": "Hello, " + args.get("name", "stranger") + "!"})
            transport.send(WSMsgType.TEXT, reply.encode())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


async def serve(port: int) -> None:
    server = await ws_create_server(lambda _request: Hello(), "127.0.0.1", port)
    await server.serve_forever()


uvloop.run(serve(int(sys.argv[1])))
