"""``migrator iam-policy`` for the copy modes: who reads what when the sides have their own
credentials."""

from __future__ import annotations

from typing import Any

import pytest

from migrator.config import Config
from migrator.iam import policies


def config(copy_mode: str, **destination: Any) -> Config:
    return Config.model_validate(
        {
            "job": "avatars",
            "source": {"bucket": "legacy", "prefix": "image/", "profile": "legacy-account"},
            "destination": {"bucket": "production", "prefix": "avatar/", **destination},
            "copy_mode": copy_mode,
        }
    )


def actions(policy: dict[str, Any], resource: str) -> set[str]:
    return {a for s in policy["Statement"] if s["Resource"] == resource for a in s["Action"]}


SOURCE_OBJECTS = "arn:aws:s3:::legacy/image/*"
DEST_OBJECTS = "arn:aws:s3:::production/avatar/*"


@pytest.mark.parametrize("copy_mode", ["stream", "auto"])
def test_streamed_copies_keep_each_principal_on_its_own_side(copy_mode: str) -> None:
    """Streaming (forced, or auto with two profiles): the source's principal reads (GET,
    ranged GET, HEAD, tags) and deletes; the destination's writes (PUT, parts) and reads
    back only the destination."""
    doc = policies(config(copy_mode, profile="production-account"))
    assert actions(doc["source"], SOURCE_OBJECTS) == {
        "s3:GetObject",
        "s3:GetObjectTagging",
        "s3:DeleteObject",
    }
    assert actions(doc["destination"], DEST_OBJECTS) == {
        "s3:PutObject",
        "s3:PutObjectTagging",
        "s3:GetObject",
        "s3:AbortMultipartUpload",
    }
    assert "s3:ListBucketMultipartUploads" in actions(doc["destination"], "arn:aws:s3:::production")
    assert "legacy" not in str(doc["destination"])


def test_server_side_copy_with_other_credentials_lets_the_destination_read_the_source() -> None:
    """``copy_mode: server`` across accounts: CopyObject and UploadPartCopy are sent with the
    destination's credentials, which must read the source (a 404, not a 403, for a source
    deleted since plan needs ListBucket there too)."""
    doc = policies(config("server", profile="production-account"))
    dest = doc["destination"]
    assert actions(dest, SOURCE_OBJECTS) == {"s3:GetObject", "s3:GetObjectTagging"}
    assert actions(dest, "arn:aws:s3:::legacy") == {"s3:ListBucket"}
    assert {s["Sid"] for s in dest["Statement"]} >= {"DestinationReadsSource"}
    same = policies(config("server", profile="legacy-account"))
    assert "legacy" not in str(same["destination"])  # one principal: its source policy does


def test_versions_get_the_version_actions_and_nothing_more() -> None:
    """Copying versions by id needs the version reads; deleting by version id needs
    s3:DeleteObjectVersion (and then not s3:DeleteObject); listing versions needs
    s3:ListBucketVersions. A job of current versions gets none of them."""
    bucket = "arn:aws:s3:::legacy"
    plain = policies(config("server"))
    assert not {a for s in plain["source"]["Statement"] for a in s["Action"]} & {
        "s3:GetObjectVersion",
        "s3:ListBucketVersions",
        "s3:DeleteObjectVersion",
    }
    every = Config.model_validate(
        {
            "job": "avatars",
            "source": {"bucket": "legacy", "prefix": "image/"},
            "destination": {"bucket": "production", "prefix": "avatar/"},
            "versions": "all",
            "delete_versions": True,
        }
    )
    doc = policies(every)
    assert actions(doc["source"], SOURCE_OBJECTS) == {
        "s3:GetObject",
        "s3:GetObjectTagging",
        "s3:GetObjectVersion",
        "s3:GetObjectVersionTagging",
        "s3:DeleteObjectVersion",
    }
    assert "s3:ListBucketVersions" in actions(doc["source"], bucket)
