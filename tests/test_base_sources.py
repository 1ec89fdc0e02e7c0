"""Places the server reads for `base add --from s3://...`: an allow-list for write tokens
(LORA_REG_BASE_SOURCES; admins anywhere), URLs normalised before any comparison (so
`s3://bucket//prefix` is not a way around the guard on the registry's own storage), and a
missing bucket reported as the caller's mistake (422), not as an outage (503).

Runs a real server (auth on, SQLite + SeaweedFS) and the real CLI with real tiny checkpoints.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from registry.access import Caller
from registry.bases.service import check_base_source
from registry.core.errors import InvalidBase, NotPermitted
from registry.core.jobs import Target, parse_s3_location
from registry.core.schemas import BaseRegisterRequest
from registry.settings import Settings
from tests.conftest import RunningServer, make_bucket, own_server, unique
from tests.support.seaweed import s3_client
from tests.test_auth import as_token, create_tokens


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("s3://bkt/models/a", "s3://bkt/models/a"),
        ("s3://bkt//models/a/", "s3://bkt/models/a"),
        ("s3://bkt/./models//./a", "s3://bkt/models/a"),
        ("s3://bkt/", "s3://bkt"),
        ("s3://bkt", "s3://bkt"),
    ],
)
def test_s3_locations_are_normalised_before_they_are_compared(text: str, canonical: str) -> None:
    assert str(parse_s3_location(text)) == canonical


@pytest.mark.parametrize(
    "text", ["s3://bkt/models/../secret", "s3://", "s3://Bad_Bucket/x", "s3://bkt/a\nb", "hf://x"]
)
def test_s3_locations_that_cannot_be_placed_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_s3_location(text)


def test_base_sources_are_validated_at_start_up() -> None:
    settings = Settings(base_sources="s3://bkt//models/./, s3://other")
    assert settings.base_source_list == [
        Target(kind="s3", bucket="bkt", prefix="models"),
        Target(kind="s3", bucket="other", prefix=""),
    ]
    for bad in ("dir:/srv/models", "s3://bkt/a/../b"):
        with pytest.raises(ValueError, match="LORA_REG_BASE_SOURCES"):
            Settings(base_sources=bad)


def test_only_server_read_sources_outside_the_list_need_an_admin() -> None:
    settings = Settings(base_sources="s3://bkt/models")

    def check(scope: str, source: str, **extra: object) -> None:
        request = BaseRegisterRequest.model_validate({"base": "o/m", "source": source, **extra})
        check_base_source(settings, Caller("dev", scope), request)  # type: ignore[arg-type]

    check("write", "s3://bkt/models/llama")
    check("write", "s3://bkt//models/./llama")
    check("admin", "s3://elsewhere/anything")
    # The client read these itself (or uploaded the files): the server reads no place it names.
    check("write", "file:///data/llama", config={}, tensors={})
    check("write", "hf://org/m@abc", config={}, tensors={})
    file = {"path": "config.json", "size": 2, "sha256": "0" * 64}
    check("write", "s3://elsewhere/anything", files=[file])
    for outside in ("s3://bkt/modelsx/llama", "s3://elsewhere/llama", "s3://bkt"):
        with pytest.raises(NotPermitted, match="LORA_REG_BASE_SOURCES"):
            check("write", outside)
    with pytest.raises(InvalidBase, match=r"'\.\.'"):
        check("write", "s3://bkt/models/../secret")


# --- a real server ---------------------------------------------------------------------------


@pytest.fixture
def sources(seaweed: object) -> str:
    """A bucket of base checkpoints that is not the registry's storage."""
    return make_bucket(seaweed.endpoint)  # type: ignore[attr-defined]


@pytest.fixture
def secured(
    request: pytest.FixtureRequest, tmp_path: Path, sources: str
) -> Iterator[RunningServer]:
    with own_server(
        request,
        tmp_path / "server",
        "sqlite-s3",
        LORA_REG_AUTH="on",
        LORA_REG_BASE_SOURCES=f"s3://{sources}/allowed",
    ) as running:
        yield running


def upload(server: RunningServer, folder: Path, bucket: str, prefix: str) -> None:
    s3 = s3_client(server.env["AWS_ENDPOINT_URL"])
    for path in folder.iterdir():
        s3.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def test_write_tokens_have_the_server_read_only_listed_sources(
    secured: RunningServer, sources: str, base_dir: Callable[..., Path]
) -> None:
    checkpoint = base_dir("llama")
    upload(secured, checkpoint, sources, "allowed/llama")
    upload(secured, checkpoint, sources, "secret/llama")
    writer = as_token(secured, create_tokens(secured, dev="write")["dev"])

    refused = writer("base", "add", f"{unique('org')}/m", "--from", f"s3://{sources}/secret/llama")
    assert refused.returncode == 5, refused.stderr
    assert "not_permitted" in refused.stderr and "LORA_REG_BASE_SOURCES" in refused.stderr
    climbed = f"s3://{sources}/allowed/../secret/llama"
    escaped = writer("base", "add", f"{unique('org')}/m", "--from", climbed)
    assert escaped.returncode == 6 and "'..'" in escaped.stderr, escaped.stderr

    base = f"{unique('org')}/m"
    added = writer("base", "add", base, "--from", f"s3://{sources}//allowed/./llama/", "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["base"]["source"] == f"s3://{sources}/allowed/llama"
    # Admins may name any place the server's credentials reach.
    admin = secured.cli(
        "base", "add", f"{unique('org')}/m", "--from", f"s3://{sources}/secret/llama"
    )
    assert admin.returncode == 0, admin.stderr
    listed = json.loads(secured.cli("base", "ls", "--json").stdout)
    assert {item["source"] for item in listed["items"]} == {
        f"s3://{sources}/allowed/llama",
        f"s3://{sources}/secret/llama",
    }


def test_doubled_slashes_do_not_reach_the_registrys_own_storage(
    secured: RunningServer, base_dir: Callable[..., Path]
) -> None:
    assert secured.bucket
    # A checkpoint inside the registry's own prefix: not a place anyone may register from.
    upload(secured, base_dir("llama"), secured.bucket, "registry/planted")
    for source in (
        f"s3://{secured.bucket}//registry/planted",
        f"s3://{secured.bucket}/./registry/planted",
        f"s3://{secured.bucket}//",
    ):
        added = secured.cli("base", "add", f"{unique('org')}/m", "--from", source)
        assert added.returncode == 6, (source, added.stderr)
        assert "own storage" in added.stderr, (source, added.stderr)


def test_a_missing_bucket_or_prefix_is_the_callers_mistake_not_an_outage(
    secured: RunningServer, sources: str
) -> None:
    missing_bucket = f"s3://test-missing-{uuid.uuid4().hex[:12]}/llama"
    added = secured.cli("base", "add", f"{unique('org')}/m", "--from", missing_bucket)
    assert added.returncode == 6, added.stderr
    assert "invalid_base" in added.stderr and "does not exist" in added.stderr
    for source in (missing_bucket, f"s3://{sources}/allowed/nothing-here"):
        response = httpx.post(
            f"{secured.url}/api/v1/bases",
            json={"base": f"{unique('org')}/m", "source": source},
            headers={"Authorization": f"Bearer {secured.token}"},
            timeout=30,
        )
        assert response.status_code == 422, (source, response.text)
        assert response.json()["code"] == "invalid_base", source
