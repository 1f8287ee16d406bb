"""Settings: `.env` plus environment variables, validated once into one frozen object.

Environment variables override `.env`; an empty or blank value means "use the default";
variables that are not settings are ignored (the process environment has hundreds).
Environment names are matched in upper case only, `.env` names in any case. Every value is
checked when the bot starts: a bad one raises `SettingsError`, one line that names the
variable, quotes what it was given and says what it expects, so the bot refuses to start
instead of dying later with a traceback (`LOG_LEVEL=verbose` used to pass here and crash
`logging.basicConfig`).

Why pydantic-settings rather than hand-written parsing: each setting is declared once, as a
typed field with its constraints (`ge=`, `le=`, `Literal[...]`, `SecretStr`), and pydantic
checks all of them, defaults included, on every construction, so nothing can slip through
unparsed the way LOG_LEVEL did; `Settings(...)` built directly is validated exactly as the
environment is. Its `.env` source reads the file with python-dotenv's parser, as before.
What remains here are the rules that are ours: the Discord URLs, the id list, the `.gguf`
suffix, the database URL rewrite, MAX_NEW_TOKENS against N_CTX, and the wording of the
errors. `load_settings` composes the sources itself (the `.env` file, then a mapping of
environment variables: `os.environ`, or the one a test hands in), so `Settings(...)` alone
never reads the environment.

The token is a secret. It is a `SecretStr`: `repr(settings)`, `str(settings)`,
`settings.model_dump()` and any log line show `**********`; only `require_token()` returns
the plain string. Error messages never quote it (not even when it was pasted into another
variable), and a password in DATABASE_URL is masked in the repr. DISCORD_API_BASE must be
https:// and DISCORD_GATEWAY_URL wss://, so the token never travels in clear; plain http://
and ws:// are allowed only to a loopback host (127.0.0.0/8, localhost, ::1), where the
tests run their stand-in Discord.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings import SettingsError as _SourceError

DEFAULT_MODEL_REPO = "TheBloke/Nous-Hermes-Llama2-70B-GGUF"
DEFAULT_MODEL_FILE = "nous-hermes-llama2-70b.Q4_K_M.gguf"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///data/hermes.db"
DISCORD_API_BASE = "https://discord.com/api/v10"
DISCORD_GATEWAY_URL = "wss://gateway.discord.gg/"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_LOOPBACK = "127.0.0.0/8, localhost or ::1"
_HIDDEN = "<hidden>"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it and says what it expects."""


def _setting(default: Any, expects: str, **constraints: Any) -> Any:
    """A field whose description says, in words, what its variable expects (used in errors)."""
    return Field(default, description=expects, **constraints)


def _integer(default: int | None, minimum: int) -> Any:
    return _setting(default, f"an integer >= {minimum}", ge=minimum)


def _number(default: float, low: float, high: float) -> Any:
    return _setting(
        default, f"a number between {low} and {high}", ge=low, le=high, allow_inf_nan=False
    )


