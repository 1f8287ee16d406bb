"""Model sources: the real huggingface_hub download path against a local cache, and the
names /reload-model accepts (no path outside MODELS_DIR)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.engine.base import ModelLoadError
from bot.engine.model_source import HubFile, available_models, configured_model, download, parse_reload_target
from bot.core.settings import load_settings

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_hub_cache(cache: Path, repo: str, filename: str, content: bytes) -> Path:
    """Lay out a file exactly as huggingface_hub stores it after a download."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT / filename
    snapshot.parent.mkdir(parents=True)
    snapshot.write_bytes(content)
    return snapshot


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """These machines cannot reach the hub: run huggingface_hub in its offline mode."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_download_finds_a_cached_file_offline(tmp_path: Path) -> None:
    expected = fill_hub_cache(tmp_path, "org/model-GGUF", "m.Q4_K_M.gguf", b"GGUF....")
    path = download(HubFile("org/model-GGUF", "m.Q4_K_M.gguf"), cache_dir=tmp_path)
    assert path == expected and path.read_bytes() == b"GGUF...."


def test_configured_model_uses_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    settings = load_settings({"MODEL_REPO": "org/r", "MODEL_FILE": "x.gguf"}, dotenv_path=None)
    expected = fill_hub_cache(tmp_path, "org/r", "x.gguf", b"GGUF")
    assert configured_model(settings) == expected


def test_missing_from_cache_offline_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not in the local cache.*set MODEL_PATH"):
        download(HubFile("org/absent", "a.gguf"), cache_dir=tmp_path)


def test_model_path_wins(tmp_path: Path) -> None:
    settings = load_settings({"MODEL_PATH": str(tmp_path / "m.gguf")}, dotenv_path=None)
    assert configured_model(settings) == tmp_path / "m.gguf"


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "sub").mkdir(parents=True)
    (root / "a.gguf").write_bytes(b"GGUF")
    (root / "sub" / "b.gguf").write_bytes(b"GGUF")
    (tmp_path / "secret.gguf").write_bytes(b"GGUF")
    (root / "link.gguf").symlink_to(tmp_path / "secret.gguf")
    return root


def test_reload_targets_inside_models_dir(models_dir: Path) -> None:
    assert parse_reload_target("a.gguf", models_dir) == (models_dir / "a.gguf").resolve()
    assert parse_reload_target("sub/b.gguf", models_dir) == (models_dir / "sub" / "b.gguf").resolve()
    assert parse_reload_target("TheBloke/X-GGUF/x.Q4_K_M.gguf", models_dir) == HubFile(
        "TheBloke/X-GGUF", "x.Q4_K_M.gguf"
    )
    assert available_models(models_dir) == ["a.gguf", "link.gguf", "sub/b.gguf"]


@pytest.mark.parametrize(
    "name",
    ["../secret.gguf", "sub/../../secret.gguf", "/etc/passwd.gguf", "link.gguf", "..\\secret.gguf"],
)
def test_path_traversal_is_refused(models_dir: Path, name: str) -> None:
    with pytest.raises(ModelLoadError, match="only files under MODELS_DIR"):
        parse_reload_target(name, models_dir)


@pytest.mark.parametrize(("name", "message"), [("notes.txt", "expected a .gguf"), ("c.gguf", "is not a file")])
def test_other_bad_names(models_dir: Path, name: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        parse_reload_target(name, models_dir)


def test_hub_reloads_only_from_allowed_repositories() -> None:
    from bot.engine.model_source import check_hub_source

    with pytest.raises(ModelLoadError, match="not in HUB_ALLOWED_REPOS"):
        check_hub_source(HubFile("stranger/evil", "x.gguf"), frozenset({"TheBloke/good"}), 10**12)
    check_hub_source(HubFile("TheBloke/good", "x.gguf"), frozenset({"TheBloke/good"}), 10**12)  # offline: cache decides


def test_hub_file_larger_than_the_cap_is_refused_before_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real huggingface_hub asks a local stand-in of the hub for the file's size."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import huggingface_hub.constants

    from bot.engine.model_source import check_hub_source

    class Hub(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", '"abc"')
            self.send_header("Content-Length", str(50 * 10**9))
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    endpoint = f"http://127.0.0.1:{server.server_port}"  # as HF_ENDPOINT would set them
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    try:
        with pytest.raises(ModelLoadError, match="50.0 GB, more than MAX_DOWNLOAD_GB=10"):
            check_hub_source(HubFile("TheBloke/good", "big.gguf"), frozenset({"TheBloke/good"}), 10 * 10**9)
        check_hub_source(HubFile("TheBloke/good", "big.gguf"), frozenset({"TheBloke/good"}), 100 * 10**9)
    finally:
        server.shutdown()
