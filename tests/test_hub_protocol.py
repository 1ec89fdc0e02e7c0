"""The Hugging Face protocol under /hf/ (docs/architecture.md §14), through the real clients.

huggingface_hub (`snapshot_download`, `hf_hub_download`, `HfApi`, the `hf download` CLI),
transformers and PEFT talk to a real `lora-reg server` (SQLite + folder store, and PostgreSQL +
SeaweedFS, where files redirect to presigned URLs). Nothing is faked: a header the clients do not
accept makes them raise, so these tests fail when one is wrong. PEFT and transformers run in a
subprocess with HF_ENDPOINT set, as a user runs them; in-process calls pass `endpoint=`
(huggingface_hub reads HF_ENDPOINT once, at import).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from huggingface_hub import (
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get

from cli.client import Registry
from registry.core.errors import NotAuthenticated, NotFound
from registry.core.jobs import JobResult
from registry.core.manifest import FileEntry, manifest_digest
from registry.core.schemas import FileSpec, VersionOut
from registry.hub.protocol import (
    TREE_PAGE,
    HubFile,
    Snapshot,
    commit_id,
    hub_error,
    page,
    tree,
)
from tests.conftest import BACKENDS, RunningServer, own_server, unique, unique_name
from tests.support.merging import merged_like_a_worker

MODEL_FILES = ("README.md", "adapter_config.json", "adapter_model.safetensors")


def endpoint(server: RunningServer) -> str:
    return f"{server.url}/hf"


def files_of(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under `folder` (symlinks followed), leaving out the
    metadata huggingface_hub keeps in a local_dir (`.cache/`)."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and ".cache" not in path.relative_to(folder).parts
    }


@dataclass
class Published:
    """An adapter with two versions: @1 is `production`, @2 the newest (`main`)."""

    name: str
    first: VersionOut
    second: VersionOut


@pytest.fixture
def published(client: Registry, adapter_dir: Callable[..., Path]) -> Published:
    name = unique_name()
    first = client.push(adapter_dir("llama", seed=0), name, alias="production").version
    second = client.push(adapter_dir("llama", seed=1), name).version
    return Published(name, first, second)


def pulled(server: RunningServer, ref: str, out: Path) -> dict[str, bytes]:
    """What `lora-reg pull REF` writes, as a user runs it."""
    result = server.cli("pull", ref, "-o", str(out))
    assert result.returncode == 0, result.stderr
    return files_of(out)


def download(
    server: RunningServer,
    repo: str,
    cache: Path,
    *,
    revision: str | None = None,
    token: str | bool = False,
) -> Path:
    """`snapshot_download` into the cache `cache`: the snapshot folder."""
    return Path(
        snapshot_download(
            repo, revision=revision, endpoint=endpoint(server), cache_dir=cache, token=token
        )
    )


def download_file(
    server: RunningServer,
    repo: str,
    filename: str,
    cache: Path,
    *,
    revision: str | None = None,
    token: str | bool = False,
) -> Path:
    """`hf_hub_download` of one file into the cache `cache`."""
    return Path(
        hf_hub_download(
            repo,
            filename,
            revision=revision,
            endpoint=endpoint(server),
            cache_dir=cache,
            token=token,
        )
    )


# --- pure wire rules ---------------------------------------------------------------------------


def test_a_commit_id_is_40_hex_derived_from_the_digest_alone() -> None:
    digest = "sha256:" + "ab" * 32
    expected = hashlib.sha256(f"lora-registry version {digest}".encode()).hexdigest()[:40]
    assert commit_id(digest) == expected
    assert commit_id("sha256:" + "cd" * 32) != expected


def _snapshot(paths: list[str]) -> Snapshot:
    now = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    files = tuple(HubFile(path, 10, hashlib.sha256(path.encode()).hexdigest()) for path in paths)
    return Snapshot("ns/name", "adapter", "0" * 40, "ns/name@1", files, now, now, "peft", (), {})


def test_tree_lists_direct_children_or_everything_below_a_folder() -> None:
    found = _snapshot(["a.json", "sub/b.bin", "sub/deep/c.bin", "other/d.bin"])
    top = {(e["type"], e["path"]) for e in tree(found, "", recursive=False, expand=False)}
    assert top == {("file", "a.json"), ("directory", "sub"), ("directory", "other")}
    below = {(e["type"], e["path"]) for e in tree(found, "sub", recursive=True, expand=False)}
    assert below == {("file", "sub/b.bin"), ("directory", "sub/deep"), ("file", "sub/deep/c.bin")}
    with pytest.raises(NotFound):  # EntryNotFound on the wire
        tree(found, "nowhere", recursive=False, expand=False)


def test_listings_come_in_pages_linked_by_a_cursor() -> None:
    entries = [{"path": str(i)} for i in range(TREE_PAGE + 5)]
    first, cursor = page(entries, None)
    assert len(first) == TREE_PAGE and cursor == TREE_PAGE
    rest, end = page(entries, str(cursor))
    assert [e["path"] for e in rest] == [str(i) for i in range(TREE_PAGE, TREE_PAGE + 5)]
    assert end is None


def test_a_refused_token_is_answered_in_the_hubs_own_words() -> None:
    missing = hub_error(NotAuthenticated("no"), credential_sent=False)
    wrong = hub_error(NotAuthenticated("unknown token"), credential_sent=True)
    assert missing.status == wrong.status == 401
    assert missing.headers["X-Error-Code"] == "GatedRepo"
    assert "X-Error-Code" not in wrong.headers
    assert wrong.headers["X-Error-Message"] == "Invalid credentials in Authorization header"


# --- downloads ---------------------------------------------------------------------------------


def test_snapshot_download_of_an_alias_holds_the_bytes_lora_reg_pull_writes(
    server: RunningServer, published: Published, tmp_path: Path
) -> None:
    expected = pulled(server, f"{published.name}@production", tmp_path / "pulled")
    snapshot = download(server, published.name, tmp_path / "hf", revision="production")
    assert files_of(snapshot) == expected
    assert snapshot.name == commit_id(published.first.digest)
    ref = tmp_path / "hf" / f"models--{published.name.replace('/', '--')}" / "refs" / "production"
    assert ref.read_text() == commit_id(published.first.digest)
    verified = HfApi(endpoint=endpoint(server), token=False).verify_repo_checksums(
        published.name, revision="production", cache_dir=tmp_path / "hf"
    )
    assert verified.checked_count == len(expected) and not verified.mismatches


@pytest.mark.parametrize("revision", ["main", "2", "digest", "commit"])
def test_every_kind_of_revision_names_its_version(
    server: RunningServer, published: Published, tmp_path: Path, revision: str
) -> None:
    second = published.second
    name = {"digest": second.digest, "commit": commit_id(second.digest)}.get(revision, revision)
    snapshot = download(server, published.name, tmp_path / "hf", revision=name)
    assert snapshot.name == commit_id(second.digest)
    assert files_of(snapshot) == pulled(server, f"{published.name}@2", tmp_path / "pulled")


def test_model_info_gives_the_commit_files_sizes_and_card_data(
    server: RunningServer, published: Published
) -> None:
    api = HfApi(endpoint=endpoint(server), token=False)
    info = api.model_info(published.name, revision="production", files_metadata=True)
    first = published.first
    assert info.id == published.name and info.sha == commit_id(first.digest)
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert sorted(siblings) == sorted(f.path for f in first.files or [])
    for file in first.files or []:
        sibling = siblings[file.path]
        assert sibling.size == file.size
        assert sibling.lfs is not None and sibling.lfs.sha256 == file.sha256
    assert info.last_modified is not None
    assert abs((info.last_modified - first.created_at).total_seconds()) < 0.001
    assert info.library_name == "peft" and info.card_data is not None
    assert info.card_data.library_name == "peft"
    assert api.model_info(published.name).sha == commit_id(published.second.digest)
    listed = {f.path: f for f in api.list_repo_tree(published.name, revision="production")}
    assert sorted(listed) == sorted(siblings)
    assert all(f.lfs is not None for f in listed.values())  # type: ignore[union-attr]


def test_hub_routes_stay_out_of_the_openapi_document(server: RunningServer) -> None:
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert not [path for path in paths if path.startswith("/hf")]


def test_a_second_download_comes_from_the_cache(
    server: RunningServer, published: Published, tmp_path: Path
) -> None:
    cache = tmp_path / "hf"
    first = download(server, published.name, cache, revision="production")
    blobs = {p.name: p.stat() for p in first.parent.parent.joinpath("blobs").iterdir()}
    planned = snapshot_download(
        published.name,
        revision="production",
        endpoint=endpoint(server),
        cache_dir=cache,
        token=False,
        dry_run=True,
    )
    assert all(not info.will_download and info.is_cached for info in planned)
    again = download(server, published.name, cache, revision="production")
    assert again == first
    after = {p.name: p.stat() for p in first.parent.parent.joinpath("blobs").iterdir()}
    assert {name: (s.st_ino, s.st_mtime_ns) for name, s in after.items()} == {
        name: (s.st_ino, s.st_mtime_ns) for name, s in blobs.items()
    }
    # The blobs are named by the files' sha256 (the ETag), as the Hub names LFS blobs.
    assert sorted(blobs) == sorted(f.sha256 for f in published.first.files or [])


def test_an_alias_move_is_picked_up_and_a_pinned_commit_is_not(
    server: RunningServer, client: Registry, published: Published, tmp_path: Path
) -> None:
    cache = tmp_path / "hf"
    pinned = commit_id(published.first.digest)
    before = download(server, published.name, cache, revision="production")
    client.set_alias(f"{published.name}@2", "production")

    moved = download(server, published.name, cache, revision="production")
    assert moved.name == commit_id(published.second.digest)
    assert files_of(moved) == pulled(server, f"{published.name}@2", tmp_path / "second")
    # The commit stays what it was, from the cache and from the server alike.
    assert files_of(download(server, published.name, cache, revision=pinned)) == files_of(before)
    fresh = download(server, published.name, tmp_path / "fresh", revision=pinned)
    assert files_of(fresh) == pulled(server, f"{published.name}@1", tmp_path / "first")
    weights = download_file(
        server, published.name, "adapter_model.safetensors", tmp_path / "single", revision=pinned
    )
    assert weights.read_bytes() == files_of(before)["adapter_model.safetensors"]


def test_file_metadata_carries_commit_sha256_etag_size_and_location(
    server: RunningServer, published: Published, tmp_path: Path
) -> None:
    weights = next(f for f in published.first.files or [] if f.path.endswith(".safetensors"))
    url = hf_hub_url(published.name, weights.path, revision="production", endpoint=endpoint(server))
    meta = get_hf_file_metadata(url, token=False)
    assert meta.commit_hash == commit_id(published.first.digest)
    assert meta.etag == weights.sha256 and meta.size == weights.size
    if server.bucket:  # S3: a presigned URL of the store, fetched without the registry
        assert not meta.location.startswith(server.url) and server.bucket in meta.location
    else:
        assert meta.location == url
    # Range requests, as the client resumes an interrupted download.
    whole = httpx.get(url, follow_redirects=True).content
    assert hashlib.sha256(whole).hexdigest() == weights.sha256
    ranged = httpx.get(url, headers={"Range": "bytes=10-99"}, follow_redirects=True)
    assert ranged.status_code == 206 and ranged.content == whole[10:100]
    with open(tmp_path / "resumed", "wb") as out:
        out.write(whole[:100])
        http_get(meta.location, out, resume_size=100, expected_size=weights.size)
    assert (tmp_path / "resumed").read_bytes() == whole


def test_the_hf_download_cli_fetches_a_version_and_a_single_file(
    server: RunningServer, published: Published, tmp_path: Path
) -> None:
    env = {**os.environ, "HF_ENDPOINT": endpoint(server), "HF_HOME": str(tmp_path / "home")}
    env.pop("HF_TOKEN", None)
    hf = str(Path(sys.executable).parent / "hf")
    whole = subprocess.run(
        [hf, "download", published.name, "--revision", "production", "--cache-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert whole.returncode == 0, whole.stderr
    folder = Path(whole.stdout.strip().splitlines()[-1].split()[-1])
    assert folder.name == commit_id(published.first.digest)
    assert files_of(folder) == pulled(server, f"{published.name}@1", tmp_path / "pulled")
    one = str(tmp_path / "one")
    single = subprocess.run(
        [
            hf,
            "download",
            published.name,
            "adapter_config.json",
            "--revision",
            "2",
            "--local-dir",
            one,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert single.returncode == 0, single.stderr
    expected = pulled(server, f"{published.name}@2", tmp_path / "second")
    assert files_of(tmp_path / "one") == {"adapter_config.json": expected["adapter_config.json"]}


# --- refusals ----------------------------------------------------------------------------------


def test_missing_repos_revisions_and_files_raise_the_clients_own_exceptions(
    server: RunningServer, published: Published, tmp_path: Path
) -> None:
    api = HfApi(endpoint=endpoint(server), token=False)
    with pytest.raises(RepositoryNotFoundError) as missing_repo:
        api.model_info(unique_name())
    assert not isinstance(missing_repo.value, GatedRepoError)
    with pytest.raises(RepositoryNotFoundError):
        download_file(server, unique_name(), "adapter_config.json", tmp_path)
    for revision in ("staging", "9", "0" * 40, "sha256:" + "0" * 64):
        with pytest.raises(RevisionNotFoundError):
            download(server, published.name, tmp_path, revision=revision)
        with pytest.raises(RevisionNotFoundError):
            download_file(
                server, published.name, "adapter_config.json", tmp_path, revision=revision
            )
    with pytest.raises(RemoteEntryNotFoundError):
        download_file(server, published.name, "nothing.bin", tmp_path, revision="production")
    # The client records the absence at the revision's commit (it came with the 404).
    storage = tmp_path / f"models--{published.name.replace('/', '--')}"
    assert (storage / ".no_exist" / commit_id(published.first.digest) / "nothing.bin").exists()
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(published.name, path_in_repo="nowhere", revision="main"))
    assert api.file_exists(published.name, "adapter_config.json", revision="production")
    assert not api.file_exists(published.name, "nothing.bin", revision="production")


def test_a_yanked_version_is_refused_like_pull_refuses_it(
    server: RunningServer, client: Registry, published: Published, tmp_path: Path
) -> None:
    client.yank(f"{published.name}@2", "broken")
    for revision in ("2", published.second.digest, commit_id(published.second.digest)):
        with pytest.raises(RevisionNotFoundError, match="yanked"):
            download(server, published.name, tmp_path, revision=revision)
    assert server.cli("pull", f"{published.name}@2", "-o", str(tmp_path / "p")).returncode != 0
    # main skips it, as `latest` does.
    assert download(server, published.name, tmp_path / "hf").name == commit_id(
        published.first.digest
    )


def test_a_base_registered_without_its_weights_is_not_a_repository(
    server: RunningServer, client: Registry, base_dir: Callable[..., Path], tmp_path: Path
) -> None:
    base = f"{unique('org')}/headers-only"
    client.add_base(base, base_dir("llama"))
    with pytest.raises(RepositoryNotFoundError, match="not stored"):
        HfApi(endpoint=endpoint(server), token=False).model_info(base)


# --- auth --------------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def secured(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningServer]:
    with own_server(request, tmp_path / "server", request.param, LORA_REG_AUTH="on") as running:
        yield running


def test_hf_token_is_a_registry_token_and_a_wrong_one_raises_the_clients_auth_error(
    secured: RunningServer, adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    name = unique_name()
    with secured.client(tmp_path / "cache") as admin:
        version = admin.push(adapter_dir("llama"), name, alias="production").version
        reader = admin.create_token("hub-reader", "read").token
        revoked = admin.create_token("hub-gone", "read").token
        admin.revoke_token("hub-gone")
    api = HfApi(endpoint=endpoint(secured))

    info = api.model_info(name, revision="production", token=reader)
    assert info.sha == commit_id(version.digest) and info.private is True
    folder = download(secured, name, tmp_path / "hf", revision="production", token=reader)
    expected = pulled(secured, f"{name}@production", tmp_path / "pulled")
    assert files_of(folder) == expected

    with pytest.raises(GatedRepoError, match="HF_TOKEN"):
        api.model_info(name, token=False)
    with pytest.raises(GatedRepoError):
        download(secured, name, tmp_path / "anonymous")
    for wrong in ("lrt_" + "A" * 43, revoked, "hf_notaregistrytoken"):
        with pytest.raises(HfHubHTTPError) as refused:
            download(secured, name, tmp_path / "wrong", token=wrong)
        assert refused.value.response.status_code == 401
        assert not isinstance(refused.value, RepositoryNotFoundError)
        assert "Invalid credentials" in str(refused.value)
        with pytest.raises(HfHubHTTPError) as head:
            download_file(secured, name, "adapter_config.json", tmp_path / "f", token=wrong)
        assert head.value.response.status_code == 401

    # As users set it: HF_TOKEN in the environment of the `hf` CLI.
    env = {**os.environ, "HF_ENDPOINT": endpoint(secured), "HF_HOME": str(tmp_path / "home")}
    hf = str(Path(sys.executable).parent / "hf")
    command = [hf, "download", name, "--revision", "production", "--local-dir", str(tmp_path / "d")]
    allowed = subprocess.run(
        command, env={**env, "HF_TOKEN": reader}, capture_output=True, text=True, timeout=120
    )
    assert allowed.returncode == 0, allowed.stderr
    assert files_of(tmp_path / "d") == expected
    refused_cli = subprocess.run(
        [*command[:-1], str(tmp_path / "e")],
        env={**env, "HF_TOKEN": "lrt_" + "B" * 43},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused_cli.returncode != 0 and "401" in refused_cli.stderr


# --- transformers and PEFT ---------------------------------------------------------------------

_LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    args = json.loads(sys.argv[1])
    ids = torch.arange(12).unsqueeze(0)
    local_base = AutoModelForCausalLM.from_pretrained(args["base_folder"])
    base_logits = local_base(ids).logits
    answers = {}
    for revision in args["base_revisions"]:
        hub_base = AutoModelForCausalLM.from_pretrained(args["base"], revision=revision)
        answers[f"base@{revision}"] = torch.equal(hub_base(ids).logits, base_logits)
    hub_base = AutoModelForCausalLM.from_pretrained(args["base"], revision="main")
    hub = PeftModel.from_pretrained(hub_base, args["adapter"], revision="production")
    local = PeftModel.from_pretrained(local_base, args["pulled"])
    hub_logits = hub(ids).logits
    answers["adapter"] = torch.equal(hub_logits, local(ids).logits)
    answers["adapter_applied"] = not torch.equal(hub_logits, base_logits)
    print(json.dumps(answers))
    """
)


