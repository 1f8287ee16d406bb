import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.core.settings import (
    DEFAULT_MODEL_FILE,
    DISCORD_API_BASE,
    DISCORD_GATEWAY_URL,
    Settings,
    SettingsError,
    load_settings,
)

REPO = Path(__file__).resolve().parents[2]
TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GabcDE.very-secret-token_value"


def test_defaults_without_env() -> None:
    settings = load_settings({}, dotenv_path=None)
    assert settings.n_ctx == 4096
    assert settings.n_gpu_layers == -1
    assert settings.model_path is None
    assert settings.model_file == DEFAULT_MODEL_FILE
    assert settings.database_url.startswith("sqlite+aiosqlite:///data/")
    assert settings.discord_api_base == DISCORD_API_BASE
    assert settings.discord_gateway_url == DISCORD_GATEWAY_URL
    assert settings.log_level == "INFO"
    assert settings.admin_user_ids == frozenset()
    assert (settings.delivery_retry_seconds, settings.recovery_window_seconds) == (30.0, 300.0)
    assert settings.shutdown_grace_seconds == 10.0
    assert settings == Settings()  # the defaults of the class are the defaults of the bot


def test_dotenv_read_and_environment_overrides(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "N_CTX=2048\nTEMPERATURE=0.2\nADMIN_USER_IDS=1, 22 ,333\nLOG_LEVEL=debug\n"
        "NOT_A_SETTING=whatever\n"
    )
    settings = load_settings({"N_CTX": "8192", "LOG_LEVEL": ""}, dotenv_path=env_file)
    assert settings.n_ctx == 8192  # the environment wins
    assert settings.temperature == 0.2  # the file fills in the rest
    assert settings.admin_user_ids == {1, 22, 333}
    # An empty value means "the default", even over the file's value.
    assert settings.log_level == "INFO"


def test_missing_dotenv_file_is_no_error(tmp_path: Path) -> None:
    assert load_settings({}, dotenv_path=tmp_path / "absent.env").n_ctx == 4096


def test_unknown_environment_variables_are_ignored() -> None:
    environ = {**os.environ, "HERMES_SOMETHING": "x", "N_CTX": "2048", "MAX_NEW_TOKENS": "64"}
    environ["seed"] = "not a number"  # lower case: some other tool's variable, not SEED
    settings = load_settings(environ, dotenv_path=None)
    assert settings.n_ctx == 2048
    assert settings.seed == -1


def test_blank_values_mean_the_default() -> None:
    settings = load_settings({"N_THREADS": "  ", "MODEL_PATH": "", "LOG_LEVEL": " "}, dotenv_path=None)
    assert settings.n_threads is None
    assert settings.model_path is None
    assert settings.log_level == "INFO"


