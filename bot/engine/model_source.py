"""Where a model comes from: a local .gguf, a file under MODELS_DIR, or the Hugging Face hub.

Downloads go through huggingface_hub into its cache (with its progress bar), so a model
fetched once is found again offline. `/reload-model` names are resolved here, and only
files under MODELS_DIR or hub files are accepted: no other path on the machine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

from bot.engine.base import ModelLoadError
from bot.core.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubFile:
    repo: str
    filename: str

    def __str__(self) -> str:
        return f"{self.repo}/{self.filename}"


def download(source: HubFile, cache_dir: Path | None = None) -> Path:
    """The local path of a hub file, downloading it into the cache if needed."""
    log.info("fetching %s from the Hugging Face hub (cached after the first time)", source)
    try:
        return Path(hf_hub_download(source.repo, source.filename, cache_dir=cache_dir))
    except LocalEntryNotFoundError as error:
        raise ModelLoadError(
            f"{source} is not in the local cache and the hub cannot be reached ({error}); "
            "download it on a connected machine, or set MODEL_PATH to a local .gguf"
        ) from error
    except (RepositoryNotFoundError, EntryNotFoundError) as error:
        raise ModelLoadError(f"{source} does not exist on the hub: {error}") from error


def check_hub_source(source: HubFile, allowed_repos: frozenset[str], max_bytes: int) -> None:
    """Refuse a hub file outside HUB_ALLOWED_REPOS or larger than MAX_DOWNLOAD_GB, before
    anything is downloaded (`/reload-model` names come from people in Discord)."""
    if source.repo not in allowed_repos:
        raise ModelLoadError(
            f"{source.repo} is not in HUB_ALLOWED_REPOS ({', '.join(sorted(allowed_repos)) or 'empty'}); "
            "the bot's host can add it there"
        )
    try:
        size = get_hf_file_metadata(hf_hub_url(source.repo, source.filename)).size
    except Exception as error:  # offline, or the hub unreachable: only the cache can serve it
        log.info("cannot ask the hub for the size of %s (%s); the local cache decides", source, error)
        return
    if size is not None and size > max_bytes:
        raise ModelLoadError(f"{source} is {size / 1e9:.1f} GB, more than MAX_DOWNLOAD_GB={max_bytes / 1e9:g}")


def configured_model(settings: Settings) -> Path:
    """The model the settings name: MODEL_PATH, else MODEL_REPO/MODEL_FILE from the hub."""
    if settings.model_path is not None:
        return settings.model_path
    return download(HubFile(settings.model_repo, settings.model_file))


def parse_reload_target(name: str, models_dir: Path) -> Path | HubFile:
    """What an admin asked `/reload-model` to load.

    A name that exists under MODELS_DIR is that local file; `owner/repo/file.gguf` is a
    hub file. Absolute paths, `..` and anything resolving outside MODELS_DIR are refused.
    """
    name = name.strip()
    if not name.lower().endswith(".gguf"):
        raise ModelLoadError(f"{name!r}: expected a .gguf file name")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or Path(name).is_absolute():
        raise ModelLoadError(f"{name!r}: only files under MODELS_DIR can be loaded")
    root = models_dir.resolve()
    candidate = (root / pure).resolve()
    if candidate.is_relative_to(root) and candidate.is_file():
        return candidate
    if not candidate.is_relative_to(root):
        raise ModelLoadError(f"{name!r}: only files under MODELS_DIR can be loaded")
    if len(pure.parts) >= 3:
        return HubFile("/".join(pure.parts[:2]), "/".join(pure.parts[2:]))
    raise ModelLoadError(
        f"{name!r} is not a file under MODELS_DIR ({models_dir}) nor a hub file written as "
        "owner/repo/file.gguf"
    )


def available_models(models_dir: Path, limit: int = 25) -> list[str]:
    """The .gguf files under MODELS_DIR, as names `/reload-model` accepts."""
    if not models_dir.is_dir():
        return []
    names = sorted(str(p.relative_to(models_dir).as_posix()) for p in models_dir.rglob("*.gguf"))
    return names[:limit]
