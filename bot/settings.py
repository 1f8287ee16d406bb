"""Settings: `.env` plus environment variables, validated once into one frozen object.

Environment variables override `.env`. A bad value raises `SettingsError` naming the
variable and what it expects, so the bot refuses to start instead of misbehaving later.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from dotenv import dotenv_values

DEFAULT_MODEL_REPO = "TheBloke/Nous-Hermes-Llama2-70B-GGUF"
DEFAULT_MODEL_FILE = "nous-hermes-llama2-70b.Q4_K_M.gguf"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///data/hermes.db"
DISCORD_API_BASE = "https://discord.com/api/v10"
DISCORD_GATEWAY_URL = "wss://gateway.discord.gg/"

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it and says what it expects."""


@dataclass(frozen=True)
class Settings:
    """Every setting of the bot, validated. See the README's settings table."""

    discord_token: str | None = None
    database_url: str = DEFAULT_DATABASE_URL
    model_path: Path | None = None
    model_repo: str = DEFAULT_MODEL_REPO
    model_file: str = DEFAULT_MODEL_FILE
    n_gpu_layers: int = -1
    n_ctx: int = 4096
    n_threads: int | None = None
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    repeat_penalty: float = 1.1
    seed: int = -1
    admin_user_ids: frozenset[int] = field(default_factory=frozenset)
    personas_dir: Path = Path("personas")
    models_dir: Path = Path("models")
    discord_api_base: str = DISCORD_API_BASE
    discord_gateway_url: str = DISCORD_GATEWAY_URL
    engine: str = "batched"  # or "simple": llama-cpp-python's one-sequence Llama
    n_parallel: int = 0  # sequence slots of the batched engine; 0 = sized from KV memory
    kv_ram_cache_mb: int = 1024  # host RAM for conversations evicted from their slot
    max_queue: int = 32
    history_limit: int = 200
    reply_to_bots: bool = False
    log_level: str = "INFO"
    delivery_retry_seconds: float = 30.0  # how long a Discord send or edit is retried on 5xx
    recovery_window_seconds: float = 300.0  # after a restart, answer questions this recent
    shutdown_grace_seconds: float = 10.0  # SIGTERM: how long in-flight replies get to finish

    def require_token(self) -> str:
        """The Discord token, or a SettingsError saying how to get one."""
        if not self.discord_token:
            raise SettingsError(
                "DISCORD_TOKEN is not set: put your bot token in .env (see the README, "
                "'Create the Discord application'), or try the model without Discord "
                "with `hermes-bot chat`."
            )
        return self.discord_token


def _parse_int(name: str, raw: str, minimum: int | None = None) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected an integer") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}={value}: expected an integer >= {minimum}")
    return value


def _parse_float(name: str, raw: str, low: float, high: float) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a number") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={value}: expected a number between {low} and {high}")
    return value


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}={raw!r}: expected true or false")


def _parse_ids(name: str, raw: str) -> frozenset[int]:
    ids = set()
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit():
            raise SettingsError(
                f"{name}: {part!r} is not a Discord user id; expected comma-separated numbers "
                "(Developer Mode → right-click a user → Copy User ID)"
            )
        ids.add(int(part))
    return frozenset(ids)


def _parse_url(name: str, raw: str, schemes: tuple[str, ...]) -> str:
    value = raw.strip()
    if not value.startswith(tuple(f"{s}://" for s in schemes)):
        raise SettingsError(f"{name}={value!r}: expected a URL starting with {' or '.join(schemes)}://")
    return value


def _parse_database_url(name: str, raw: str) -> str:
    value = raw.strip()
    if "://" not in value:
        raise SettingsError(
            f"{name}={value!r}: expected an SQLAlchemy async URL such as "
            "sqlite+aiosqlite:///data/hermes.db or postgresql+asyncpg://user:pw@host/db"
        )
    if value.startswith("sqlite://") or value.startswith("sqlite:///"):
        value = "sqlite+aiosqlite://" + value[len("sqlite://"):]
    return value


