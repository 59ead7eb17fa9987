"""``hub.push=true``: upload the final adapter folder and its model card to the Hugging Face Hub.

:func:`check_hub` runs at the start of the run (a missing token fails in seconds, not after training);
:func:`push_adapter` runs at its end: ``create_repo(exist_ok=True)`` then ``upload_folder``. The endpoint is
``HF_ENDPOINT`` as set when the push runs (a private Hub or a mirror), else huggingface.co.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from fedllm_app.config import ConfigError

log = logging.getLogger("fedllm")


def check_hub(cfg: DictConfig) -> None:
    """With ``hub.push=true``, raise a ConfigError unless a Hugging Face token is available."""
    if not cfg.hub.push:
        return
    from huggingface_hub import get_token

    if get_token() is None:
        raise ConfigError(
            f"hub.push=true (hub.repo_id={cfg.hub.repo_id}) but no Hugging Face token was found; run "
            f"`hf auth login` or set HF_TOKEN, or set hub.push=false"
        )


def push_adapter(folder: Path, hub: DictConfig) -> str:
    """Create ``hub.repo_id`` if needed and upload ``folder`` to it; return the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        repo = api.create_repo(str(hub.repo_id), private=bool(hub.private), exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo.repo_id, folder_path=folder, commit_message=f"fedllm: {folder.parent.parent.name}"
        )
    except Exception as err:
        raise RuntimeError(
            f"pushing {folder} to the Hub as hub.repo_id={hub.repo_id} failed ({err}); the adapter and its card "
            f"are saved there: upload them later with `hf upload {hub.repo_id} {folder}`"
        ) from err
    log.info(f"pushed the final adapter and its model card to {repo} ({commit.commit_url})")
    return commit.commit_url
