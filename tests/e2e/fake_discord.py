"""A local stand-in of the Discord API for end-to-end tests: REST routes and the gateway
websocket on 127.0.0.1, which the real discord.py client connects to.

It behaves like Discord where the bot could get it wrong: content over 2000 characters is
refused (50035), an empty message is refused (50006), interactions must be answered within
3 seconds (10062), message routes have rate-limit buckets (5 per 5 s per channel) that
answer 429 with Discord's headers when exhausted, pings follow `allowed_mentions`, and JSON
is served with exactly `application/json`. Tests play users through `user_says`,
`webhook_says`, `slash`, `click`, `user_edits` and `user_deletes`, and read what the bot
did from `messages`, `history` (every content a message had), `rate_limited`, `requests`
and `faults`.

Channel webhooks as on Discord: created (name, avatar as a data URI) only with the bot's
Manage Webhooks in that server (else 403 50013; `take_manage_webhooks`), at most 15 per
channel (30007), listed, fetched and deleted (`remove_webhook`: a moderator deletes one);
executing one posts a message whose author is the webhook under the `username` given
(author.bot, `webhook_id`, `application_id`), with MESSAGE_CREATE; its messages are edited
and deleted through the webhook's token (`webhook_messages` reads them).

Outages: `fail_next` / `fail_for` answer matching requests with 5xx (bodies as Discord's
edge sends them) or cut the connection (status 0), without handling them. Latency:
`answer_late` lets matching requests take effect at once and holds their answers back, as
when Discord's response is slow on its way back (people already see the change). A reply to a
deleted or unknown message fails with 50035 unless `fail_if_not_exists` is false, as on
Discord. `GET /channels/{id}/messages` pages history like Discord (newest first).

The gateway keeps a session: every event gets a sequence number and is buffered, whether
the bot is connected or not (users keep talking while it is down). IDENTIFY starts a new
session with no replay; RESUME with the current session replays the events after `seq`,
then RESUMED; an unknown session gets INVALID_SESSION (d=false). `close_gateway(4000)`
drops the bot's websocket so that discord.py reconnects and resumes.

Shards: an IDENTIFY with `"shard": [id, count]` opens that shard's session, one connection
per shard at once. As on Discord, a shard's READY lists only its servers (those with
`(guild_id >> 22) % count == id`), each followed by its GUILD_CREATE; a server's events go
only to the shard that owns it and DMs only to shard 0; each shard's session has its own
sequence numbers and RESUMEs on its own. Without a shard (or with [0, 1]) the one session
gets everything. `add_guild` adds a server (GUILD3_ID falls on shard 0 of 2, GUILD_ID and
GUILD2_ID both on shard 1).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import re
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

from tests import crashes

DISCORD_EPOCH_MS = 1420070400000
BOT_ID = 900000000000000001
GUILD_ID = 800000000000000001
GUILD2_ID = 800000000000000002  # a second server, owned by `stranger`
GUILD3_ID = GUILD_ID + (1 << 22)  # not there unless added (`add_guild`); shard 0 of 2, the others 1
PERM_ADMINISTRATOR = 1 << 3
PERM_MANAGE_CHANNELS = 1 << 4
PERM_MANAGE_WEBHOOKS = 1 << 29
MAX_CHANNEL_WEBHOOKS = 15
PERM_DEFAULT = 0x0000000000000400 | 0x0000000000000800 | 0x0000000000010000  # view, send, history
MESSAGE_LIMIT = 2000
INTERACTION_DEADLINE = 3.0
EVENT_BUFFER = 1000  # gateway events kept per session for RESUME
HISTORY_BUCKET = (50, 5.0)  # GET /channels/{id}/messages: 50 per 5 s per channel
_ROUTE_PARAM = re.compile(r"\{[^}]*\}")
# Error bodies as Discord (and the edge in front of it) sends them.
FAULT_BODIES: dict[int, tuple[str, bytes]] = {
    500: ("application/json", b'{"message": "500: Internal Server Error", "code": 0}'),
    502: ("text/html", b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
                       b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
                       b"</body>\r\n</html>\r\n"),
    503: ("text/plain", b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"),
    504: ("text/html", b"<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n"
                       b"<center><h1>504 Gateway Time-out</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
                       b"</body>\r\n</html>\r\n"),
}
_ids = itertools.count(1)


def snowflake() -> int:
    return ((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | (next(_ids) & 0x3FFFFF)


def iso_now() -> str:
    return datetime.now(UTC).isoformat()


def route_template(route: str) -> str:
    """`/channels/{channel}/messages/{message}` -> `/channels/{id}/messages/{id}` (any names)."""
    route = route.removeprefix("/api/v10")
    return _ROUTE_PARAM.sub("{id}", route)


def user_payload(user_id: int, name: str, bot: bool = False) -> dict[str, Any]:
    return {
        "id": str(user_id),
        "username": name.lower(),
        "global_name": name,
        "discriminator": "0",
        "avatar": None,
        "bot": bot,
        "public_flags": 0,
    }


@dataclass
class User:
    id: int
    name: str
    permissions: int = PERM_DEFAULT  # in GUILD_ID
    bot: bool = False
    guild_permissions: dict[int, int] = field(default_factory=dict)  # in other guilds (default PERM_DEFAULT)

    @property
    def payload(self) -> dict[str, Any]:
        return user_payload(self.id, self.name, self.bot)

    def permissions_in(self, guild_id: int) -> int:
        if guild_id == GUILD_ID:
            return self.permissions
        return self.guild_permissions.get(guild_id, PERM_DEFAULT)

    def member(self, guild_id: int = GUILD_ID) -> dict[str, Any]:
        return {
            "user": self.payload,
            "roles": [],
            "joined_at": iso_now(),
            "deaf": False,
            "mute": False,
            "nick": None,
            "flags": 0,
            "permissions": str(self.permissions_in(guild_id)),
        }


@dataclass
class Bucket:
    limit: int
    window: float
    remaining: int = 0
    reset_at: float = 0.0
    name: str = field(default_factory=lambda: f"bucket-{next(_ids)}")


@dataclass
class Interaction:
    id: int
    token: str
    created: float
    channel_id: int
    message_id: int | None = None  # the message holding the clicked component
    response_type: int | None = None
    original_id: int | None = None
    choices: list[dict[str, Any]] | None = None
    user: User | None = None


@dataclass
class _Fault:
    method: str
    route: str
    status: int
    until: float | None = None  # fail_for: fails every match until then (monotonic)


@dataclass
class _Latency:
    method: str
    route: str
    seconds: float


@dataclass
class _Connection:
    """One gateway websocket; `sent` is the last sequence number written to it."""
    ws: web.WebSocketResponse
    sent: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def shard_of(guild_id: int | None, count: int) -> int:
    """The shard Discord sends a server's events to; DMs (no server) go to shard 0."""
    return 0 if guild_id is None else (guild_id >> 22) % count


@dataclass
class _Session:
    """One gateway session: the bot's, or one shard's. Its events are numbered and kept for
    RESUME whether a connection is live or not; `live` is the connection receiving them."""
    id: str
    shard: int = 0
    count: int = 1
    seq: int = 0
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EVENT_BUFFER))
    live: _Connection | None = None

    def owns(self, guild_id: int | None) -> bool:
        return shard_of(guild_id, self.count) == self.shard

    def record(self, event: str, data: dict[str, Any]) -> None:
        self.seq += 1
        self.events.append({"op": 0, "s": self.seq, "t": event, "d": data})