def test_transformers_loads_a_stored_base_and_peft_an_alias_through_the_endpoint(
    server: RunningServer,
    client: Registry,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    base_id = f"{unique('org')}/tiny-llama"
    stored = client.add_base(f"{base_id}@v1", base_dir("llama"), upload=True).base
    name = unique_name()
    client.push(adapter_dir("llama", seed=0), name, alias="production")
    client.push(adapter_dir("llama", seed=1), name)  # main is another version
    pulled(server, f"{name}@production", tmp_path / "pulled")
    commit = commit_id(
        manifest_digest(FileEntry(f.path, f.size, f.sha256) for f in stored.files or [])
    )
    args = {
        "base": base_id,
        "base_folder": str(base_dir("llama")),
        "base_revisions": ["v1", commit],
        "adapter": name,
        "pulled": str(tmp_path / "pulled"),
    }
    env = {**os.environ, "HF_ENDPOINT": endpoint(server), "HF_HOME": str(tmp_path / "home")}
    env.pop("HF_TOKEN", None)
    loaded = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    answers = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert answers == {
        "base@v1": True,
        f"base@{commit}": True,
        "adapter": True,
        "adapter_applied": True,
    }


# --- merged artifacts --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_merged_artifact_is_served_as_merged_slash_its_digest(
    request: pytest.FixtureRequest,
    backend: str,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    # A server of its own: the test claims the oldest queued job, as a worker would.
    with (
        own_server(request, tmp_path / "server", backend) as server,
        server.client(tmp_path / "cache") as client,
    ):
        base_id = f"{unique('org')}/tiny"
        client.add_base(base_id, base_dir("llama"), upload=True)
        name = unique_name()
        version = client.push(adapter_dir("llama"), name, base=base_id).version
        job = client.request_merge(f"{name}@1")
        claim = client.claim_job("hub-test", device="cpu")
        assert claim is not None and claim.job.id == job.id
        out = tmp_path / "merged"
        merged_like_a_worker(
            adapter_dir("llama"),
            base_dir("llama"),
            out,
            ref=job.adapter,
            digest=version.digest,
            base_id=job.base,
        )
        specs = [
            FileSpec(
                path=p.relative_to(out).as_posix(),
                size=p.stat().st_size,
                sha256=hashlib.sha256(p.read_bytes()).hexdigest(),
            )
            for p in sorted(out.rglob("*"))
            if p.is_file()
        ]
        client.upload_merged(job.id, out, [s.entry() for s in specs], worker="hub-test")
        result = JobResult(
            location="registry", files=specs, size=sum(s.size for s in specs), device="cpu"
        )
        done = client.finish_job(job.id, "hub-test", "succeeded", result=result)
        assert done.result is not None and done.result.artifact
        artifact = done.result.artifact

        repo = "merged/" + artifact.removeprefix("sha256:")
        expected = files_of(client.pull_artifact(artifact, tmp_path / "pulled"))
        assert files_of(download(server, repo, tmp_path / "hf")) == expected
        by_digest = download(server, repo, tmp_path / "hf2", revision=artifact)
        assert by_digest.name == commit_id(artifact) and files_of(by_digest) == expected
        info = HfApi(endpoint=endpoint(server), token=False).model_info(repo)
        assert info.sha == commit_id(artifact)
        assert info.card_data is not None and info.card_data.base_model == base_id
        with pytest.raises(RevisionNotFoundError):
            download(server, repo, tmp_path / "hf3", revision="1")


# --- vLLM --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_vllms_hf_hub_resolver_serves_main_through_the_endpoint(
    servers: Callable[[str], RunningServer], tmp_path: Path
) -> None:
    """vLLM's own `lora_hf_hub_resolver` plugin (HF_ENDPOINT, no registry plugin) resolves a
    request for `ns/name` to `main` and generates exactly what that version's folder, served
    statically, generates. The resolver only ever asks for main."""
    vllm_env = pytest.importorskip("tests.support.vllm_env")
    venv = vllm_env.vllm_venv()  # cached per machine; built on first use (about 10 minutes)
    server = servers("postgres-s3")
    base = vllm_env.build_tiny_llama(tmp_path / "base")
    first = vllm_env.build_lora(base, tmp_path / "v1", rank=4, seed=1)
    second = vllm_env.build_lora(base, tmp_path / "v2", rank=4, seed=2)
    name = unique_name()
    with server.client(tmp_path / "cache") as client:
        client.push(first, name, alias="production")
        newest = client.push(second, name).version
    vllm = vllm_env.start_vllm(
        venv,
        base,
        workdir=tmp_path,
        env={
            "HF_ENDPOINT": endpoint(server),
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "hf"),
            "VLLM_PLUGINS": "lora_hf_hub_resolver",
            "VLLM_LORA_RESOLVER_HF_REPO_LIST": name,
        },
        args=[
            *("--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"),
            *("--lora-modules", f"static-v1={first}", f"static-v2={second}"),
        ],
    )
    try:

        def generated(model: str) -> list[int]:
            response = httpx.post(
                f"{vllm.url}/v1/completions",
                json={
                    "model": model,
                    "prompt": "the registry stores",
                    "max_tokens": 8,
                    "temperature": 0,
                    "return_token_ids": True,
                },
                timeout=120,
            )
            assert response.status_code == 200, response.text
            return list(response.json()["choices"][0]["token_ids"])

        through_hub = generated(name)
        assert through_hub == generated("static-v2")
        assert through_hub != generated("static-v1")
        snapshots = tmp_path / "hf" / "hub" / f"models--{name.replace('/', '--')}" / "snapshots"
        assert [p.name for p in snapshots.iterdir()] == [commit_id(newest.digest)]
    finally:
        vllm_env.stop_vllm(vllm)
