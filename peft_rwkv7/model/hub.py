"""Model references: a local path, or hf://OWNER/REPO/FILE.pth fetched once through huggingface_hub."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

HF_PREFIX = "hf://"


def resolve_model_path(ref: str, cache_dir: str | None = None) -> Path:
    """Local file for `ref`. hf:// references are looked up in the Hugging Face cache first (works
    offline), downloaded with a progress bar otherwise; `cache_dir` overrides the hub's cache folder."""
    if not ref.startswith(HF_PREFIX):
        return Path(ref)
    parts = ref[len(HF_PREFIX):].split("/")
    if len(parts) < 3 or not all(parts):
        raise UserError(f"{ref}: expected hf://OWNER/REPO/FILE.pth")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir))
    except LocalEntryNotFoundError:  # raised when the hub cannot be reached at all
        raise UserError(f"{ref}: not in the local cache and the hub cannot be reached (offline?)") from None
    except (RepositoryNotFoundError, EntryNotFoundError):
        raise UserError(f"{ref}: no such file on the Hugging Face hub") from None
    except Exception as e:  # network down, proxy, ...: say so in one line
        raise UserError(f"{ref}: not in the local cache and the download failed ({type(e).__name__})") from None
