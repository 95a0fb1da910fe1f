// One Socket.IO server of the fan-out benchmark (bench/fanout.py), the peer
// anchor of actionloop's channels across replicas.
//
//   node server.js PORT API_PORT REDIS_URL TOKEN
//
// PORT serves Socket.IO (WebSocket transport only: the benchmark's clients
// speak Engine.IO v4 over a raw WebSocket, and no sticky sessions are needed
// across replicas). A client joins a room by emitting "subscribe" with the
// room's name; the acknowledgement says it is in. API_PORT is the stand-in
// for actionloop's management API: POST /channels/ROOM with a JSON body and
// `Authorization: Bearer TOKEN` emits the body as a "message" event to the
// room on every server, through @socket.io/redis-adapter on REDIS_URL.
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const { createClient } = require("redis");
const { createAdapter } = require("@socket.io/redis-adapter");

const [port, apiPort, redisUrl, token] = process.argv.slice(2);

function answer(response, status, body) {
  response.writeHead(status, { "Content-Type": "application/json" });
  response.end(JSON.stringify(body));
}

function api(io) {
  const bearer = "Bearer " + token;
  return http.createServer((request, response) => {
    const match = /^\/channels\/([^/]+)$/.exec(request.url);
    if (request.method !== "POST" || !match) return answer(response, 404, { error: "not found" });
    if (request.headers.authorization !== bearer) return answer(response, 403, { error: "bad token" });
    const chunks = [];
    request.on("data", (chunk) => chunks.push(chunk));
    request.on("end", () => {
      let value;
      try {
        value = JSON.parse(Buffer.concat(chunks));
      } catch (error) {
        return answer(response, 400, { error: String(error) });
      }
      io.to(decodeURIComponent(match[1])).emit("message", value);
      answer(response, 200, { published: true });
    });
  });
}

async function main() {
  const pubClient = createClient({ url: redisUrl });
  const subClient = pubClient.duplicate();
  await Promise.all([pubClient.connect(), subClient.connect()]);
  const server = http.createServer();
  const io = new Server(server, {
    transports: ["websocket"],
    serveClient: false,
    adapter: createAdapter(pubClient, subClient),
  });
  io.on("connection", (socket) => {
    socket.on("subscribe", (room, ack) => {
      socket.join(String(room));
      if (typeof ack === "function") ack({ subscribed: true });
    });
  });
  server.listen(Number(port), "127.0.0.1");
  const endpoint = api(io);
  endpoint.keepAliveTimeout = 75000; // as aiohttp's, which serves actionloop's API (Node's default: 5 s)
  endpoint.listen(Number(apiPort), "127.0.0.1");
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
