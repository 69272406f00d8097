"""Push a local hf-arch checkpoint directory to the Hugging Face Hub."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

NO_TOKEN_MESSAGE = "no Hugging Face token: pass --token or set HF_TOKEN / run `hf auth login`"

# Never uploaded: temporary / partial files (ours and other writers'), training checkpoints, caches.
PUSH_IGNORE_PATTERNS = [
    "*.tmp",
    "*.temp",
    "*.partial",
    "*.incomplete",
    "*.lock",
    "*.partial-*",
    "*/.*.partial-*",
    ".*.partial-*",
    ".README.md.*",
    "checkpoint-*",
    "checkpoint-*/*",
    "checkpoints",
    "checkpoints/*",
    "*/checkpoints/*",
    "__pycache__/*",
    "*/__pycache__/*",
    "*.pyc",
    ".DS_Store",
]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class HubPushError(RuntimeError):
    """A push that cannot start (no token, offline mode) or an incomplete checkpoint."""


def check_checkpoint(model_dir: str | os.PathLike) -> Path:
    """Raise a clear error unless ``model_dir`` holds config.json and complete weights (single file or all shards)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {path} does not exist (or is not a directory)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint: {path / 'config.json'} is missing")
    if any((path / name).is_file() for name in _WEIGHT_FILES):
        return path
    for index_name in _WEIGHT_INDEXES:
        index = path / index_name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (ValueError, KeyError) as error:
                raise HubPushError(f"{index} is not a valid weight index: {error}") from error
            missing = sorted(s for s in shards if not (path / s).is_file())
            if missing:
                raise HubPushError(f"{path} is not a complete checkpoint: shard(s) {missing} listed in {index_name} are missing")
            return path
    raise FileNotFoundError(
        f"{path} is not a complete checkpoint: no weights found "
        f"(expected one of {', '.join(_WEIGHT_FILES + _WEIGHT_INDEXES)})"
    )


def resolve_token(token: str | None = None) -> str:
    """``token`` argument > HF_TOKEN env > the token stored by ``hf auth login``; raise when there is none."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    stored = get_token()
    if not stored:
        raise HubPushError(NO_TOKEN_MESSAGE)
    return stored


def _endpoint() -> str:
    """HF_ENDPOINT as set now (huggingface_hub only reads it at import), else huggingface_hub's own default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def push_to_hub(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
    """Upload the checkpoint in ``model_dir`` to the model repo ``repo_id``; returns the commit URL.

    Checks the checkpoint and the token before any network call, creates the repo if needed (``exist_ok``), writes a
    model card (README.md) when the directory has none, and uploads the folder minus temporary files and checkpoints.
    """
    from huggingface_hub import HfApi, constants

    path = check_checkpoint(model_dir)
    token = resolve_token(token)
    if constants.is_offline_mode():
        raise HubPushError("Hugging Face Hub offline mode is on (HF_HUB_OFFLINE=1): unset it to push")

    if not (path / "README.md").exists():
        from hf_arch.model_cards.card import write_model_card

        write_model_card(path, repo_id=repo_id)
        logger.info("Wrote a model card to %s", path / "README.md")

    api = HfApi(endpoint=_endpoint(), library_name="hf-arch")
    repo_url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    repo_id = repo_url.repo_id or repo_id
    if revision and revision != constants.DEFAULT_REVISION:
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=path,
        repo_type="model",
        token=token,
        revision=revision,
        commit_message=commit_message or f"Upload {path.name} with hf-arch",
        ignore_patterns=list(PUSH_IGNORE_PATTERNS),
    )
    url = getattr(commit, "commit_url", None) or getattr(commit, "oid", None) or str(commit)
    logger.info("Pushed %s to %s: %s", path, repo_id, url)
    return url