def _parse_engine(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in {"batched", "simple"}:
        raise SettingsError(f"{name}={raw!r}: expected 'batched' or 'simple'")
    return value


def _parse_model_path(name: str, raw: str) -> Path:
    path = Path(raw.strip()).expanduser()
    if path.suffix.lower() != ".gguf":
        raise SettingsError(f"{name}={raw!r}: expected a path to a .gguf file")
    return path


def load_settings(
    environ: Mapping[str, str] | None = None, dotenv_path: str | Path | None = ".env"
) -> Settings:
    """Read `.env` (if present) and the environment, and validate everything once."""
    values: dict[str, str] = {}
    if dotenv_path is not None and Path(dotenv_path).is_file():
        values.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    values.update(os.environ if environ is None else environ)

    def get(name: str, parse: Callable[[str, str], T], default: T) -> T:
        raw = values.get(name)
        if raw is None or raw.strip() == "":
            return default
        return parse(name, raw)

    defaults = Settings()
    settings = Settings(
        discord_token=get("DISCORD_TOKEN", lambda n, r: r.strip(), None),
        database_url=get("DATABASE_URL", _parse_database_url, defaults.database_url),
        model_path=get("MODEL_PATH", _parse_model_path, None),
        model_repo=get("MODEL_REPO", lambda n, r: r.strip(), defaults.model_repo),
        model_file=get("MODEL_FILE", lambda n, r: r.strip(), defaults.model_file),
        n_gpu_layers=get("N_GPU_LAYERS", lambda n, r: _parse_int(n, r, -1), defaults.n_gpu_layers),
        n_ctx=get("N_CTX", lambda n, r: _parse_int(n, r, 256), defaults.n_ctx),
        n_threads=get("N_THREADS", lambda n, r: _parse_int(n, r, 1), None),
        max_new_tokens=get("MAX_NEW_TOKENS", lambda n, r: _parse_int(n, r, 1), defaults.max_new_tokens),
        temperature=get("TEMPERATURE", lambda n, r: _parse_float(n, r, 0.0, 5.0), defaults.temperature),
        top_p=get("TOP_P", lambda n, r: _parse_float(n, r, 0.0, 1.0), defaults.top_p),
        top_k=get("TOP_K", lambda n, r: _parse_int(n, r, 0), defaults.top_k),
        repeat_penalty=get(
            "REPEAT_PENALTY", lambda n, r: _parse_float(n, r, 0.0, 10.0), defaults.repeat_penalty
        ),
        seed=get("SEED", lambda n, r: _parse_int(n, r, -1), defaults.seed),
        admin_user_ids=get("ADMIN_USER_IDS", _parse_ids, frozenset()),
        personas_dir=get("PERSONAS_DIR", lambda n, r: Path(r.strip()).expanduser(), defaults.personas_dir),
        models_dir=get("MODELS_DIR", lambda n, r: Path(r.strip()).expanduser(), defaults.models_dir),
        discord_api_base=get(
            "DISCORD_API_BASE", lambda n, r: _parse_url(n, r, ("http", "https")), defaults.discord_api_base
        ),
        discord_gateway_url=get(
            "DISCORD_GATEWAY_URL", lambda n, r: _parse_url(n, r, ("ws", "wss")), defaults.discord_gateway_url
        ),
        engine=get("ENGINE", _parse_engine, defaults.engine),
        n_parallel=get("N_PARALLEL", lambda n, r: _parse_int(n, r, 0), defaults.n_parallel),
        kv_ram_cache_mb=get("KV_RAM_CACHE_MB", lambda n, r: _parse_int(n, r, 0), defaults.kv_ram_cache_mb),
        max_queue=get("MAX_QUEUE", lambda n, r: _parse_int(n, r, 1), defaults.max_queue),
        history_limit=get("HISTORY_LIMIT", lambda n, r: _parse_int(n, r, 1), defaults.history_limit),
        reply_to_bots=get("REPLY_TO_BOTS", _parse_bool, defaults.reply_to_bots),
        log_level=get("LOG_LEVEL", lambda n, r: r.strip().upper(), defaults.log_level),
        delivery_retry_seconds=get(
            "DELIVERY_RETRY_SECONDS", lambda n, r: _parse_float(n, r, 0.0, 3600.0), defaults.delivery_retry_seconds
        ),
        recovery_window_seconds=get(
            "RECOVERY_WINDOW_SECONDS", lambda n, r: _parse_float(n, r, 0.0, 7 * 86400.0),
            defaults.recovery_window_seconds,
        ),
        shutdown_grace_seconds=get(
            "SHUTDOWN_GRACE_SECONDS", lambda n, r: _parse_float(n, r, 0.0, 600.0), defaults.shutdown_grace_seconds
        ),
    )
    if settings.max_new_tokens >= settings.n_ctx // 2:
        raise SettingsError(
            f"MAX_NEW_TOKENS={settings.max_new_tokens}: expected less than half of "
            f"N_CTX={settings.n_ctx}, so that the conversation still fits in the prompt"
        )
    return settings
