"""Find a checkpoint: a local folder, or a Hugging Face hub id fetched with huggingface_hub.

huggingface_hub honours HF_TOKEN, HF_HOME and HF_HUB_OFFLINE itself; this module only turns its
exceptions into one-line messages a user can act on.
"""

from __future__ import annotations

import re
from pathlib import Path

from r7b.errors import R7BError

CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not Path(source).exists()


def resolve_checkpoint(source: str, *, revision: str | None = None) -> Path:
    """Return a local folder holding the checkpoint, downloading it first if `source` is a hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise R7BError(f"{source} is a file; expected a checkpoint folder or a hub id like CohereLabs/c4ai-command-r7b-12-2024")
    if not is_hub_id(source):
        raise R7BError(f"no such folder, and not a hub id: {source}")
    return download(source, revision=revision)


def download(repo_id: str, *, revision: str | None = None) -> Path:
    """snapshot_download with progress bars; offline mode uses the local cache only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_FILES))
    except hf_errors.GatedRepoError:
        raise R7BError(f"{repo_id} is gated: accept its licence on the hub, then set HF_TOKEN") from None
    except hf_errors.RepositoryNotFoundError:
        raise R7BError(f"{repo_id} not found on the hub (or it is private: set HF_TOKEN)") from None
    except hf_errors.RevisionNotFoundError:
        raise R7BError(f"revision {revision!r} not found in {repo_id}") from None
    except hf_errors.LocalEntryNotFoundError:
        raise R7BError(
            f"{repo_id} is not in the local cache and the hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1): download it once with internet, or pass a local folder"
        ) from None
    except hf_errors.HfHubHTTPError as exc:
        raise R7BError(f"hub error for {repo_id}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise R7BError(f"cannot download {repo_id}: {exc}") from None
