from pathlib import Path

import pytest

from bot.settings import DEFAULT_MODEL_FILE, SettingsError, load_settings


def test_defaults_without_env() -> None:
    settings = load_settings({}, dotenv_path=None)
    assert settings.n_ctx == 4096
    assert settings.n_gpu_layers == -1
    assert settings.model_path is None
    assert settings.model_file == DEFAULT_MODEL_FILE
    assert settings.database_url.startswith("sqlite+aiosqlite:///data/")


def test_dotenv_read_and_environment_overrides(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("N_CTX=2048\nTEMPERATURE=0.2\nADMIN_USER_IDS=1, 22 ,333\n")
    settings = load_settings({"N_CTX": "8192"}, dotenv_path=env_file)
    assert settings.n_ctx == 8192
    assert settings.temperature == 0.2
    assert settings.admin_user_ids == {1, 22, 333}


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("N_CTX", "lots", "N_CTX='lots': expected an integer"),
        ("TOP_P", "1.5", "TOP_P=1.5: expected a number between 0.0 and 1.0"),
        ("ADMIN_USER_IDS", "12,bob", "'bob' is not a Discord user id"),
        ("MODEL_PATH", "model.bin", "expected a path to a .gguf file"),
        ("DISCORD_API_BASE", "localhost:80", "expected a URL starting with http or https://"),
        ("DATABASE_URL", "hermes.db", "expected an SQLAlchemy async URL"),
        ("MAX_NEW_TOKENS", "3000", "less than half of N_CTX=4096"),
        ("ENGINE", "vllm", "expected 'batched' or 'simple'"),
        ("N_PARALLEL", "-2", "expected an integer >= 0"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        load_settings({name: value}, dotenv_path=None)


def test_missing_token_says_what_to_do() -> None:
    with pytest.raises(SettingsError, match="DISCORD_TOKEN is not set.*hermes-bot chat"):
        load_settings({}, dotenv_path=None).require_token()


def test_plain_sqlite_url_gets_the_async_driver() -> None:
    settings = load_settings({"DATABASE_URL": "sqlite:///x.db"}, dotenv_path=None)
    assert settings.database_url == "sqlite+aiosqlite:///x.db"