def test_values_are_normalised() -> None:
    settings = load_settings(
        {
            "LOG_LEVEL": " warning ",
            "ENGINE": "Simple",
            "REPLY_TO_BOTS": "yes",
            "N_CTX": " 2048 ",
            "MODEL_PATH": "~/models/m.GGUF",
        },
        dotenv_path=None,
    )
    assert settings.log_level == "WARNING"
    assert settings.engine == "simple"
    assert settings.reply_to_bots is True
    assert settings.n_ctx == 2048
    assert settings.model_path == Path("~/models/m.GGUF").expanduser()


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("LOG_LEVEL", "verbose", "LOG_LEVEL='verbose': expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("N_CTX", "big", "N_CTX='big': expected an integer"),
        ("N_CTX", "lots", "N_CTX='lots': expected an integer"),
        ("N_CTX", "100", "N_CTX=100: expected an integer >= 256"),
        ("TEMPERATURE", "9", "TEMPERATURE=9: expected a number between 0.0 and 5.0"),
        ("TEMPERATURE", "nan", "TEMPERATURE=nan: expected a number"),
        ("TOP_P", "1.5", "TOP_P=1.5: expected a number between 0.0 and 1.0"),
        ("DISCORD_API_BASE", "http://example.com/api", "DISCORD_API_BASE='http://example.com/api': expected an https:// URL"),
        ("DISCORD_API_BASE", "localhost:80", "DISCORD_API_BASE='localhost:80': expected an https:// URL"),
        ("DISCORD_API_BASE", "http://127.0.0.1@example.com/api", "DISCORD_API_BASE="),
        ("DISCORD_API_BASE", "http://localhost.example.com/api", "DISCORD_API_BASE="),
        ("DISCORD_API_BASE", "ftp://127.0.0.1/api", "DISCORD_API_BASE="),
        ("DISCORD_API_BASE", "https://", "DISCORD_API_BASE="),
        ("DISCORD_GATEWAY_URL", "ws://example.com", "DISCORD_GATEWAY_URL='ws://example.com': expected a wss:// URL"),
        ("DISCORD_GATEWAY_URL", "https://gateway.discord.gg", "DISCORD_GATEWAY_URL="),
        ("ADMIN_USER_IDS", "abc", "ADMIN_USER_IDS='abc': 'abc' is not a Discord id"),
        ("ADMIN_USER_IDS", "12,bob", "ADMIN_USER_IDS='12,bob': 'bob' is not a Discord id"),
        ("MODEL_PATH", "x.bin", "MODEL_PATH='x.bin': expected a path to a .gguf file"),
        ("MODEL_PATH", "model.bin", "MODEL_PATH='model.bin': expected a path to a .gguf file"),
        ("DATABASE_URL", "hermes.db", "DATABASE_URL='hermes.db': expected an SQLAlchemy async URL"),
        ("MAX_NEW_TOKENS", "3000", "MAX_NEW_TOKENS=3000: expected less than half of N_CTX=4096"),
        ("MAX_NEW_TOKENS", "0", "MAX_NEW_TOKENS=0: expected an integer >= 1"),
        ("ENGINE", "vllm", "ENGINE='vllm': expected 'batched', 'simple', 'remote' or 'openai'"),
        ("N_PARALLEL", "-2", "N_PARALLEL=-2: expected an integer >= 0"),
        ("N_THREADS", "0", "N_THREADS=0: expected an integer >= 1"),
        ("REPLY_TO_BOTS", "maybe", "REPLY_TO_BOTS='maybe': expected true or false"),
        ("SHUTDOWN_GRACE_SECONDS", "-1", "SHUTDOWN_GRACE_SECONDS=-1: expected a number between"),
        ("DELIVERY_RETRY_SECONDS", "soon", "DELIVERY_RETRY_SECONDS='soon': expected a number"),
        ("RECOVERY_WINDOW_SECONDS", "inf", "RECOVERY_WINDOW_SECONDS=inf: expected a number"),
        ("OPENAI_BASE_URL", "gpu1:8000", "OPENAI_BASE_URL='gpu1:8000': expected an http(s)://host:port URL"),
        ("OPENAI_BASE_URL", "http://me:pw@gpu1/v1", "OPENAI_BASE_URL="),
        ("METRICS_ADDR", "9464", "METRICS_ADDR=9464: expected host:port"),
        ("METRICS_ADDR", "localhost:99999", "METRICS_ADDR='localhost:99999': expected host:port"),
        ("METRICS_ADDR", "::1:9464", "METRICS_ADDR='::1:9464': expected host:port"),
        ("METRICS_ADDR", "[::1:9464", "METRICS_ADDR='[::1:9464': expected host:port"),
        ("METRICS_ADDR", "[]:9464", "METRICS_ADDR='[]:9464': expected host:port"),
        ("METRICS_ADDR", "localhost:٩٤٦٤", "METRICS_ADDR='localhost:٩٤٦٤': expected host:port"),
        ("ENGINE", "openai", "ENGINE=openai needs OPENAI_BASE_URL"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({name: value}, dotenv_path=None)
    message = str(raised.value)
    assert message.startswith(expected)
    assert "\n" not in message  # the CLI prints it as one line


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({"N_CTX": "big", "LOG_LEVEL": "verbose"}, dotenv_path=None)
    assert "N_CTX='big'" in str(raised.value)
    assert "LOG_LEVEL='verbose'" in str(raised.value)


@pytest.mark.parametrize(
    ("api_base", "gateway_url"),
    [
        ("http://127.0.0.1:8080/api/v10", "ws://127.0.0.1:8080/gateway"),
        ("http://127.8.9.10/api", "ws://127.8.9.10/"),
        ("http://localhost:5000/api", "ws://localhost:5000/"),
        ("http://LOCALHOST/api", "WS://LocalHost/"),
        ("http://[::1]:5000/api", "ws://[::1]:5000/"),
        ("https://discord.example/api", "wss://gateway.example/"),
    ],
)
def test_plain_http_and_ws_only_to_loopback(api_base: str, gateway_url: str) -> None:
    settings = load_settings(
        {"DISCORD_API_BASE": api_base, "DISCORD_GATEWAY_URL": gateway_url}, dotenv_path=None
    )
    assert settings.discord_api_base == api_base
    assert settings.discord_gateway_url == gateway_url


def test_missing_token_says_what_to_do() -> None:
    with pytest.raises(SettingsError, match="DISCORD_TOKEN is not set.*hermes-bot chat"):
        load_settings({}, dotenv_path=None).require_token()


def test_token_is_read_but_never_shown() -> None:
    settings = load_settings(
        {"DISCORD_TOKEN": f"  {TOKEN}  ", "DATABASE_URL": "postgresql+asyncpg://bot:pw-42@db/hermes"},
        dotenv_path=None,
    )
    assert settings.require_token() == TOKEN
    assert settings.discord_token is not None
    assert settings.discord_token.get_secret_value() == TOKEN
    for shown in (repr(settings), str(settings), f"{settings}", str(settings.model_dump())):
        assert TOKEN not in shown
    assert "pw-42" not in repr(settings)  # the database password is masked too
    assert settings.database_url == "postgresql+asyncpg://bot:pw-42@db/hermes"


def test_token_is_not_in_error_messages() -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({"DISCORD_TOKEN": TOKEN, "LOG_LEVEL": "verbose"}, dotenv_path=None)
    assert "LOG_LEVEL" in str(raised.value)
    assert TOKEN not in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__context__ is None

    bad_token = "Bot " + TOKEN  # pasted with a prefix: a bad token, and a secret still
    with pytest.raises(SettingsError, match="^DISCORD_TOKEN: expected") as raised:
        load_settings({"DISCORD_TOKEN": bad_token}, dotenv_path=None)
    assert TOKEN not in str(raised.value)

    with pytest.raises(SettingsError) as raised:  # pasted into the wrong variable
        load_settings({"DISCORD_TOKEN": TOKEN, "MODEL_REPO": "x", "N_CTX": TOKEN}, dotenv_path=None)
    assert "N_CTX=" in str(raised.value)
    assert TOKEN not in str(raised.value)


def test_the_openai_api_key_is_a_secret_too() -> None:
    key = "sk-" + "k3y" * 12
    settings = load_settings({"ENGINE": "openai", "OPENAI_BASE_URL": "http://gpu1:8000/v1/",
                              "OPENAI_API_KEY": key}, dotenv_path=None)
    assert settings.openai_api_key is not None and settings.openai_api_key.get_secret_value() == key
    assert settings.openai_base_url == "http://gpu1:8000/v1"
    for shown in (repr(settings), str(settings), str(settings.model_dump())):
        assert key not in shown
    with pytest.raises(SettingsError) as raised:  # pasted into the wrong variable
        load_settings({"OPENAI_API_KEY": key, "N_CTX": key}, dotenv_path=None)
    assert "N_CTX=" in str(raised.value) and key not in str(raised.value)


def test_metrics_address_defaults_to_loopback_and_off_switches_it_off() -> None:
    assert load_settings({}, dotenv_path=None).metrics_addr == "127.0.0.1:9464"
    assert load_settings({"METRICS_ADDR": ""}, dotenv_path=None).metrics_addr == "127.0.0.1:9464"  # blank: default
    assert load_settings({"METRICS_ADDR": " Off "}, dotenv_path=None).metrics_addr == ""
    assert load_settings({"METRICS_ADDR": ":9100"}, dotenv_path=None).metrics_addr == ":9100"


def test_settings_are_frozen() -> None:
    settings = load_settings({}, dotenv_path=None)
    with pytest.raises(ValueError):
        settings.n_ctx = 1  # type: ignore[misc]
    assert settings.n_ctx == 4096


def test_direct_construction_is_validated_and_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("N_CTX", "8192")
    assert Settings().n_ctx == 4096
    assert Settings(n_ctx=2048, max_new_tokens=64).n_ctx == 2048
    with pytest.raises(SettingsError, match="LOG_LEVEL='loud'"):
        Settings(log_level="loud")
    with pytest.raises(SettingsError, match="N_CTXX"):
        Settings(n_ctxx=2048)  # a misspelt keyword is refused, not ignored


def test_plain_sqlite_url_gets_the_async_driver() -> None:
    settings = load_settings({"DATABASE_URL": "sqlite:///x.db"}, dotenv_path=None)
    assert settings.database_url == "sqlite+aiosqlite:///x.db"


def test_python_m_bot_with_a_bad_log_level_exits_2_in_one_line(tmp_path: Path) -> None:
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO),
        "LOG_LEVEL": "verbose",
        "DISCORD_TOKEN": TOKEN,
    }
    result = subprocess.run(
        [sys.executable, "-m", "bot"],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: LOG_LEVEL='verbose': expected one of DEBUG, INFO")
    assert "Traceback" not in result.stderr
    assert TOKEN not in result.stderr


def test_remote_engine_needs_server_urls() -> None:
    with pytest.raises(SettingsError, match="ENGINE=remote needs LLAMA_SERVER_URLS"):
        load_settings({"ENGINE": "remote"}, dotenv_path=None)
    with pytest.raises(SettingsError, match="LLAMA_SERVER_URLS"):
        load_settings({"ENGINE": "remote", "LLAMA_SERVER_URLS": "gpu1:8080"}, dotenv_path=None)
    settings = load_settings({"ENGINE": "remote", "LLAMA_SERVER_URLS": "http://gpu1:8080/, http://gpu2:8080"},
                             dotenv_path=None)
    assert settings.llama_server_urls == ("http://gpu1:8080", "http://gpu2:8080")
