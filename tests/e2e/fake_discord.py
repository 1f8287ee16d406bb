"""A local stand-in of the Discord API for end-to-end tests: REST routes and the gateway
websocket on 127.0.0.1, which the real discord.py client connects to.

It behaves like Discord where the bot could get it wrong: content over 2000 characters is
refused (50035), an empty message is refused (50006), interactions must be answered within
3 seconds (10062), message routes have rate-limit buckets (5 per 5 s per channel) that
answer 429 with Discord's headers when exhausted, pings follow `allowed_mentions`, and JSON
is served with exactly `application/json`. Tests play users through `user_says`,
`slash`, `click`, `user_edits` and `user_deletes`, and read what the bot did from
`messages`, `history` (every content a message had), `rate_limited` and `requests`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

DISCORD_EPOCH_MS = 1420070400000
BOT_ID = 900000000000000001
GUILD_ID = 800000000000000001
PERM_ADMINISTRATOR = 1 << 3
PERM_MANAGE_CHANNELS = 1 << 4
PERM_DEFAULT = 0x0000000000000400 | 0x0000000000000800 | 0x0000000000010000  # view, send, history
MESSAGE_LIMIT = 2000
INTERACTION_DEADLINE = 3.0
_ids = itertools.count(1)


def snowflake() -> int:
    return ((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | (next(_ids) & 0x3FFFFF)


def iso_now() -> str:
    return datetime.now(UTC).isoformat()


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
    permissions: int = PERM_DEFAULT
    bot: bool = False

    @property
    def payload(self) -> dict[str, Any]:
        return user_payload(self.id, self.name, self.bot)

    def member(self) -> dict[str, Any]:
        return {
            "user": self.payload,
            "roles": [],
            "joined_at": iso_now(),
            "deaf": False,
            "mute": False,
            "nick": None,
            "flags": 0,
            "permissions": str(self.permissions),
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


class FakeDiscord:
    """The stand-in server. `await start()`, then point the bot at `api_base`/`gateway_url`."""

    def __init__(self) -> None:
        self.bot_user = User(BOT_ID, "Hermes", bot=True)
        self.ann = User(100000000000000001, "Ann")
        self.bob = User(100000000000000002, "Bob")
        self.mod = User(100000000000000003, "Mod", permissions=PERM_DEFAULT | PERM_MANAGE_CHANNELS)
        self.owner = User(100000000000000004, "Owner", permissions=PERM_DEFAULT | PERM_ADMINISTRATOR)
        self.other_bot = User(100000000000000005, "OtherBot", bot=True)
        self.general = 700000000000000001
        self.random = 700000000000000002
        self.thread = 700000000000000003
        self.dm = 700000000000000009
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
        self._buckets: dict[tuple[str, str, str], Bucket] = {}
        self._ws: web.WebSocketResponse | None = None
        self._seq = 0
        self.identified = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.api_base = ""
        self.gateway_url = ""

    @staticmethod
    def _text_channel(channel_id: int, name: str) -> dict[str, Any]:
        return {
            "id": str(channel_id), "type": 0, "guild_id": str(GUILD_ID), "name": name, "position": 0,
            "permission_overwrites": [], "nsfw": False, "parent_id": None, "topic": None,
            "last_message_id": None, "rate_limit_per_user": 0, "flags": 0,
        }

    # ---- server lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record])
        api = "/api/v10"
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get(f"{api}/users/@me", self._me)
        app.router.add_get(f"{api}/oauth2/applications/@me", self._application)
        app.router.add_put(f"{api}/applications/{{app}}/commands", self._sync_commands)
        app.router.add_get(f"{api}/channels/{{channel}}", self._get_channel)
        app.router.add_post(f"{api}/channels/{{channel}}/typing", self._typing)
        app.router.add_post(f"{api}/channels/{{channel}}/messages", self._create_message)
        app.router.add_get(f"{api}/channels/{{channel}}/messages/{{message}}", self._get_message)
        app.router.add_patch(f"{api}/channels/{{channel}}/messages/{{message}}", self._edit_message)
        app.router.add_delete(f"{api}/channels/{{channel}}/messages/{{message}}", self._delete_message)
        app.router.add_post(f"{api}/interactions/{{id}}/{{token}}/callback", self._callback)
        app.router.add_get(f"{api}/webhooks/{{app}}/{{token}}/messages/@original", self._get_original)
        app.router.add_patch(f"{api}/webhooks/{{app}}/{{token}}/messages/@original", self._edit_original)
        app.router.add_post(f"{api}/webhooks/{{app}}/{{token}}", self._followup)
        app.router.add_get("/attachments/{id}/{filename}", self._attachment)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.api_base = f"http://127.0.0.1:{port}{api}"
        self.gateway_url = f"ws://127.0.0.1:{port}/gateway"

    async def stop(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        self.requests.append((request.method, request.path, response.status))
        return response

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

    def _limit(self, method: str, route: str, major: str) -> tuple[dict[str, str], web.Response | None]:
        """Take one request from the (route, channel) bucket: its headers, or a 429."""
        key = (method, route, major)
        if key not in self._buckets:
            self._buckets[key] = Bucket(limit=5, window=5.0)
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
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 41250}})
        async for frame in ws:
            if frame.type != WSMsgType.TEXT:
                continue
            payload = json.loads(frame.data)
            if payload["op"] == 1:
                await ws.send_json({"op": 11})
            elif payload["op"] == 2:
                await self._dispatch("READY", {
                    "v": 10, "user": self.bot_user.payload, "session_id": "fake-session",
                    "resume_gateway_url": self.gateway_url, "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
                    "private_channels": [], "relationships": [],
                    "application": {"id": str(BOT_ID), "flags": 0},
                })
                await self._dispatch("GUILD_CREATE", self._guild())
                self.identified.set()
        return ws

    def _guild(self) -> dict[str, Any]:
        members = [u.member() for u in (self.bot_user, self.ann, self.bob, self.mod, self.owner)]
        for member in members:
            member.pop("permissions")
        return {
            "id": str(GUILD_ID), "name": "Test Guild", "icon": None, "owner_id": str(self.owner.id),
            "roles": [{"id": str(GUILD_ID), "name": "@everyone", "permissions": str(PERM_DEFAULT), "position": 0,
                       "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}],
            "channels": [c for c in self.channels.values() if c["type"] == 0],
            "threads": [self.channels[self.thread]],
            "members": members, "member_count": len(members), "emojis": [], "stickers": [],
            "features": [], "large": False, "unavailable": False, "voice_states": [], "presences": [],
            "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
            "mfa_level": 0, "premium_tier": 0, "preferred_locale": "en-US", "nsfw_level": 0,
            "system_channel_flags": 0, "joined_at": iso_now(),
        }

    async def _dispatch(self, event: str, data: dict[str, Any]) -> None:
        assert self._ws is not None, "the bot is not connected"
        self._seq += 1
        await self._ws.send_json({"op": 0, "s": self._seq, "t": event, "d": data})

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
            member = author.member()
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
        everyone = {u.id: u for u in (self.ann, self.bob, self.mod, self.owner, self.bot_user)}
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
            referenced = self.messages.get(int(reference["message_id"]))
            if referenced is None:
                return self._error(400, 50035, "Invalid Form Body: Unknown message")
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
        message = self.messages.get(int(request.match_info["message"]))
        if message is None:
            return self._error(404, 10008, "Unknown Message")
        return self._json(message)

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
        content = self.attachments.get(int(request.match_info["id"]))
        if content is None:
            return web.Response(status=404)
        return web.Response(body=content, content_type="application/octet-stream")

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
        payload: dict[str, Any] = {
            "id": str(interaction.id), "application_id": str(BOT_ID), "type": kind, "token": interaction.token,
            "version": 1, "channel_id": str(channel_id), "channel": channel, "data": data,
            "app_permissions": str(PERM_DEFAULT), "locale": "en-US", "entitlements": [],
            "attachment_size_limit": 8 * 1024 * 1024,
            "authorizing_integration_owners": {"0": str(GUILD_ID)},
        }
        if "guild_id" in channel:
            payload |= {"guild_id": str(GUILD_ID), "guild_locale": "en-US", "member": user.member(), "context": 0}
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

    # ---- playing users -----------------------------------------------------------------

    async def user_says(self, user: User, channel_id: int, content: str, reply_to: int | None = None,
                        mention_bot: bool = False) -> int:
        """`user` posts `content`; `mention_bot` prefixes the bot's mention as a client does."""
        if mention_bot:
            content = f"<@{BOT_ID}> {content}"
        extra: dict[str, Any] = {}
        if reply_to is not None:
            extra = {"type": 19, "message_reference": {"message_id": str(reply_to), "channel_id": str(channel_id)},
                     "referenced_message": self.messages[reply_to]}
        message = self._message(channel_id, user, content, **extra)
        self._resolve_mentions(message, {"parse": ["users"]}, None)
        self._store(message)
        await self._dispatch("MESSAGE_CREATE", message)
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
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {getattr(predicate, '__name__', predicate)}")
