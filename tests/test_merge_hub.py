"""Publishing merges to the Hugging Face Hub and downloading Hub bases (`worker.hub`).

No machine running the default suite can reach the Hub, so `hub` fakes it at the huggingface_hub
API boundary only: `HfApi.create_repo / create_branch / create_commit / snapshot_download` are
replaced by functions that record their arguments and answer with the library's own types
(`RepoUrl`, `CommitInfo`, a cache-shaped snapshot folder) and the library's own errors (built by
`hf_raise_for_status` from an HTTP response). `test_publish_to_the_live_hub` runs against the real
Hub when LORA_REG_TEST_HF_TOKEN and LORA_REG_TEST_HF_REPO are set.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import CommitInfo, CommitOperationAdd, RepoUrl
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from huggingface_hub.utils import filter_repo_objects, hf_raise_for_status

from registry.core.errors import InvalidBase, InvalidInput, InvalidTarget, NotPermitted, Unavailable
from registry.core.jobs import parse_target
from tests.support.merging import folder_bytes, merged_like_a_worker
from worker.hub import HubPublished, hub_snapshot, publish_to_hub

ENDPOINT = "https://hub.example.test"
SHA = "0123456789abcdef0123456789abcdef01234567"
# A typical base repository: what a merge needs, and what it must never download.
BASE_REPO_FILES = {
    "config.json": b'{"model_type": "llama"}',
    "generation_config.json": b"{}",
    "model-00001-of-00002.safetensors": b"shard one",
    "model-00002-of-00002.safetensors": b"shard two",
    "model.safetensors.index.json": b'{"weight_map": {}}',
    "tokenizer.json": b"{}",
    "tokenizer_config.json": b"{}",
    "special_tokens_map.json": b"{}",
    "tokenizer.model": b"sentencepiece",
    "merges.txt": b"a b",
    "vocab.json": b"{}",
    "qwen.tiktoken": b"tiktoken",
    "pytorch_model.bin": b"pickle",
    "pytorch_model-00001-of-00002.bin": b"pickle",
    "training_args.bin": b"pickle",
    "original/consolidated.00.pth": b"pickle",
    "model.pt": b"pickle",
    "optimizer.pkl": b"pickle",
    "flax_model.msgpack": b"flax",
    "tf_model.h5": b"keras",
    "model.ckpt": b"ckpt",
}
PICKLES_AND_OTHER_FORMATS = {
    name for name in BASE_REPO_FILES if not name.endswith((".json", ".safetensors"))
} - {"tokenizer.model", "merges.txt", "qwen.tiktoken"}


def hub_error(status: int, url: str, message: str = "refused") -> HfHubHTTPError:
    """The exception huggingface_hub itself raises for an HTTP `status` from the Hub."""
    response = httpx2.Response(
        status,
        request=httpx2.Request("POST", url),
        headers={"X-Error-Message": message},
    )
    try:
        hf_raise_for_status(response)
    except HfHubHTTPError as exc:
        return exc
    raise AssertionError(f"huggingface_hub accepted HTTP {status}")


@dataclass
class FakeHub:
    cache: Path
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # method name -> exception raised instead of answering
    failures: dict[str, Exception] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def call(self, name: str) -> dict[str, Any]:
        found = [kwargs for called, kwargs in self.calls if called == name]
        assert len(found) == 1, self.calls
        return found[0]


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeHub:
    """The Hub, faked at the huggingface_hub API boundary; HF_TOKEN and HF_ENDPOINT are set."""
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    monkeypatch.setenv("HF_ENDPOINT", ENDPOINT)
    fake = FakeHub(cache=tmp_path / "hf-cache")

    def record(name: str, api: huggingface_hub.HfApi, **kwargs: Any) -> None:
        fake.calls.append((name, {"endpoint": api.endpoint, "token": api.token, **kwargs}))
        if name in fake.failures:
            raise fake.failures[name]

    def create_repo(self: huggingface_hub.HfApi, repo_id: str, **kwargs: Any) -> RepoUrl:
        record("create_repo", self, repo_id=repo_id, **kwargs)
        return RepoUrl(f"{self.endpoint}/{repo_id}", endpoint=self.endpoint)

    def create_branch(self: huggingface_hub.HfApi, repo_id: str, **kwargs: Any) -> None:
        record("create_branch", self, repo_id=repo_id, **kwargs)

    def create_commit(
        self: huggingface_hub.HfApi,
        repo_id: str,
        operations: list[CommitOperationAdd],
        **kwargs: Any,
    ) -> CommitInfo:
        uploaded = {}
        for operation in operations:
            assert isinstance(operation, CommitOperationAdd)
            source = operation.path_or_fileobj
            assert isinstance(source, str | Path)
            uploaded[operation.path_in_repo] = Path(source).read_bytes()
        record("create_commit", self, repo_id=repo_id, files=uploaded, **kwargs)
        return CommitInfo(
            commit_url=f"{self.endpoint}/{repo_id}/commit/{SHA}",
            commit_message=kwargs["commit_message"],
            commit_description=kwargs.get("commit_description") or "",
            oid=SHA,
            _endpoint=self.endpoint,
        )

    def snapshot_download(self: huggingface_hub.HfApi, repo_id: str, **kwargs: Any) -> str:
        record("snapshot_download", self, repo_id=repo_id, **kwargs)
        # Like huggingface_hub: the requested files, filtered by the library's own pattern
        # matching, under <cache>/models--org--name/snapshots/<commit>.
        folder = fake.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / SHA
        for name in filter_repo_objects(
            BASE_REPO_FILES,
            allow_patterns=kwargs.get("allow_patterns"),
            ignore_patterns=kwargs.get("ignore_patterns"),
        ):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(BASE_REPO_FILES[name])
        return str(folder)

    for name, function in [
        ("create_repo", create_repo),
        ("create_branch", create_branch),
        ("create_commit", create_commit),
        ("snapshot_download", snapshot_download),
    ]:
        monkeypatch.setattr(huggingface_hub.HfApi, name, function)
    return fake


@pytest.fixture
def merged(tmp_path: Path) -> Path:
    """A small merged checkpoint folder, with one file in a subfolder."""
    folder = tmp_path / "merged"
    (folder / "nested").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model-00001-of-00002.safetensors").write_bytes(os.urandom(3000))
    (folder / "model-00002-of-00002.safetensors").write_bytes(os.urandom(1000))
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (folder / "README.md").write_text("# merged")
    (folder / "nested" / "tokenizer.model").write_bytes(b"sp")
    return folder


# --- targets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("org/repo", ("org/repo", None)),
        ("Org-1/my_model.v2", ("Org-1/my_model.v2", None)),
        ("org/repo@main", ("org/repo", "main")),
        ("org/repo@release/v1.2", ("org/repo", "release/v1.2")),
    ],
)
def test_hub_targets_parse_to_repo_and_branch(text: str, expected: tuple[str, str | None]) -> None:
    target = parse_target(f"hub:{text}")
    assert (target.kind, target.repo, target.branch) == ("hub", *expected)
    assert str(target) == f"hub:{text}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "repo",  # no owner
        "org/repo/extra",
        "/repo",
        "org/",
        "org/-repo",
        "org/repo.",
        "org/re--po",
        "org/re..po",
        "org/repo.git",
        "org/re po",
        "org/répo",
        f"org/{'x' * 97}",
        "org/repo@",
        "org/repo@-x",
        "org/repo@a..b",
        "org/repo@a//b",
        "org/repo@branch/",
        "org/repo@x.lock",
        "org/repo@a b",
        "org/repo@a@b",
        "hub:org/repo",
    ],
)
def test_bad_hub_targets_are_invalid_target(text: str) -> None:
    with pytest.raises(InvalidTarget, match="hub:org/repo or hub:org/repo@branch") as caught:
        parse_target(f"hub:{text}")
    assert caught.value.code == "invalid_target"


# --- publishing ---------------------------------------------------------------------------------


def test_publish_creates_a_private_repo_and_makes_one_commit_of_every_file(
    hub: FakeHub, merged: Path
) -> None:
    published = publish_to_hub(
        merged,
        "org/merged",
        commit_message="Merge LoRA adapter ns/a@3 into org/base",
        commit_description="Merged by lora-registry.",
    )
    assert hub.names() == ["create_repo", "create_commit"]  # no branch: the default one
    repo = hub.call("create_repo")
    assert repo["repo_id"] == "org/merged"
    assert repo["repo_type"] == "model"
    assert repo["private"] is True
    assert repo["exist_ok"] is True
    commit = hub.call("create_commit")
    assert commit["repo_id"] == "org/merged"
    assert commit["revision"] is None
    assert commit["commit_message"] == "Merge LoRA adapter ns/a@3 into org/base"
    assert commit["commit_description"] == "Merged by lora-registry."
    assert list(commit["files"]) == sorted(folder_bytes(merged))  # sorted posix paths
    assert commit["files"] == folder_bytes(merged)  # byte for byte
    assert "nested/tokenizer.model" in commit["files"]
    # HF_TOKEN and HF_ENDPOINT are honoured.
    assert {(c["endpoint"], c["token"]) for _, c in hub.calls} == {(ENDPOINT, "hf_from_env")}
    assert published == HubPublished(
        repo_id="org/merged",
        branch=None,
        commit_oid=SHA,
        commit_url=f"{ENDPOINT}/org/merged/commit/{SHA}",
        files=sorted(folder_bytes(merged)),
    )


def test_publish_to_a_branch_creates_it_then_commits_on_it(hub: FakeHub, merged: Path) -> None:
    published = publish_to_hub(
        merged,
        "org/merged",
        branch="merges/v1",
        private=False,
        commit_message="merge",
        token="hf_explicit",
    )
    assert hub.names() == ["create_repo", "create_branch", "create_commit"]
    assert hub.call("create_repo")["private"] is False
    branch = hub.call("create_branch")
    assert (branch["repo_id"], branch["branch"], branch["exist_ok"]) == (
        "org/merged",
        "merges/v1",
        True,
    )
    assert hub.call("create_commit")["revision"] == "merges/v1"
    assert published.branch == "merges/v1"
    # An explicit token wins over HF_TOKEN.
    assert {c["token"] for _, c in hub.calls} == {"hf_explicit"}


@pytest.mark.parametrize(("step", "status"), [("create_repo", 401), ("create_commit", 403)])
def test_publish_without_write_access_says_to_set_hf_token(
    hub: FakeHub, merged: Path, step: str, status: int
) -> None:
    hub.failures[step] = hub_error(status, f"{ENDPOINT}/api/{step}", "Invalid credentials")
    with pytest.raises(NotPermitted, match=f"HTTP {status}.*HF_TOKEN.*write access") as caught:
        publish_to_hub(merged, "org/merged", commit_message="merge")
    assert caught.value.code == "not_permitted"
    assert "org/merged" in caught.value.message
    assert hub.names()[-1] == step  # nothing was attempted after the refusal


@pytest.mark.parametrize(
    "failure",
    [
        httpx2.ConnectError("[Errno 111] Connection refused"),
        httpx2.ReadTimeout("timed out"),
        hub_error(502, f"{ENDPOINT}/api/models/org/merged/commit/main"),
        hub_error(429, f"{ENDPOINT}/api/models/org/merged/commit/main"),
    ],
    ids=["refused", "timeout", "502", "429"],
)
def test_publish_when_the_hub_is_unreachable_is_unavailable(
    hub: FakeHub, merged: Path, failure: Exception
) -> None:
    hub.failures["create_commit"] = failure
    with pytest.raises(Unavailable) as caught:
        publish_to_hub(merged, "org/merged", commit_message="merge")
    assert caught.value.code == "unavailable" and caught.value.exit_code == 7


def test_publish_refused_by_the_hub_for_another_reason_is_invalid_target(
    hub: FakeHub, merged: Path
) -> None:
    hub.failures["create_branch"] = hub_error(400, f"{ENDPOINT}/api/branch", "Invalid rev id")
    with pytest.raises(InvalidTarget, match="Invalid rev id"):
        publish_to_hub(merged, "org/merged", branch="x", commit_message="merge")
    assert "create_commit" not in hub.names()


def test_publish_refuses_an_empty_or_missing_folder(hub: FakeHub, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="no files"):
        publish_to_hub(tmp_path / "empty", "org/merged", commit_message="merge")
    with pytest.raises(InvalidInput, match="not a directory"):
        publish_to_hub(tmp_path / "missing", "org/merged", commit_message="merge")
    assert hub.calls == []


# --- base snapshots -----------------------------------------------------------------------------


def test_snapshot_downloads_weights_config_and_tokenizer_never_pickles(hub: FakeHub) -> None:
    folder, commit = hub_snapshot("org/base", "main")
    assert commit == SHA
    assert folder.name == SHA and folder.is_dir()
    call = hub.call("snapshot_download")
    assert (call["repo_id"], call["revision"], call["repo_type"]) == ("org/base", "main", "model")
    assert (call["endpoint"], call["token"]) == (ENDPOINT, "hf_from_env")
    downloaded = set(folder_bytes(folder))
    assert downloaded == set(BASE_REPO_FILES) - PICKLES_AND_OTHER_FORMATS
    assert not downloaded & PICKLES_AND_OTHER_FORMATS
    # The patterns alone (whatever fake serves them) can never select a pickle.
    selected = set(
        filter_repo_objects(
            PICKLES_AND_OTHER_FORMATS,
            allow_patterns=call["allow_patterns"],
            ignore_patterns=call["ignore_patterns"],
        )
    )
    assert selected == set()


def test_snapshot_of_the_default_branch_with_an_explicit_token(hub: FakeHub) -> None:
    hub_snapshot("org/base", None, token="hf_explicit")
    call = hub.call("snapshot_download")
    assert (call["revision"], call["token"]) == (None, "hf_explicit")


@pytest.mark.parametrize("status", [401, 403, 404])
def test_an_unreadable_base_is_invalid_base(hub: FakeHub, status: int) -> None:
    hub.failures["snapshot_download"] = hub_error(status, f"{ENDPOINT}/api/models/org/base")
    with pytest.raises(InvalidBase, match=f"org/base@v1 is not readable.*HTTP {status}.*HF_TOKEN"):
        hub_snapshot("org/base", "v1")


@pytest.mark.parametrize(
    "failure",
    [
        hub_error(503, f"{ENDPOINT}/api/models/org/base"),
        LocalEntryNotFoundError("cannot find the requested files in the local cache"),
        httpx2.ConnectError("[Errno 111] Connection refused"),
    ],
    ids=["503", "offline-cache-miss", "refused"],
)
def test_an_unreachable_hub_is_unavailable_for_snapshots(hub: FakeHub, failure: Exception) -> None:
    hub.failures["snapshot_download"] = failure
    with pytest.raises(Unavailable, match="org/base"):
        hub_snapshot("org/base", "main")


def test_a_malformed_base_id_is_invalid_base(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real snapshot_download (not faked here) validates the id before any request; the
    # endpoint is a closed local port in case it ever did not.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(InvalidBase, match="not a Hugging Face repository id"):
        hub_snapshot("org/re..po", "main")


# --- the real Hub (opt-in) ----------------------------------------------------------------------


def tiny_safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, 2.0)


@pytest.mark.live_hf
def test_publish_to_the_live_hub(tmp_path: Path) -> None:
    token = os.environ.get("LORA_REG_TEST_HF_TOKEN")
    repo = os.environ.get("LORA_REG_TEST_HF_REPO")
    if not token:
        pytest.skip("set LORA_REG_TEST_HF_TOKEN to run against the real Hugging Face Hub")
    if not repo:
        pytest.skip("set LORA_REG_TEST_HF_REPO to a repository the token may write (org/name)")
    folder = tmp_path / "merged"
    folder.mkdir()
    nonce = uuid.uuid4().hex  # new content, so the Hub makes a new commit
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "nonce": nonce}))
    (folder / "model.safetensors").write_bytes(tiny_safetensors())
    published = publish_to_hub(
        folder, repo, commit_message=f"lora-registry live test {nonce}", token=token
    )
    assert published.files == ["config.json", "model.safetensors"]
    assert len(published.commit_oid) == 40
    api = huggingface_hub.HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token)
    listed = set(api.list_repo_files(repo, revision=published.commit_oid))
    assert set(published.files) <= listed
    for name in published.files:
        path = api.hf_hub_download(
            repo, name, revision=published.commit_oid, cache_dir=tmp_path / "cache"
        )
        assert Path(path).read_bytes() == (folder / name).read_bytes()


def test_a_merge_job_published_to_the_hub_is_one_private_commit_of_the_merged_folder(
    hub: FakeHub,
    tmp_path: Path,
    pg_database: Any,
    adapter_dir: Any,
    base_dir: Any,
) -> None:
    """A real server and an in-process worker; only the Hub is fake (at its API boundary)."""
    import json

    from cli.client import Registry
    from tests.conftest import server_environment, start_server, stop_server, unique_name
    from worker.runner import Worker

    env, _ = server_environment("sqlite-folder", tmp_path, None, pg_database)
    server = start_server(tmp_path, env, "sqlite-folder")
    try:
        base, adapter = base_dir("llama"), adapter_dir("llama", seed=7)
        name = unique_name()
        assert (
            server.cli("base", "add", "org/tiny", "--from", str(base), "--upload").returncode == 0
        )
        pushed = server.cli("push", str(adapter), name, "--base", "org/tiny", "--json")
        assert pushed.returncode == 0, pushed.stderr
        digest = json.loads(pushed.stdout)["version"]["digest"]
        with Registry(server.url, cache_dir=tmp_path / "worker-cache") as client:
            job = client.request_merge(f"{name}@1", target="hub:acme/tiny-merged@release")
            worker = Worker(client, name="hub-worker", work_dir=tmp_path / "work")
            assert worker.run_once()
            done = client.job(job.id)
        assert done.status == "succeeded", done.error
        assert done.result is not None and done.result.location.endswith(f"/commit/{SHA}")
    finally:
        stop_server(server.process)

    assert hub.names() == ["create_repo", "create_branch", "create_commit"]
    assert hub.call("create_repo")["repo_id"] == "acme/tiny-merged"
    assert hub.call("create_repo")["private"] is True
    commit = hub.call("create_commit")
    assert commit["revision"] == "release"
    assert name in commit["commit_message"] and "org/tiny" in commit["commit_message"]
    assert commit["files"] == merged_like_a_worker(
        adapter, base, tmp_path / "local", ref=f"{name}@1", digest=digest, base_id="org/tiny"
    )
