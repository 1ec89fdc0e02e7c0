"""The Hugging Face Hub as a merge target and as a source of base checkpoints.

`publish_to_hub` puts a finished merge folder on the Hub as ONE commit (huggingface_hub uploads
the large files first, then the commit lands atomically, so a failure leaves no partial commit);
`hub_snapshot` downloads a base checkpoint's safetensors, config and tokenizer files through the
huggingface_hub cache, never pickle or other weight formats. Both honour HF_TOKEN and HF_ENDPOINT
like `cli.bases.hub_signature`, and translate the library's errors into `registry.core.errors`
here, once. Called by the merge worker (`worker.targets`, `worker.runner`); no server imports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, HFValidationError

from cli.bases import hub_network_errors, hub_read_errors
from registry.core.errors import (
    InvalidInput,
    InvalidTarget,
    NotPermitted,
    RegistryError,
    Unavailable,
)

# What a merge needs from a base repository: weights, configs (config.json, the shard index,
# generation_config.json, tokenizer JSONs) and tokenizer files (sentencepiece, merges/vocab,
# tiktoken). Pickled or other-format weights are never fetched: loading a pickle runs code.
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
NEVER_DOWNLOADED = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.msgpack", "*.h5"]


@dataclass
class HubPublished:
    repo_id: str
    branch: str | None  # None: the repository's default branch
    commit_oid: str
    commit_url: str
    files: list[str]  # relative posix paths, sorted


def publish_to_hub(
    folder: Path,
    repo_id: str,
    *,
    branch: str | None = None,
    private: bool = True,
    commit_message: str,
    commit_description: str | None = None,
    token: str | None = None,
) -> HubPublished:
    """Publish every file of `folder` to the model repository `repo_id` as one commit.

    The repository is created when missing (private unless `private=False`; an existing one keeps
    its visibility) and so is `branch`. Publishing identical files again makes no new commit: the
    result names the branch's current commit.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInput(f"{folder} is not a directory")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    if not files:
        raise InvalidInput(f"{folder} has no files to publish")
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=folder / p) for p in files]
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token or os.environ.get("HF_TOKEN"))
    where = f"{repo_id}@{branch}" if branch else repo_id
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if branch:
            api.create_branch(repo_id, branch=branch, repo_type="model", exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message,
            commit_description=commit_description,
            repo_type="model",
            revision=branch,
        )
    except HFValidationError as exc:
        raise InvalidTarget(f"{repo_id!r} is not a Hugging Face repository id: {exc}") from exc
    except HfHubHTTPError as exc:
        raise _publish_error(exc, where) from exc
    except hub_network_errors() as exc:
        raise Unavailable(f"cannot reach the Hugging Face Hub to publish {where}: {exc}") from exc
    return HubPublished(repo_id, branch, info.oid, info.commit_url, files)


def _publish_error(exc: HfHubHTTPError, where: str) -> RegistryError:
    status = exc.response.status_code if exc.response is not None else None
    if status in (401, 403):
        return NotPermitted(
            f"the Hugging Face Hub refused to publish {where} (HTTP {status}): set HF_TOKEN to a "
            "token with write access to that repository (or its organisation)"
        )
    if status is not None and 400 <= status < 500 and status != 429:
        return InvalidTarget(f"the Hugging Face Hub refused to publish {where}: {exc}")
    return Unavailable(f"the Hugging Face Hub failed to publish {where}: {exc}")


def hub_snapshot(
    repo_id: str, revision: str | None, *, token: str | None = None
) -> tuple[Path, str]:
    """(local folder, resolved commit sha) of a base checkpoint, downloaded through the
    huggingface_hub cache (files already there are not fetched again).

    Only `SNAPSHOT_PATTERNS` are downloaded; never pickles or other weight formats.
    """
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token or os.environ.get("HF_TOKEN"))
    with hub_read_errors(repo_id, revision):
        folder = api.snapshot_download(
            repo_id,
            repo_type="model",
            revision=revision,
            allow_patterns=SNAPSHOT_PATTERNS,
            ignore_patterns=NEVER_DOWNLOADED,
        )
    # The cache keeps each snapshot in a folder named after its commit (snapshots/<sha>).
    path = Path(folder)
    return path, path.name
