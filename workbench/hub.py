"""Upload an export folder to a Hugging Face hub model repo; the token is used and forgotten."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from workbench.saving import MARKER, ExportError

log = logging.getLogger(__name__)

CARD_FILE = "README.md"  # the model card the hub shows
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise ExportError(f"hub repo id {repo_id!r} is not valid; use 'owner/name'")
    return repo_id


def push_to_hub(folder: str | Path, repo_id: str, token: str, private: bool = True,
                commit_message: str = "Upload pruned model (prune-workbench)") -> str:
    """Upload an export folder to a hub model repo (created private unless told); returns its URL.

    The token is used for these calls only: never logged, never written to disk, and scrubbed
    from any error message.
    """
    check_repo_id(repo_id)
    if not token:
        raise ExportError("pushing to the hub needs a token with write access")
    folder = Path(folder)
    if not (folder / CARD_FILE).is_file():
        raise ExportError(f"{folder} is not an export folder (no {CARD_FILE}); export first")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=commit_message, ignore_patterns=[MARKER])
    except Exception as error:  # network, auth, quota: one clear message, token scrubbed
        text = str(error).replace(token, "***")
        raise ExportError(f"pushing {folder.name} to {repo_id} failed ({type(error).__name__}: "
                          f"{text}). Check that the token has write access and the hub is "
                          "reachable") from None
    log.info("pushed %s to the hub repo %s (private=%s)", folder.name, repo_id, private)
    return f"https://huggingface.co/{repo_id}"


__all__ = ["CARD_FILE", "check_repo_id", "push_to_hub"]