class FakeDiscord:
    """The stand-in server. `await start()`, then point the bot at `api_base`/`gateway_url`."""

    def __init__(self) -> None:
        self.bot_user = User(BOT_ID, "Hermes", bot=True, permissions=PERM_DEFAULT | PERM_MANAGE_WEBHOOKS)
        self.ann = User(100000000000000001, "Ann")
        self.bob = User(100000000000000002, "Bob")
        self.mod = User(100000000000000003, "Mod", permissions=PERM_DEFAULT | PERM_MANAGE_CHANNELS)
        self.owner = User(100000000000000004, "Owner", permissions=PERM_DEFAULT | PERM_ADMINISTRATOR)
        self.other_bot = User(100000000000000005, "OtherBot", bot=True)
        self.stranger = User(100000000000000006, "Stranger",
                             guild_permissions={GUILD2_ID: PERM_DEFAULT | PERM_ADMINISTRATOR})
        self.general = 700000000000000001
        self.random = 700000000000000002
        self.thread = 700000000000000003
        self.dm = 700000000000000009
        self.other_general = 700000000000000011  # in GUILD2_ID
        self.channels: dict[int, dict[str, Any]] = {
            self.general: self._text_channel(self.general, "general"),
            self.random: self._text_channel(self.random, "random"),
            self.thread: {
                "id": str(self.thread), "type": 11, "guild_id": str(GUILD_ID), "parent_id": str(self.general),
                "name": "a-thread", "owner_id": str(self.ann.id), "message_count": 0, "member_count": 2,
                "rate_limit_per_user": 0, "flags": 0,
                "thread_metadata": {"archived": False, "auto_archive_duration": 1440,
                                    "archive_timestamp": iso_now(), "locked": False},
            },
            self.dm: {"id": str(self.dm), "type": 1, "recipients": [self.ann.payload], "last_message_id": None},
            self.other_general: self._text_channel(self.other_general, "general", GUILD2_ID),
        }
        self.messages: dict[int, dict[str, Any]] = {}
        self.history: dict[int, list[str]] = {}
        self.deleted: set[int] = set()
        self.requests: list[tuple[str, str, int]] = []
        self.rate_limited: list[str] = []
        self.commands: list[dict[str, Any]] = []
        self.interactions: dict[int, Interaction] = {}
        self.followups: list[dict[str, Any]] = []
        self.typing: list[int] = []
        self.attachments: dict[int, bytes] = {}
        self.attachment_downloads: list[int] = []  # ids of attachments fetched, in order
        self.left_guilds: list[int] = []  # servers the bot left (DELETE /users/@me/guilds/{id})
        self._webhook_ids: dict[str, int] = {}
        self.webhooks: dict[int, dict[str, Any]] = {}  # channel webhooks (POST /channels/{id}/webhooks)
        self.webhook_avatars: dict[int, bytes] = {}  # their avatars as uploaded (decoded data URIs)
        self._buckets: dict[tuple[str, str, str], Bucket] = {}
        self.faults: list[tuple[str, str, int]] = []  # every injected failure: (method, route, status)
        self._faults: list[_Fault] = []
        self._latencies: list[_Latency] = []
        self.guild_ids: list[int] = [GUILD_ID, GUILD2_ID]  # the servers the bot is in (`add_guild`)
        self._extra_guilds: dict[int, tuple[str, User, list[User]]] = {}  # name, owner, members
        self._ws: web.WebSocketResponse | None = None  # the latest gateway websocket
        self._sockets: set[web.WebSocketResponse] = set()  # every open gateway websocket
        self._shard_sessions: dict[int, _Session] = {}  # each shard's current session (0 unsharded)
        self._sessions = itertools.count(1)
        self.identified = asyncio.Event()
        self.resumed = asyncio.Event()
        self.identifies = 0
        self.resumes = 0
        self.shard_identifies: list[tuple[int, int]] = []  # (shard, count) of every IDENTIFY
        self.ready_gate = asyncio.Event()  # cleared: IDENTIFY waits for it before READY
        self.ready_gate.set()
        self._runner: web.AppRunner | None = None
        self.api_base = ""
        self.gateway_url = ""

    @staticmethod
    def _text_channel(channel_id: int, name: str, guild_id: int = GUILD_ID) -> dict[str, Any]:
        return {
            "id": str(channel_id), "type": 0, "guild_id": str(guild_id), "name": name, "position": 0,
            "permission_overwrites": [], "nsfw": False, "parent_id": None, "topic": None,
            "last_message_id": None, "rate_limit_per_user": 0, "flags": 0,
        }

    def add_text_channel(self, name: str, guild_id: int = GUILD_ID) -> int:
        """Another text channel (call before the bot connects: it arrives with GUILD_CREATE)."""
        channel_id = snowflake()
        self.channels[channel_id] = self._text_channel(channel_id, name, guild_id)
        return channel_id

    def add_guild(self, name: str, guild_id: int = GUILD3_ID, owner: User | None = None) -> int:
        """Another server with the bot in it (call before the bot connects): owned by
        `owner` (Owner by default), who is its Administrator; its members are the bot, Ann,
        Bob and the owner. Add channels with `add_text_channel(name, guild_id)`."""
        owner = owner or self.owner
        owner.guild_permissions.setdefault(guild_id, PERM_DEFAULT | PERM_ADMINISTRATOR)
        members: list[User] = []
        for user in (self.bot_user, self.ann, self.bob, owner):
            if all(user.id != m.id for m in members):
                members.append(user)
        self._extra_guilds[guild_id] = (name, owner, members)
        self.guild_ids.append(guild_id)
        return guild_id

    # ---- server lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record])
        api = "/api/v10"
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get(f"{api}/users/@me", self._me)
        app.router.add_delete(f"{api}/users/@me/guilds/{{guild}}", self._leave_guild)
        app.router.add_get(f"{api}/oauth2/applications/@me", self._application)
        app.router.add_put(f"{api}/applications/{{app}}/commands", self._sync_commands)
        app.router.add_get(f"{api}/channels/{{channel}}", self._get_channel)
        app.router.add_post(f"{api}/channels/{{channel}}/typing", self._typing)
        app.router.add_post(f"{api}/channels/{{channel}}/messages", self._create_message)
        app.router.add_get(f"{api}/channels/{{channel}}/messages", self._channel_history)
        app.router.add_get(f"{api}/channels/{{channel}}/messages/{{message}}", self._get_message)
        app.router.add_patch(f"{api}/channels/{{channel}}/messages/{{message}}", self._edit_message)
        app.router.add_delete(f"{api}/channels/{{channel}}/messages/{{message}}", self._delete_message)
        app.router.add_post(f"{api}/interactions/{{id}}/{{token}}/callback", self._callback)
        app.router.add_get(f"{api}/webhooks/{{app}}/{{token}}/messages/@original", self._get_original)
        app.router.add_patch(f"{api}/webhooks/{{app}}/{{token}}/messages/@original", self._edit_original)
        app.router.add_post(f"{api}/webhooks/{{app}}/{{token}}", self._followup)
        app.router.add_post(f"{api}/channels/{{channel}}/webhooks", self._create_webhook)
        app.router.add_get(f"{api}/channels/{{channel}}/webhooks", self._channel_webhooks)
        app.router.add_get(f"{api}/webhooks/{{webhook}}", self._get_webhook)
        app.router.add_delete(f"{api}/webhooks/{{webhook}}", self._delete_webhook)
        app.router.add_patch(f"{api}/webhooks/{{app}}/{{token}}/messages/{{message}}", self._edit_webhook_message)
        app.router.add_delete(f"{api}/webhooks/{{app}}/{{token}}/messages/{{message}}", self._delete_webhook_message)
        app.router.add_get("/attachments/{id}/{filename}", self._attachment)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.api_base = f"http://127.0.0.1:{port}{api}"
        self.gateway_url = f"ws://127.0.0.1:{port}/gateway"

    async def stop(self) -> None:
        for session in self._shard_sessions.values():
            session.live = None
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        fault = self._take_fault(request)
        if fault is not None:
            self.requests.append((request.method, request.path, fault))
            return await self._fail(request, fault)
        response = await handler(request)
        self.requests.append((request.method, request.path, response.status))
        delay = self._latency(request)
        if delay:
            await asyncio.sleep(delay)
        return response

    # ---- injected faults ---------------------------------------------------------------

    def fail_next(self, method: str, route: str, *statuses: int) -> None:
        """Answer the next len(statuses) `method` requests to `route` (a template such as
        "/channels/{id}/messages") with these statuses, unhandled; 0 cuts the connection."""
        self._faults.extend(_Fault(method.upper(), route_template(route), status) for status in statuses)

    def fail_for(self, method: str, route: str, status: int, seconds: float) -> None:
        """Every matching request fails with `status` for the next `seconds` (Discord is down)."""
        self._faults.append(_Fault(method.upper(), route_template(route), status, time.monotonic() + seconds))

    def clear_faults(self) -> None:
        """Discord answers normally again (every fault and latency still pending is dropped)."""
        self._faults.clear()
        self._latencies.clear()

    def answer_late(self, method: str, route: str, seconds: float) -> None:
        """Every matching request takes effect at once (events go out, people see it) and
        its answer reaches the bot `seconds` later, until `clear_faults`; "*" matches any
        method or route."""
        self._latencies.append(_Latency(method.upper(), route_template(route), seconds))

    @staticmethod
    def _route_of(request: web.Request) -> str:
        resource = request.match_info.route.resource
        return route_template(resource.canonical if resource is not None else request.path)

    def _latency(self, request: web.Request) -> float:
        if not self._latencies:
            return 0.0
        route = self._route_of(request)
        return sum(late.seconds for late in self._latencies
                   if late.method in ("*", request.method) and late.route in ("*", route))

    def _take_fault(self, request: web.Request) -> int | None:
        if not self._faults:
            return None
        route = self._route_of(request)
        now = time.monotonic()
        self._faults = [f for f in self._faults if f.until is None or f.until > now]
        for fault in self._faults:  # fail_next before fail_for: the first one in order wins
            if fault.method == request.method and fault.route == route:
                if fault.until is None:
                    self._faults.remove(fault)
                self.faults.append((request.method, route, fault.status))
                return fault.status
        return None

    async def _fail(self, request: web.Request, status: int) -> web.StreamResponse:
        if status == 0:
            # Cut the connection after the request arrived, before any response byte: the
            # client's aiohttp raises ServerDisconnectedError (a RST could give ClientOSError).
            transport = request.transport
            if transport is not None:
                sock = transport.get_extra_info("socket")
                if sock is not None:  # RST, not FIN: a connection reset, as when a proxy dies
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    except OSError:
                        pass
                transport.abort()
            raise asyncio.CancelledError  # nothing more to write on this connection
        if status == 429:
            headers = {"Retry-After": "1", "X-RateLimit-Scope": "shared", "Via": "1.1 google"}
            return self._json({"message": "You are being rate limited.", "retry_after": 0.5, "global": False},
                              429, headers)
        content_type, body = FAULT_BODIES.get(status, (
            "application/json", json.dumps({"message": f"{status}: Injected failure", "code": 0}).encode()))
        return web.Response(body=body, status=status, headers={"Content-Type": content_type})

    @staticmethod
    def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        # discord.py only parses JSON when the content type is exactly application/json.
        return web.Response(
            body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json", **(headers or {})}
        )

    def _error(self, status: int, code: int, message: str, errors: dict[str, Any] | None = None) -> web.Response:
        body: dict[str, Any] = {"code": code, "message": message}
        if errors:
            body["errors"] = errors
        return self._json(body, status)

    # ---- rate limits -------------------------------------------------------------------

    def _limit(self, method: str, route: str, major: str, limit: int = 5,
               window: float = 5.0) -> tuple[dict[str, str], web.Response | None]:
        """Take one request from the (route, channel) bucket: its headers, or a 429."""
        key = (method, route, major)
        if key not in self._buckets:
            self._buckets[key] = Bucket(limit=limit, window=window)
        bucket = self._buckets[key]
        now = time.time()
        if now >= bucket.reset_at:
            bucket.remaining, bucket.reset_at = bucket.limit, now + bucket.window
        reset_after = bucket.reset_at - now
        headers = {
            "X-RateLimit-Limit": str(bucket.limit),
            "X-RateLimit-Reset": f"{bucket.reset_at:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": bucket.name,
        }
        if bucket.remaining == 0:
            self.rate_limited.append(f"{method} {route} {major}")
            headers |= {"X-RateLimit-Remaining": "0", "Retry-After": str(int(reset_after) + 1),
                        "X-RateLimit-Scope": "user", "Via": "1.1 google"}
            body = {"message": "You are being rate limited.", "retry_after": round(reset_after, 3), "global": False}
            return headers, self._json(body, 429, headers)
        bucket.remaining -= 1
        headers["X-RateLimit-Remaining"] = str(bucket.remaining)
        return headers, None

    # ---- gateway -----------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._ws = ws
        self._sockets.add(ws)
        connection = _Connection(ws)
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 41250}})
        try:
            async for frame in ws:
                if frame.type != WSMsgType.TEXT:
                    continue
                payload = json.loads(frame.data)
                if payload["op"] == 1:
                    await ws.send_json({"op": 11})
                elif payload["op"] == 2:
                    await self._identify(connection, payload.get("d") or {})
                elif payload["op"] == 6:
                    await self._resume(connection, payload.get("d") or {})
        finally:
            for session in self._shard_sessions.values():
                if session.live is connection:
                    session.live = None
            self._sockets.discard(ws)
            if self._ws is ws:
                self._ws = None
        return ws

    async def _identify(self, connection: _Connection, data: dict[str, Any]) -> None:
        """A new session (of the shard IDENTIFY names): READY listing the shard's servers,
        then each one's GUILD_CREATE; no old events replayed."""
        shard, count = (int(n) for n in (data.get("shard") or (0, 1)))
        self.identifies += 1
        await self.ready_gate.wait()  # a test may hold READY back: connected, not yet ready
        self.shard_identifies.append((shard, count))
        # Another shard count: the bot was resharded; the old count's sessions are gone.
        self._shard_sessions = {k: v for k, v in self._shard_sessions.items() if v.count == count}
        session = _Session(f"fake-session-{next(self._sessions)}", shard, count)
        self._shard_sessions[shard] = session
        guilds = [guild_id for guild_id in self.guild_ids if session.owns(guild_id)]
        ready: dict[str, Any] = {
            "v": 10, "user": self.bot_user.payload, "session_id": session.id,
            "resume_gateway_url": self.gateway_url,
            "guilds": [{"id": str(guild_id), "unavailable": True} for guild_id in guilds],
            "private_channels": [], "relationships": [],
            "application": {"id": str(BOT_ID), "flags": 0},
        }
        if "shard" in data:
            ready["shard"] = [shard, count]
        session.record("READY", ready)
        for guild_id in guilds:
            session.record("GUILD_CREATE", self._guild(guild_id))
        session.live = connection
        await self._flush(session)
        self.identified.set()

    async def _resume(self, connection: _Connection, data: dict[str, Any]) -> None:
        """Replay the session's events after `seq`, then RESUMED; or INVALID_SESSION."""
        seq = int(data.get("seq") or 0)
        session = next((s for s in self._shard_sessions.values() if s.id == data.get("session_id")), None)
        oldest = (session.events[0]["s"] if session.events else session.seq + 1) if session is not None else 0
        if session is None or oldest > seq + 1:
            await connection.ws.send_json({"op": 9, "d": False})
            return
        self.resumes += 1
        if session.live is not None and session.live is not connection:
            old, session.live = session.live, None
            await old.ws.close(code=4000)
        connection.sent = seq
        session.record("RESUMED", {})
        session.live = connection
        await self._flush(session)
        self.resumed.set()

    @property
    def connected(self) -> bool:
        """Whether the bot holds a gateway session right now (identified or resumed); with
        shards, whether every shard does."""
        sessions = self._shard_sessions.values()
        return bool(sessions) and all(s.live is not None and not s.live.ws.closed for s in sessions)

    def shard_connected(self, shard: int) -> bool:
        """Whether this shard holds a gateway session right now."""
        session = self._shard_sessions.get(shard)
        return session is not None and session.live is not None and not session.live.ws.closed

    async def close_gateway(self, code: int = 4000, resumable: bool = True, shard: int | None = None) -> None:
        """Close the bot's websocket with `code`; with 4000, discord.py reconnects and RESUMEs,
        and gets the events dispatched meanwhile (they wait in the buffer). `resumable=False`:
        Discord lost the session too, so the RESUME gets INVALID_SESSION and the bot IDENTIFYs
        a new session without those events (it has to back-fill from channel history).
        `shard`: only that shard's connection (default: every one)."""
        self.resumed.clear()
        sessions = [s for s in self._shard_sessions.values() if shard is None or s.shard == shard]
        sockets = []
        for session in sessions:
            if not resumable:
                del self._shard_sessions[session.shard]
            if session.live is not None:
                sockets.append(session.live.ws)
                session.live = None
        if not sockets and shard is None and self._ws is not None:
            sockets.append(self._ws)  # a connection that has no session (yet)
        for ws in sockets:
            if not ws.closed:
                await ws.close(code=code)

    def _guild(self, guild_id: int = GUILD_ID) -> dict[str, Any]:
        if guild_id == GUILD_ID:
            people, owner, name = (self.bot_user, self.ann, self.bob, self.mod, self.owner), self.owner, "Test Guild"
        elif guild_id in self._extra_guilds:
            name, owner, members = self._extra_guilds[guild_id]
            people = tuple(members)
        else:
            people, owner, name = (self.bot_user, self.stranger, self.ann, self.owner), self.stranger, "Other Guild"
        members = [u.member(guild_id) for u in people]
        for member in members:
            member.pop("permissions")
        channels = [c for c in self.channels.values() if c.get("guild_id") == str(guild_id)]
        return {
            "id": str(guild_id), "name": name, "icon": None, "owner_id": str(owner.id),
            "roles": [{"id": str(guild_id), "name": "@everyone", "permissions": str(PERM_DEFAULT), "position": 0,
                       "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}],
            "channels": [c for c in channels if c["type"] == 0],
            "threads": [c for c in channels if c["type"] == 11],
            "members": members, "member_count": len(members), "emojis": [], "stickers": [],
            "features": [], "large": False, "unavailable": False, "voice_states": [], "presences": [],
            "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
            "mfa_level": 0, "premium_tier": 0, "preferred_locale": "en-US", "nsfw_level": 0,
            "system_channel_flags": 0, "joined_at": iso_now(),
        }

    @staticmethod
    def _event_guild(event: str, data: dict[str, Any]) -> int | None:
        """The server an event is about (which shard gets it); None for DMs."""
        if data.get("guild_id"):
            return int(data["guild_id"])
        if event.startswith("GUILD_") and data.get("id"):
            return int(data["id"])
        return None

    async def _dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Give the event the next sequence number of the session that gets it (the bot's,
        or the shard's that owns the server; DMs: shard 0), keep it for RESUME, and send it
        if that session is connected; while it is not, the event waits in the buffer."""
        guild_id = self._event_guild(event, data)
        for session in list(self._shard_sessions.values()):
            if session.owns(guild_id):
                session.record(event, data)
                await self._flush(session)

    async def _flush(self, session: _Session) -> None:
        """Send the session's live connection every buffered event it has not had yet, in order."""
        connection = session.live
        if connection is None:
            return
        async with connection.lock:
            while session.live is connection:
                pending = [e for e in session.events if e["s"] > connection.sent]
                if not pending:
                    return
                for event in pending:
                    try:
                        await connection.ws.send_json(event)
                    except (ConnectionError, RuntimeError):
                        if session.live is connection:  # it went away: keep buffering for RESUME
                            session.live = None
                        return
                    connection.sent = event["s"]

    # ---- messages ----------------------------------------------------------------------

    def _message(self, channel_id: int, author: User, content: str, **extra: Any) -> dict[str, Any]:
        channel = self.channels[channel_id]
        message = {
            "id": str(snowflake()), "channel_id": str(channel_id), "author": author.payload,
            "content": content, "timestamp": iso_now(), "edited_timestamp": None, "tts": False,
            "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": [],
            "embeds": [], "pinned": False, "type": 0, "flags": 0, "components": [],
        }
        if "guild_id" in channel:
            message["guild_id"] = channel["guild_id"]
            member = author.member(int(channel["guild_id"]))
            member.pop("permissions")
            member.pop("user")
            message["member"] = member
        message.update(extra)
        return message

    def _store(self, message: dict[str, Any]) -> None:
        message_id = int(message["id"])
        self.messages[message_id] = message
        self.history.setdefault(message_id, []).append(message["content"])

    def _resolve_mentions(self, message: dict[str, Any], allowed: dict[str, Any] | None, reply_author: dict | None) -> None:
        """Who would really be pinged, as Discord decides it from `allowed_mentions`."""
        parse = ["users", "roles", "everyone"] if allowed is None else allowed.get("parse", [])
        users = set() if allowed is None else {str(u) for u in allowed.get("users", [])}
        content = message["content"]
        message["mention_everyone"] = "everyone" in parse and ("@everyone" in content or "@here" in content)
        everyone = {u.id: u for u in (self.ann, self.bob, self.mod, self.owner, self.stranger, self.bot_user)}
        mentioned = []
        for raw_id in re.findall(r"<@!?(\d+)>", content):
            if ("users" in parse or raw_id in users) and int(raw_id) in everyone:
                mentioned.append(everyone[int(raw_id)].payload)
        replied_ok = True if allowed is None else allowed.get("replied_user", False)
        if reply_author is not None and replied_ok:
            mentioned.append(reply_author)
        message["mentions"] = mentioned

    @staticmethod
    def _check_content(body: dict[str, Any], creating: bool) -> web.Response | None:
        content = body.get("content")
        if content is not None and len(content) > MESSAGE_LIMIT:
            return FakeDiscord._json({
                "code": 50035, "message": "Invalid Form Body",
                "errors": {"content": {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH",
                                                    "message": "Must be 2000 or fewer in length."}]}},
            }, 400)
        if creating and not (content or "").strip() and not body.get("embeds") and not body.get("components"):
            return FakeDiscord._json({"code": 50006, "message": "Cannot send an empty message"}, 400)
        return None

    async def _create_message(self, request: web.Request) -> web.Response:
        channel_id = int(request.match_info["channel"])
        headers, limited = self._limit("POST", "/channels/{id}/messages", str(channel_id))
        if limited:
            return limited
        body = await self._body(request)
        if (error := self._check_content(body, creating=True)) is not None:
            return error
        extra: dict[str, Any] = {"components": body.get("components", [])}
        reply_author = None
        if reference := body.get("message_reference"):
            referenced_id = int(reference["message_id"])
            referenced = self.messages.get(referenced_id)
            if referenced is None or referenced_id in self.deleted:
                if reference.get("fail_if_not_exists", True):
                    return self._json({
                        "code": 50035,
                        "errors": {"message_reference": {"_errors": [
                            {"code": "REPLIES_UNKNOWN_MESSAGE", "message": "Unknown message"}]}},
                        "message": "Invalid Form Body",
                    }, 400)
                referenced = None  # Discord sends it as a plain message
        if reference and referenced is not None:
            extra |= {"type": 19, "message_reference": {**reference, "message_id": str(reference["message_id"]),
                                                         "channel_id": str(channel_id)},
                      "referenced_message": referenced}
            reply_author = referenced["author"]
        message = self._message(channel_id, self.bot_user, body.get("content") or "", **extra)
        self._resolve_mentions(message, body.get("allowed_mentions"), reply_author)
        self._store(message)
        await self._dispatch("MESSAGE_CREATE", message)
        return self._json(message, headers=headers)

    async def _edit_message(self, request: web.Request) -> web.Response:
        channel_id, message_id = int(request.match_info["channel"]), int(request.match_info["message"])
        headers, limited = self._limit("PATCH", "/channels/{id}/messages/{id}", str(channel_id))
        if limited:
            return limited
        message = self.messages.get(message_id)
        if message is None or message_id in self.deleted:
            return self._error(404, 10008, "Unknown Message")
        if message["author"]["id"] != str(BOT_ID):
            return self._error(403, 50005, "Cannot edit a message authored by another user")
        body = await self._body(request)
        if (error := self._check_content(body, creating=False)) is not None:
            return error
        updated = {**message, "edited_timestamp": iso_now()}
        if "content" in body:
            updated["content"] = body["content"]
        if "components" in body:
            updated["components"] = body["components"]
        reply_author = message.get("referenced_message", {}).get("author") if message.get("referenced_message") else None
        self._resolve_mentions(updated, body.get("allowed_mentions"), reply_author)
        self._store(updated)
        await self._dispatch("MESSAGE_UPDATE", updated)
        return self._json(updated, headers=headers)

    async def _delete_message(self, request: web.Request) -> web.Response:
        channel_id, message_id = int(request.match_info["channel"]), int(request.match_info["message"])
        headers, limited = self._limit("DELETE", "/channels/{id}/messages/{id}", str(channel_id))
        if limited:
            return limited
        if message_id not in self.messages or message_id in self.deleted:
            return self._error(404, 10008, "Unknown Message")
        self.deleted.add(message_id)
        await self._dispatch("MESSAGE_DELETE", self._delete_event(message_id))
        return web.Response(status=204, headers=headers)

    def _delete_event(self, message_id: int) -> dict[str, Any]:
        message = self.messages[message_id]
        event = {"id": str(message_id), "channel_id": message["channel_id"]}
        if "guild_id" in message:
            event["guild_id"] = message["guild_id"]
        return event

    async def _get_message(self, request: web.Request) -> web.Response:
        message_id = int(request.match_info["message"])
        message = self.messages.get(message_id)
        if message is None or message_id in self.deleted or message["channel_id"] != request.match_info["channel"]:
            return self._error(404, 10008, "Unknown Message")
        return self._json(message)

    async def _channel_history(self, request: web.Request) -> web.Response:
        """Like Discord: at most `limit` (1..100, default 50) messages, newest first; `after`
        gives the oldest ones after it, `before` the newest ones before it, `around` both."""
        channel_id = int(request.match_info["channel"])
        if channel_id not in self.channels:
            return self._error(404, 10003, "Unknown Channel")
        headers, limited = self._limit("GET", "/channels/{id}/messages", str(channel_id), *HISTORY_BUCKET)
        if limited:
            return limited
        query = request.query
        try:
            limit = int(query.get("limit", 50))
            before, after, around = (int(query[k]) if k in query else None for k in ("before", "after", "around"))
        except ValueError:
            return self._error(400, 50035, "Invalid Form Body")
        if not 1 <= limit <= 100:
            return self._json({"code": 50035, "message": "Invalid Form Body", "errors": {"limit": {"_errors": [
                {"code": "NUMBER_TYPE_MAX" if limit > 100 else "NUMBER_TYPE_MIN",
                 "message": "int value should be between 1 and 100."}]}}}, 400)
        visible = sorted(
            (m for mid, m in self.messages.items()
             if int(m["channel_id"]) == channel_id and mid not in self.deleted and not m.get("flags", 0) & 64),
            key=lambda m: int(m["id"]),
        )
        if around is not None:
            older = [m for m in visible if int(m["id"]) < around][-(limit // 2):] if limit // 2 else []
            newer = [m for m in visible if int(m["id"]) >= around][:limit - len(older)]
            page = older + newer
        elif after is not None:
            page = [m for m in visible if int(m["id"]) > after][:limit]
        elif before is not None:
            page = [m for m in visible if int(m["id"]) < before][-limit:]
        else:
            page = visible[-limit:]
        return self._json(page[::-1], headers=headers)

    async def _get_channel(self, request: web.Request) -> web.Response:
        channel = self.channels.get(int(request.match_info["channel"]))
        return self._json(channel) if channel else self._error(404, 10003, "Unknown Channel")

    async def _typing(self, request: web.Request) -> web.Response:
        self.typing.append(int(request.match_info["channel"]))
        return web.Response(status=204)

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            return json.loads(form["payload_json"])  # type: ignore[arg-type]
        return await request.json() if request.can_read_body else {}

    async def _attachment(self, request: web.Request) -> web.Response:
        self.attachment_downloads.append(int(request.match_info["id"]))
        content = self.attachments.get(int(request.match_info["id"]))
        if content is None:
            return web.Response(status=404)
        return web.Response(body=content, content_type="application/octet-stream")

    async def delete_channel(self, channel_id: int) -> None:
        """A moderator deletes a channel (or a thread)."""
        channel = self.channels.pop(channel_id)
        if channel["type"] == 11:
            await self._dispatch("THREAD_DELETE", {"id": str(channel_id), "guild_id": channel["guild_id"],
                                                   "parent_id": channel["parent_id"], "type": 11})
        else:
            await self._dispatch("CHANNEL_DELETE", channel)

    async def kick_bot(self, guild_id: int) -> None:
        """The server's owner removes the bot from the server."""
        await self._dispatch("GUILD_DELETE", {"id": str(guild_id)})

    async def _leave_guild(self, request: web.Request) -> web.Response:
        guild_id = int(request.match_info["guild"])
        self.left_guilds.append(guild_id)
        await self._dispatch("GUILD_DELETE", {"id": str(guild_id)})
        return web.Response(status=204)

    async def _me(self, request: web.Request) -> web.Response:
        return self._json(self.bot_user.payload)

    async def _application(self, request: web.Request) -> web.Response:
        return self._json({
            "id": str(BOT_ID), "name": "Hermes", "icon": None, "description": "", "summary": "",
            "rpc_origins": [], "bot_public": True, "bot_require_code_grant": False,
            "owner": self.owner.payload, "verify_key": "00", "team": None, "flags": 0,
        })

    async def _sync_commands(self, request: web.Request) -> web.Response:
        self.commands = [{**c, "id": str(snowflake()), "application_id": str(BOT_ID), "version": "1"}
                         for c in await request.json()]
        return self._json(self.commands)

    # ---- interactions ------------------------------------------------------------------

    def _interaction_payload(self, user: User, channel_id: int, kind: int, data: dict[str, Any]) -> tuple[Interaction, dict]:
        interaction = Interaction(id=snowflake(), token=f"token-{next(_ids)}", created=time.monotonic(),
                                  channel_id=channel_id, user=user)
        self.interactions[interaction.id] = interaction
        channel = self.channels[channel_id]
        guild_id = int(channel.get("guild_id", GUILD_ID))
        payload: dict[str, Any] = {
            "id": str(interaction.id), "application_id": str(BOT_ID), "type": kind, "token": interaction.token,
            "version": 1, "channel_id": str(channel_id), "channel": channel, "data": data,
            "app_permissions": str(PERM_DEFAULT), "locale": "en-US", "entitlements": [],
            "attachment_size_limit": 8 * 1024 * 1024,
            "authorizing_integration_owners": {"0": str(guild_id)},
        }
        if "guild_id" in channel:
            payload |= {"guild_id": str(guild_id), "guild_locale": "en-US", "member": user.member(guild_id),
                        "context": 0}
        else:
            payload |= {"user": user.payload, "context": 1}
        return interaction, payload

    async def slash(self, user: User, channel_id: int, name: str, options: dict[str, Any] | None = None,
                    sub: str | None = None, autocomplete: str | None = None,
                    files: dict[str, tuple[str, bytes]] | None = None) -> Interaction:
        """`user` runs `/name [sub] options` in a channel (or asks for autocomplete);
        `files` attaches (filename, bytes) to attachment options."""
        kinds = {bool: 5, int: 4, str: 3}
        opts = [{"type": kinds[type(v)], "name": k, "value": v, **({"focused": True} if k == autocomplete else {})}
                for k, v in (options or {}).items()]
        resolved: dict[str, Any] = {}
        for option, (filename, content) in (files or {}).items():
            attachment_id = snowflake()
            self.attachments[attachment_id] = content
            url = f"{self.api_base.rsplit('/api/', 1)[0]}/attachments/{attachment_id}/{filename}"
            resolved.setdefault("attachments", {})[str(attachment_id)] = {
                "id": str(attachment_id), "filename": filename, "size": len(content), "url": url,
                "proxy_url": url, "content_type": "image/png" if filename.endswith(".png") else "application/json",
            }
            opts.append({"type": 11, "name": option, "value": str(attachment_id)})
        if sub is not None:
            opts = [{"type": 1, "name": sub, "options": opts}]
        command = next((c for c in self.commands if c["name"] == name), None)
        assert command is not None, f"/{name} was not registered; registered: {[c['name'] for c in self.commands]}"
        data = {"id": command["id"], "name": name, "type": 1, "options": opts}
        if resolved:
            data["resolved"] = resolved
        interaction, payload = self._interaction_payload(user, channel_id, 4 if autocomplete else 2, data)
        await self._dispatch("INTERACTION_CREATE", payload)
        return interaction

    async def click(self, user: User, message_id: int, custom_id: str) -> Interaction:
        message = self.messages[message_id]
        interaction, payload = self._interaction_payload(
            user, int(message["channel_id"]), 3, {"custom_id": custom_id, "component_type": 2}
        )
        interaction.message_id = message_id
        payload["message"] = message
        await self._dispatch("INTERACTION_CREATE", payload)
        return interaction

    async def _callback(self, request: web.Request) -> web.Response:
        interaction = self.interactions.get(int(request.match_info["id"]))
        if interaction is None or interaction.token != request.match_info["token"]:
            return self._error(404, 10062, "Unknown interaction")
        if time.monotonic() - interaction.created > INTERACTION_DEADLINE:
            return self._error(404, 10062, "Unknown interaction")
        if interaction.response_type is not None:
            return self._error(400, 40060, "Interaction has already been acknowledged.")
        body = await self._body(request)
        kind, data = body["type"], body.get("data") or {}
        interaction.response_type = kind
        result: dict[str, Any] = {"interaction": {"id": str(interaction.id), "type": 2}}
        if kind == 8:  # autocomplete
            interaction.choices = data.get("choices", [])
        elif kind in (4, 5):
            if kind == 4 and (error := self._check_content(data, creating=True)) is not None:
                interaction.response_type = None
                return error
            flags = data.get("flags", 0) | (128 if kind == 5 else 0)
            message = self._message(interaction.channel_id, self.bot_user, data.get("content") or "",
                                    flags=flags, components=data.get("components", []),
                                    interaction_metadata={"id": str(interaction.id), "type": 2,
                                                          "user": interaction.user.payload if interaction.user else None})
            self._resolve_mentions(message, data.get("allowed_mentions"), None)
            self._store(message)
            interaction.original_id = int(message["id"])
            result["interaction"] |= {"response_message_id": message["id"],
                                      "response_message_loading": kind == 5,
                                      "response_message_ephemeral": bool(flags & 64)}
            result["resource"] = {"type": kind, "message": message}
        elif kind == 7 and interaction.message_id is not None:
            message = {**self.messages[interaction.message_id], **{k: v for k, v in data.items() if k in ("content", "components")}}
            self._store(message)
            result["resource"] = {"type": kind, "message": message}
        return self._json(result)

    def _interaction_by_token(self, token: str) -> Interaction | None:
        return next((i for i in self.interactions.values() if i.token == token), None)

    async def _get_original(self, request: web.Request) -> web.Response:
        interaction = self._interaction_by_token(request.match_info["token"])
        if interaction is None or interaction.original_id is None:
            return self._error(404, 10008, "Unknown Message")
        return self._json(self.messages[interaction.original_id])

    async def _edit_original(self, request: web.Request) -> web.Response:
        interaction = self._interaction_by_token(request.match_info["token"])
        if interaction is None or interaction.original_id is None:
            return self._error(404, 10008, "Unknown Message")
        body = await self._body(request)
        if (error := self._check_content(body, creating=False)) is not None:
            return error
        message = {**self.messages[interaction.original_id], "edited_timestamp": iso_now()}
        message["flags"] = message["flags"] & ~128
        for key in ("content", "components"):
            if key in body:
                message[key] = body[key]
        self._store(message)
        return self._json(message)

    async def _followup(self, request: web.Request) -> web.Response:
        if int(request.match_info["app"]) in self.webhooks:  # the same route executes channel webhooks
            return await self._execute_webhook(request)
        interaction = self._interaction_by_token(request.match_info["token"])
        if interaction is None:
            return self._error(404, 10015, "Unknown Webhook")
        body = await self._body(request)
        if (error := self._check_content(body, creating=True)) is not None:
            return error
        message = self._message(interaction.channel_id, self.bot_user, body.get("content") or "",
                                flags=body.get("flags", 0))
        self._store(message)
        self.followups.append(message)
        return self._json(message)

    # ---- channel webhooks ---------------------------------------------------------------

    def _webhook_payload(self, webhook: dict[str, Any], with_token: bool = True) -> dict[str, Any]:
        payload = {k: v for k, v in webhook.items() if with_token or k != "token"}
        payload["user"] = self.bot_user.payload
        return payload

    def _may_manage_webhooks(self, channel_id: int) -> bool:
        guild_id = self.channels[channel_id].get("guild_id")
        return guild_id is not None and bool(self.bot_user.permissions_in(int(guild_id)) & PERM_MANAGE_WEBHOOKS)

    def take_manage_webhooks(self, guild_id: int = GUILD_ID) -> None:
        """A server admin takes Manage Webhooks away from the bot (the API answers 403 50013)."""
        if guild_id == GUILD_ID:
            self.bot_user.permissions &= ~PERM_MANAGE_WEBHOOKS
        else:
            permissions = self.bot_user.permissions_in(guild_id)
            self.bot_user.guild_permissions[guild_id] = permissions & ~PERM_MANAGE_WEBHOOKS

    def remove_webhook(self, webhook_id: int) -> None:
        """A moderator deletes a webhook in the channel settings (its messages stay)."""
        del self.webhooks[webhook_id]

    def channel_webhooks(self, channel_id: int) -> list[dict[str, Any]]:
        return [w for w in self.webhooks.values() if w["channel_id"] == str(channel_id)]

    def webhook_messages(self, channel_id: int) -> list[dict[str, Any]]:
        """Messages webhooks posted in a channel (not deleted), oldest first."""
        return sorted((m for mid, m in self.messages.items() if int(m["channel_id"]) == channel_id
                       and m.get("webhook_id") and mid not in self.deleted), key=lambda m: int(m["id"]))

    async def _create_webhook(self, request: web.Request) -> web.Response:
        channel_id = int(request.match_info["channel"])
        if channel_id not in self.channels:
            return self._error(404, 10003, "Unknown Channel")
        if not self._may_manage_webhooks(channel_id):
            return self._error(403, 50013, "Missing Permissions")
        if len(self.channel_webhooks(channel_id)) >= MAX_CHANNEL_WEBHOOKS:
            return self._error(400, 30007, "Maximum number of webhooks reached (15)")
        body = await self._body(request)
        name = body.get("name") or ""
        if not 1 <= len(name) <= 80 or "discord" in name.lower() or "clyde" in name.lower():
            return self._json({"code": 50035, "message": "Invalid Form Body",
                               "errors": {"name": {"_errors": [{"code": "BASE_TYPE_BAD_LENGTH",
                                                                "message": "Invalid webhook name"}]}}}, 400)
        webhook_id = snowflake()
        avatar = None
        if body.get("avatar"):
            data_uri = body["avatar"]
            if not re.match(r"^data:image/(png|jpeg|gif|webp);base64,", data_uri):
                return self._error(400, 50035, "Invalid Form Body")
            self.webhook_avatars[webhook_id] = base64.b64decode(data_uri.split(",", 1)[1])
            avatar = hashlib.md5(self.webhook_avatars[webhook_id]).hexdigest()
        channel = self.channels[channel_id]
        self.webhooks[webhook_id] = {
            "id": str(webhook_id), "type": 1, "channel_id": str(channel_id), "guild_id": channel.get("guild_id"),
            "name": name, "avatar": avatar, "token": f"webhook-token-{next(_ids)}", "application_id": str(BOT_ID),
        }
        return self._json(self._webhook_payload(self.webhooks[webhook_id]))

    async def _channel_webhooks(self, request: web.Request) -> web.Response:
        channel_id = int(request.match_info["channel"])
        if channel_id not in self.channels:
            return self._error(404, 10003, "Unknown Channel")
        if not self._may_manage_webhooks(channel_id):
            return self._error(403, 50013, "Missing Permissions")
        return self._json([self._webhook_payload(w) for w in self.channel_webhooks(channel_id)])

    async def _get_webhook(self, request: web.Request) -> web.Response:
        webhook = self.webhooks.get(int(request.match_info["webhook"]))
        if webhook is None:
            return self._error(404, 10015, "Unknown Webhook")
        return self._json(self._webhook_payload(webhook))

    async def _delete_webhook(self, request: web.Request) -> web.Response:
        webhook_id = int(request.match_info["webhook"])
        if webhook_id not in self.webhooks:
            return self._error(404, 10015, "Unknown Webhook")
        if not self._may_manage_webhooks(int(self.webhooks[webhook_id]["channel_id"])):
            return self._error(403, 50013, "Missing Permissions")
        self.remove_webhook(webhook_id)
        return web.Response(status=204)

    def _webhook_of(self, request: web.Request) -> dict[str, Any] | None:
        webhook = self.webhooks.get(int(request.match_info["app"]))
        return webhook if webhook is not None and webhook["token"] == request.match_info["token"] else None

    async def _execute_webhook(self, request: web.Request) -> web.Response:
        """POST /webhooks/{id}/{token}[?wait=true]: a message authored by the webhook, under
        the `username` given (else the webhook's name); components only for webhooks an
        application owns (all of these: the bot created them)."""
        webhook = self._webhook_of(request)
        if webhook is None:
            return self._error(404, 10015, "Unknown Webhook")
        webhook_id = int(webhook["id"])
        headers, limited = self._limit("POST", "/webhooks/{id}/{id}", str(webhook_id))
        if limited:
            return limited
        body = await self._body(request)
        if (error := self._check_content(body, creating=True)) is not None:
            return error
        channel_id = int(webhook["channel_id"])
        author = {"id": str(webhook_id), "username": body.get("username") or webhook["name"],
                  "avatar": webhook["avatar"], "discriminator": "0000", "bot": True, "public_flags": 0,
                  "global_name": None}
        message = self._message(channel_id, self.bot_user, body.get("content") or "", webhook_id=str(webhook_id),
                                application_id=webhook["application_id"], components=body.get("components", []))
        message.pop("member", None)
        message["author"] = author
        if body.get("avatar_url"):
            message["avatar_url"] = body["avatar_url"]
        self._resolve_mentions(message, body.get("allowed_mentions"), None)
        self._store(message)
        await self._dispatch("MESSAGE_CREATE", message)
        if request.query.get("wait", "false").lower() not in ("true", "1"):
            return web.Response(status=204, headers=headers)
        return self._json(message, headers=headers)

    def _webhook_message(self, request: web.Request, webhook: dict[str, Any]) -> dict[str, Any] | None:
        message_id = int(request.match_info["message"])
        message = self.messages.get(message_id)
        if message is None or message_id in self.deleted or message.get("webhook_id") != webhook["id"]:
            return None
        return message

    async def _edit_webhook_message(self, request: web.Request) -> web.Response:
        webhook = self._webhook_of(request)
        if webhook is None:
            return self._error(404, 10015, "Unknown Webhook")
        headers, limited = self._limit("PATCH", "/webhooks/{id}/{id}/messages/{id}", webhook["id"])
        if limited:
            return limited
        message = self._webhook_message(request, webhook)
        if message is None:
            return self._error(404, 10008, "Unknown Message")
        body = await self._body(request)
        if (error := self._check_content(body, creating=False)) is not None:
            return error
        updated = {**message, "edited_timestamp": iso_now()}
        for key in ("content", "components"):
            if key in body:
                updated[key] = body[key]
        self._resolve_mentions(updated, body.get("allowed_mentions"), None)
        self._store(updated)
        await self._dispatch("MESSAGE_UPDATE", updated)
        return self._json(updated, headers=headers)

    async def _delete_webhook_message(self, request: web.Request) -> web.Response:
        webhook = self._webhook_of(request)
        if webhook is None:
            return self._error(404, 10015, "Unknown Webhook")
        message = self._webhook_message(request, webhook)
        if message is None:
            return self._error(404, 10008, "Unknown Message")
        self.deleted.add(int(message["id"]))
        await self._dispatch("MESSAGE_DELETE", self._delete_event(int(message["id"])))
        return web.Response(status=204)

    # ---- playing users -----------------------------------------------------------------

    async def user_says(self, user: User, channel_id: int, content: str, reply_to: int | None = None,
                        mention_bot: bool = False, webhook_id: int | None = None,
                        attachments: list[tuple[str, bytes, str | None]] | None = None) -> int:
        """`user` posts `content`; `mention_bot` prefixes the bot's mention as a client does.
        With `webhook_id`, a webhook named after `user` posts it (author.bot is true, no member).
        `attachments`: files (filename, bytes, content type), served by this server's CDN route.
        The message exists even while the bot is disconnected; its event then waits for RESUME."""
        if mention_bot:
            content = f"<@{BOT_ID}> {content}"
        extra: dict[str, Any] = {}
        if reply_to is not None:
            extra = {"type": 19, "message_reference": {"message_id": str(reply_to), "channel_id": str(channel_id)},
                     "referenced_message": self.messages[reply_to]}
        if attachments:
            extra["attachments"] = [self._attachment_payload(*file) for file in attachments]
        message = self._message(channel_id, user, content, **extra)
        if webhook_id is not None:
            message.pop("member", None)
            message["webhook_id"] = str(webhook_id)
            message["author"] = {"id": str(webhook_id), "username": user.name, "global_name": None,
                                 "discriminator": "0000", "avatar": None, "bot": True, "public_flags": 0}
        self._resolve_mentions(message, {"parse": ["users"]}, None)
        self._store(message)
        await self._dispatch("MESSAGE_CREATE", message)
        return int(message["id"])

    def _attachment_payload(self, filename: str, content: bytes, content_type: str | None) -> dict[str, Any]:
        attachment_id = snowflake()
        self.attachments[attachment_id] = content
        url = f"{self.api_base.rsplit('/api/', 1)[0]}/attachments/{attachment_id}/{filename}"
        payload = {"id": str(attachment_id), "filename": filename, "size": len(content), "url": url, "proxy_url": url}
        return payload | ({"content_type": content_type} if content_type else {})

    async def webhook_says(self, channel_id: int, name: str, content: str, webhook_id: int | None = None) -> int:
        """A webhook called `name` (an integration, another bot's relay) posts `content`."""
        webhook_id = webhook_id or self._webhook_ids.setdefault(name, snowflake())
        return await self.user_says(User(webhook_id, name, bot=True), channel_id, content, webhook_id=webhook_id)

    def bot_posted(self, channel_id: int, content: str, reply_to: int | None = None,
                   stop_for: int | None = None) -> int:
        """A message the bot posted just before it was killed (no event: the bot is down).
        `reply_to` makes it a reply; `stop_for` gives it the live Stop and Regenerate buttons
        of a reply written for that user."""
        extra: dict[str, Any] = {}
        if reply_to is not None:
            extra = {"type": 19, "message_reference": {"message_id": str(reply_to), "channel_id": str(channel_id)},
                     "referenced_message": self.messages[reply_to]}
        if stop_for is not None:
            extra["components"] = [{"type": 1, "components": [
                {"type": 2, "style": 4, "label": "Stop", "custom_id": f"hermes:stop:{stop_for}"},
                {"type": 2, "style": 2, "label": "Regenerate", "custom_id": f"hermes:regen:{stop_for}"},
            ]}]
        message = self._message(channel_id, self.bot_user, content, **extra)
        self._store(message)
        return int(message["id"])

    async def user_edits(self, message_id: int, content: str) -> None:
        message = {**self.messages[message_id], "content": content, "edited_timestamp": iso_now()}
        self._store(message)
        await self._dispatch("MESSAGE_UPDATE", message)

    async def user_deletes(self, message_id: int) -> None:
        self.deleted.add(message_id)
        await self._dispatch("MESSAGE_DELETE", self._delete_event(message_id))

    # ---- reading what the bot did ------------------------------------------------------

    def bot_messages(self, channel_id: int) -> list[dict[str, Any]]:
        return [m for m in self.messages.values()
                if int(m["channel_id"]) == channel_id and m["author"]["id"] == str(BOT_ID)
                and int(m["id"]) not in self.deleted and not m.get("interaction_metadata")]

    def replies_to(self, message_id: int) -> list[dict[str, Any]]:
        return [m for m in self.messages.values() if m.get("message_reference", {}).get("message_id") == str(message_id)
                and int(m["id"]) not in self.deleted]

    def original(self, interaction: Interaction) -> dict[str, Any] | None:
        return self.messages.get(interaction.original_id) if interaction.original_id else None


async def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        crashes.check()  # a bot process or llama-server that died: say how, not "timed out"
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {getattr(predicate, '__name__', predicate)}")