class Settings(BaseSettings):
    """Every setting of the bot, validated and immutable. See docs/settings.md.

    Build it with `load_settings()`; `Settings(n_ctx=2048, ...)` takes field names, validates
    them the same way (raising `SettingsError`), and reads nothing from the environment."""

    model_config = SettingsConfigDict(
        frozen=True,
        # Keyword construction rejects misspelt field names; unknown *environment*
        # variables never get here (load_settings keeps only the settings' own).
        extra="forbid",
        str_strip_whitespace=True,
        hide_input_in_errors=True,  # a ValidationError never prints a value (the token)
        validate_default=True,
    )

    discord_token: SecretStr | None = _setting(None, "the bot token")
    database_url: str = _setting(
        DEFAULT_DATABASE_URL,
        "an SQLAlchemy async URL such as sqlite+aiosqlite:///data/hermes.db or "
        "postgresql+asyncpg://user:pw@host/db",
    )
    model_path: Path | None = _setting(None, "a path to a .gguf file")
    model_repo: str = _setting(DEFAULT_MODEL_REPO, "a Hugging Face repository, owner/name")
    model_file: str = _setting(DEFAULT_MODEL_FILE, "a file name in MODEL_REPO")
    n_gpu_layers: int = _setting(-1, "an integer >= -1 (-1 = every layer on the GPU)", ge=-1)
    n_ctx: int = _integer(4096, 256)
    n_threads: int | None = _integer(None, 1)  # None = physical cores (a few with every layer on the GPU)
    # llama.cpp's CPU weight repacking (bot.engine.repack): off, since its AMX kernels crash
    # with SIGILL on Intel CPUs with AMX; true turns it on.
    llama_repack: bool = _setting(False, "true or false")
    max_new_tokens: int = _integer(512, 1)
    temperature: float = _number(0.7, 0.0, 5.0)
    top_p: float = _number(0.9, 0.0, 1.0)
    top_k: int = _integer(40, 0)
    repeat_penalty: float = _number(1.1, 0.0, 10.0)
    seed: int = _setting(-1, "an integer >= -1 (-1 = random)", ge=-1)
    admin_user_ids: Annotated[frozenset[int], NoDecode] = _setting(
        frozenset(), "comma-separated Discord user ids"
    )
    personas_dir: Path = _setting(Path("personas"), "a folder")
    models_dir: Path = _setting(Path("models"), "a folder")
    discord_api_base: str = _setting(
        DISCORD_API_BASE, f"an https:// URL (http:// only to a loopback host: {_LOOPBACK})"
    )
    discord_gateway_url: str = _setting(
        DISCORD_GATEWAY_URL, f"a wss:// URL (ws:// only to a loopback host: {_LOOPBACK})"
    )
    # "batched": continuous batching, per-conversation KV slots; "simple": llama-cpp-python's
    # one-sequence Llama.
    # "remote": a fleet of llama.cpp servers (LLAMA_SERVER_URLS) with conversation affinity.
    # "openai": any OpenAI-compatible completions server (OPENAI_BASE_URL): vLLM, SGLang, ...
    engine: Literal["batched", "simple", "remote", "openai"] = _setting(
        "batched", "'batched', 'simple', 'remote' or 'openai'"
    )
    llama_server_urls: Annotated[tuple[str, ...], NoDecode] = _setting(
        (), "comma-separated llama-server base URLs, http(s)://host:port"
    )
    # ENGINE=openai (bot.engine.openai_compat): the server, its model (empty: the first that
    # GET /v1/models lists) and its API key (a secret: never shown, sent as a bearer token).
    openai_base_url: str | None = _setting(None, "an http(s):// URL, with or without /v1")
    openai_model: str | None = _setting(None, "a model name the server serves (empty: its first)")
    openai_api_key: SecretStr | None = _setting(None, "the server's API key")
    # The operators' endpoint (bot.telemetry.probes): /metrics, /healthz, /readyz; "off" = none.
    metrics_addr: str = _setting("127.0.0.1:9464", "host:port (e.g. 127.0.0.1:9464), or off")
    # Speculative decoding in the batched engine (bot.engine.lookup): prompt-lookup drafts
    # verified per step; 0 = none.
    draft_tokens: int = _setting(4, "an integer from 0 to 6", ge=0, le=6)
    # A small GGUF with the model's vocabulary that drafts instead of prompt lookup
    # (bot.engine.draft_model): for a 70B on a GPU, a 1.1B or 7B Llama-2-vocabulary model.
    draft_model_path: Path | None = _setting(None, "a path to a .gguf file with the model's vocabulary")
    # Sequence slots of the batched engine; 0 = as many as the free GPU memory (or RAM) holds
    # after the model and a 10% reserve, at most 16 (bot.engine.common.size_engine, logged).
    n_parallel: int = _integer(0, 0)
    # Host RAM for conversations evicted from their slot; unset = 8 full conversations' KV,
    # at most a quarter of the RAM left after the model and its slots; 0 = none.
    kv_ram_cache_mb: int | None = _integer(None, 0)
    # Host RAM for evaluated preambles that several channels share (bot.engine.prefix_store):
    # a new channel with the same persona starts from a copy; 0 = none.
    prefix_cache_mb: int = _integer(256, 0)
    max_queue: int = _integer(32, 1)
    history_limit: int = _integer(200, 1)
    # Long memory: the turns that no longer fit are summarized in at most this many words
    # (bot.roleplay.memory, built in the background); 0 = no memory.
    memory_summary_words: int = _integer(200, 0)
    reply_to_bots: bool = _setting(False, "true or false")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = _setting(
        "INFO", f"one of {', '.join(LOG_LEVELS)} (any case)"
    )
    delivery_retry_seconds: float = _number(30.0, 0.0, 3600.0)  # Discord send/edit retried on 5xx
    # A database that went away (a PostgreSQL restart, a failover): each operation is retried
    # on a fresh connection this long; messages arriving after that are kept until it is back.
    database_retry_seconds: float = _number(60.0, 0.0, 3600.0)
    recovery_window_seconds: float = _number(300.0, 0.0, 7 * 86400.0)  # after a restart, answer these
    shutdown_grace_seconds: float = _number(10.0, 0.0, 600.0)  # SIGTERM: time for in-flight replies
    # Authority and fair use (see docs/reliability.md, "Who governs what").
    allowed_guild_ids: Annotated[frozenset[int], NoDecode] = _setting(
        frozenset(), "comma-separated Discord server ids (empty: any server)"
    )
    hub_allowed_repos: Annotated[frozenset[str], NoDecode] = _setting(
        frozenset({DEFAULT_MODEL_REPO}), "comma-separated hub repositories, owner/name"
    )
    max_download_gb: float = _number(100.0, 0.0, 10_000.0)  # largest hub file /reload-model fetches
    user_messages_per_minute: int = _integer(12, 0)  # answers per person per minute; 0 = no limit
    user_queue_share: int = _integer(0, 0)  # answers one person may have waiting; 0 = a quarter of MAX_QUEUE
    bot_reply_limit: int = _integer(3, 0)  # answers to bots in a row without a person speaking
    # Character cards a person may import in 10 minutes, all at once if they like; refused
    # cards do not count, the bot's owners are never limited; 0 = no limit.
    card_imports_per_10_minutes: int = _integer(10, 0)
    retention_days: int = _integer(0, 0)  # delete messages older than this; 0 = keep them
    # Discord shards: unset = one gateway connection; set = discord.py's AutoShardedBot.
    shard_count: int | None = _integer(None, 1)
    # The shards this process runs (others run the rest, sharing the database); empty = all.
    shard_ids: Annotated[frozenset[int], NoDecode] = _setting(
        frozenset(), "comma-separated shard ids, each below SHARD_COUNT (empty: all of them)"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only the keywords: the environment and `.env` are read by load_settings, which can
        # be handed a mapping and a file of its own (tests do), and whose errors are ours.
        return (init_settings,)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
            return
        except ValidationError as error:
            message = _explain(error, values)
        raise SettingsError(message)  # outside `except`: no chained ValidationError

    def require_token(self) -> str:
        """The Discord token, or a SettingsError saying how to get one."""
        if self.discord_token is None or not self.discord_token.get_secret_value():
            raise SettingsError(
                "DISCORD_TOKEN is not set: put your bot token in .env (see the README, "
                "'Create the Discord application'), or try the model without Discord "
                "with `hermes-bot chat`."
            )
        return self.discord_token.get_secret_value()

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            if name == "database_url" and isinstance(value, str):
                value = _mask_password(value)
            yield name, value

    @field_validator("discord_token", mode="before")
    @classmethod
    def _token(cls, value: Any) -> Any:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(raw, str):
            raw = raw.strip()
            if not raw:
                return None
            if not raw.isprintable() or any(c.isspace() for c in raw):
                raise ValueError("expected the bot token, one word without spaces")
        return raw

    @field_validator("database_url", mode="before")
    @classmethod
    def _database_url(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        value = value.strip()
        if "://" not in value:
            raise ValueError(
                "expected an SQLAlchemy async URL such as sqlite+aiosqlite:///data/hermes.db "
                "or postgresql+asyncpg://user:pw@host/db"
            )
        if value.startswith("sqlite://"):
            value = "sqlite+aiosqlite://" + value[len("sqlite://"):]
        return value

    @field_validator("model_path", "draft_model_path", "personas_dir", "models_dir", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if "\0" in value:
                raise ValueError("expected a path")
            value = Path(value)
        return value.expanduser() if isinstance(value, Path) else value

    @field_validator("model_path", "draft_model_path")
    @classmethod
    def _gguf(cls, value: Path | None) -> Path | None:
        if value is not None and value.suffix.lower() != ".gguf":
            raise ValueError("expected a path to a .gguf file")
        return value

    @field_validator("hub_allowed_repos", mode="before")
    @classmethod
    def _repos(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        repos = set()
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            owner, slash, name = part.partition("/")
            if not (slash and owner and name and "/" not in name and part.isprintable() and " " not in part):
                raise ValueError(f"{part!r} is not a hub repository; expected owner/name, comma-separated")
            repos.add(part)
        return frozenset(repos)

    @field_validator("llama_server_urls", mode="before")
    @classmethod
    def _server_urls(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        urls = []
        for part in value.split(","):
            part = part.strip().rstrip("/")
            if not part:
                continue
            if not part.startswith(("http://", "https://")) or " " in part:
                raise ValueError(f"{part!r} is not a server URL; expected http(s)://host:port, comma-separated")
            urls.append(part)
        return tuple(urls)

    @field_validator("openai_base_url", mode="before")
    @classmethod
    def _openai_url(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value.strip():
            return value.strip() if isinstance(value, str) else value
        url = value.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc or " " in url:
            raise ValueError("expected an http(s)://host:port URL, with or without /v1")
        return url

    @field_validator("metrics_addr", mode="before")
    @classmethod
    def _metrics_addr(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        value = value.strip()
        if value.lower() in ("off", "none", "false"):
            return ""
        host, sep, port = value.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
        if (not sep or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536
                or " " in host or (not bracketed and any(c in host for c in "[]:"))):
            raise ValueError("expected host:port, e.g. 127.0.0.1:9464 or [::1]:9464, or off")
        return value

    @field_validator("admin_user_ids", "allowed_guild_ids", mode="before")
    @classmethod
    def _ids(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        ids = set()
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            if not (part.isascii() and part.isdigit()):
                raise ValueError(
                    f"{part!r} is not a Discord id; expected comma-separated numbers "
                    "(Developer Mode → right-click → Copy ID)"
                )
            ids.add(int(part))
        return frozenset(ids)

    @field_validator("discord_api_base", mode="before")
    @classmethod
    def _api_base(cls, value: Any) -> Any:
        return _checked_url(value, "https", "http") if isinstance(value, str) else value

    @field_validator("discord_gateway_url", mode="before")
    @classmethod
    def _gateway_url(cls, value: Any) -> Any:
        return _checked_url(value, "wss", "ws") if isinstance(value, str) else value

    @field_validator("engine", mode="before")
    @classmethod
    def _engine(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _room_for_the_conversation(self) -> Settings:
        if self.max_new_tokens >= self.n_ctx // 2:
            raise ValueError(
                f"MAX_NEW_TOKENS={self.max_new_tokens}: expected less than half of "
                f"N_CTX={self.n_ctx}, so that the conversation still fits in the prompt"
            )
        if self.engine == "remote" and not self.llama_server_urls:
            raise ValueError("ENGINE=remote needs LLAMA_SERVER_URLS: the llama-server base URLs, comma-separated")
        if self.engine == "openai" and not self.openai_base_url:
            raise ValueError("ENGINE=openai needs OPENAI_BASE_URL: the server's URL, e.g. http://gpu1:8000/v1")
        return self

    @field_validator("shard_ids", mode="before")
    @classmethod
    def _shard_ids(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        ids = set()
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            if not (part.isascii() and part.isdigit()):
                raise ValueError(f"{part!r} is not a shard id; expected comma-separated numbers from 0")
            ids.add(int(part))
        return frozenset(ids)

    @model_validator(mode="after")
    def _shards(self) -> Settings:
        if self.shard_ids and self.shard_count is None:
            raise ValueError("SHARD_IDS needs SHARD_COUNT (the total number of shards, over every process)")
        if self.shard_count is not None and any(i >= self.shard_count for i in self.shard_ids):
            raise ValueError(
                f"SHARD_IDS={','.join(map(str, sorted(self.shard_ids)))}: expected ids below "
                f"SHARD_COUNT={self.shard_count} (shards are numbered from 0)"
            )
        return self


def _is_loopback(host: str) -> bool:
    host = host.rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _checked_url(value: str, secure: str, plain: str) -> str:
    """`value` if it is a secure-scheme URL, or a plain-scheme one to a loopback host.

    Anything a URL parser might read differently from urllib (user info, backslashes,
    spaces, control characters) is refused rather than interpreted."""
    value = value.strip()
    article = "an" if secure == "https" else "a"
    expected = f"expected {article} {secure}:// URL ({plain}:// only to a loopback host: {_LOOPBACK})"
    if not re.fullmatch(r"[!-~]+", value) or "\\" in value:
        raise ValueError(expected)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ValueError(expected) from None
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if not host or "@" in parts.netloc:
        raise ValueError(expected)
    if scheme == secure or (scheme == plain and _is_loopback(host)):
        return value
    raise ValueError(expected)


def _mask_password(url: str) -> str:
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)


class _MappingSource(PydanticBaseSettingsSource):
    """The settings found in a mapping of environment variables (os.environ or a test's).

    Names are matched exactly, in upper case, as they always were: a stray lower-case
    `seed` or `engine` some other tool exported is not a setting of the bot."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._environ = environ

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._environ.get(field_name.upper()), field_name, False

    def __call__(self) -> dict[str, Any]:
        found = {}
        for name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, name)
            if value is not None:
                found[key] = value
        return found


def _variable(field: str) -> str:
    return field.upper()


def _shown(value: Any) -> str:
    """A bad value as the error message quotes it: numbers bare, anything else in repr."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return repr(value)
        return value
    return repr(value)


def _explain(error: ValidationError, given: Mapping[str, Any]) -> str:
    """One line for all the problems: VARIABLE=value: expected what it expects; ...

    `given` holds the values as they were read, so the message quotes what the user wrote
    (not what a validator had made of it) and never the token."""
    problems = []
    for item in error.errors(include_url=False):
        loc = item.get("loc") or ()
        detail = item.get("msg", "")
        if item.get("type") == "value_error":
            detail = str(item.get("ctx", {}).get("error", detail))
        if not loc:  # a rule across settings; its message names them
            problems.append(detail)
            continue
        field = str(loc[0])
        info = Settings.model_fields.get(field)
        if item.get("type") != "value_error" and info is not None and info.description:
            detail = f"expected {info.description}"
        if field in ("discord_token", "openai_api_key"):
            problems.append(f"{_variable(field)}: {detail}")
        else:
            value = given[field] if field in given else item.get("input")
            problems.append(f"{_variable(field)}={_shown(value)}: {detail}")
    message = "; ".join(problems) or "invalid settings"
    for secret in ("discord_token", "openai_api_key"):
        token = given.get(secret)
        if isinstance(token, SecretStr):
            token = token.get_secret_value()
        if isinstance(token, str) and len(token.strip()) >= 8:
            message = message.replace(token.strip(), _HIDDEN)
    return message.replace("\n", " ")


def _known(values: Mapping[str, Any]) -> dict[str, Any]:
    """The settings' own variables, stripped; blank ones dropped so the default applies."""
    kept = {}
    for name, value in values.items():
        if name not in Settings.model_fields:
            continue
        if isinstance(value, str):
            value = value.strip()
            if not value:
                continue
        kept[name] = value
    return kept


def load_settings(
    environ: Mapping[str, str] | None = None, dotenv_path: str | Path | None = ".env"
) -> Settings:
    """Read `.env` (if present) and the environment (`os.environ` unless `environ` is
    given), environment first, and validate everything once. Raises `SettingsError`."""
    try:
        from_file = (
            {}
            if dotenv_path is None
            else DotEnvSettingsSource(
                Settings, env_file=Path(dotenv_path), env_file_encoding="utf-8"
            )()
        )
        from_env = _MappingSource(Settings, os.environ if environ is None else environ)()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise SettingsError(f"{dotenv_path}: cannot read the settings file ({reason})") from None
    except _SourceError as error:
        raise SettingsError(f"cannot read the settings: {error}") from None
    # The environment overrides `.env`, a blank value included: blank means the default.
    return Settings(**_known({**from_file, **from_env}))
