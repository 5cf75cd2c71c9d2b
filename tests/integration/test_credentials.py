"""Per-side credentials: ``profile``, and ``role_arn`` (with ``external_id`` and
``role_session_name``) assumed through moto's STS with the profile's credentials.

The moto server of the session (in this process) records every AssumeRole it answers, so the
tests read what it was asked from there. The profiles live in temporary AWS config and
credentials files; the STS endpoint comes from the profile's ``services`` section.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moto.sts.models import sts_backends

from migrator.config import Location
from migrator.errors import PreflightError
from migrator.storage import s3
from tests.conftest import unique

ROLE = "arn:aws:iam::210987654321:role/migrator-writer"


@pytest.fixture
def profiles(tmp_path: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Profile ``base``, whose keys differ from the environment's, with STS on the moto
    server."""
    (tmp_path / "credentials").write_text(
        "[base]\naws_access_key_id = AKIABASEPROFILE\naws_secret_access_key = base-secret\n"
    )
    (tmp_path / "config").write_text(
        "[profile base]\nregion = us-east-1\nservices = local\n\n"
        f"[services local]\nsts =\n  endpoint_url = {moto_endpoint}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    yield


def assumed(session_name: str) -> list[Any]:
    """AssumeRole calls moto answered for ``ROLE`` with this session name."""
    return [
        r
        for r in sts_backends["210987654321"]["aws"].assumed_roles
        if r.session_name == session_name
    ]


def location(endpoint: str, **kw: Any) -> Location:
    return Location(bucket="unused", endpoint_url=endpoint, region="us-east-1", **kw)


def test_role_is_assumed_with_the_profile_and_external_id(
    profiles: None, moto_endpoint: str, moto_s3: Any
) -> None:
    session = unique("sess")
    bucket = unique("roles")
    moto_s3.create_bucket(Bucket=bucket)
    moto_s3.put_object(Bucket=bucket, Key="a/1", Body=b"x")
    loc = location(
        moto_endpoint,
        profile="base",
        role_arn=ROLE,
        external_id="ext-id-1",
        role_session_name=session,
    )
    factory = s3.ClientFactory(loc)
    creds = factory.session.get_credentials()
    assert creds.method == "assume-role"
    assert assumed(session) == []  # deferred: nothing asked before the first request

    client = factory.client()
    client.head_bucket(Bucket=bucket)
    crt = s3.service(loc, "crt", 2)  # the CRT signs with the same (refreshable) credentials
    try:
        listed = [o.key for page in crt.list_pages(bucket, "a/") for o in page]
    finally:
        crt.close()

    assert listed == ["a/1"]
    calls = assumed(session)
    assert [(r.role_arn, r.external_id) for r in calls] == [(ROLE, "ext-id-1")]
    frozen = creds.get_frozen_credentials()
    assert frozen.access_key == calls[0].access_key_id != "AKIABASEPROFILE"
    assert frozen.token  # temporary credentials: refreshed by botocore before they expire
    assert creds.refresh_needed(0) is False


def test_without_a_role_the_profile_is_used(profiles: None, moto_endpoint: str) -> None:
    factory = s3.ClientFactory(location(moto_endpoint, profile="base"))
    frozen = factory.session.get_credentials().get_frozen_credentials()
    assert (frozen.access_key, frozen.secret_key) == ("AKIABASEPROFILE", "base-secret")


def test_an_unknown_profile_is_one_line(profiles: None, moto_endpoint: str) -> None:
    with pytest.raises(PreflightError) as info:
        s3.ClientFactory(location(moto_endpoint, profile="nope", role_arn=ROLE))
    assert str(info.value).startswith("AWS profile 'nope' is not in the AWS config")
    assert "\n" not in str(info.value)
