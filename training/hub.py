"""Optional upload of the adapter or the GGUF files to the Hugging Face hub."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def upload(paths: list[Path], repo: str, private: bool = True) -> str:
    """Create `repo` if needed and upload files / folders to it; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo, private=private, exist_ok=True)
    for path in paths:
        if path.is_dir():
            api.upload_folder(repo_id=repo, folder_path=path, path_in_repo=path.name)
        else:
            api.upload_file(repo_id=repo, path_or_fileobj=path, path_in_repo=path.name)
        log.info("uploaded %s to %s", path, repo)
    return str(url)
