"""``migrator relocate``'s pure parts: which configs and options it takes, the temporary
bucket's name, the copies as jobs, the merge of ledger and listing, and what a copy must
keep."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from migrator.config import Config, load_config
from migrator.errors import ConfigError
from migrator.ledger.tables import Phase
from migrator.relocate import (
    Options,
    _merge,
    check_options,
    default_temp_bucket,
    job_config,
    phase_number,
)
from migrator.storage.buckets import ObjectFacts, kms_key_region
from migrator.storage.common import ListedObject

BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def relocation(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "job": "move-legacy",
        "ledger": "sqlite:///ledger.db",
        "source": {"bucket": "legacy", "endpoint_url": "http://127.0.0.1:5000"},
        "destination": {"bucket": "legacy", "endpoint_url": "http://127.0.0.1:5000"},
        "workers": 2,
    }
    for key, value in changes.items():
        if key in ("source", "destination"):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def load(tmp_path: Path, data: dict[str, Any], *, relocate: bool = True) -> Config:
    path = tmp_path / "relocate.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, env={}, relocate=relocate)


def test_a_relocation_config_is_read_only_by_relocate(tmp_path: Path) -> None:
    cfg = load(tmp_path, relocation())
    check_options(cfg, Options("eu-central-1"))  # accepted
    with pytest.raises(ConfigError) as info:
        load(tmp_path, relocation(), relocate=False)
    assert "both the whole bucket 'legacy': nothing to move" in str(info.value)
    assert "`migrator relocate`" in str(info.value)


@pytest.mark.parametrize(
    ("changes", "options", "expected"),
    [
        ({"source": {"prefix": "image/"}}, {}, "source.prefix must be empty"),
        ({"destination": {"bucket": "production"}}, {}, "destination.bucket must be 'legacy'"),
        ({"destination": {"prefix": "x/"}}, {}, "destination.prefix must be empty"),
        (
            {"destination": {"endpoint_url": "http://127.0.0.1:5001"}},
            {},
            "destination.endpoint_url must be source.endpoint_url",
        ),
        ({"destination": {"region": "us-west-2"}}, {}, "destination.region is 'us-west-2'"),
        (
            {"app_db": {"url": "sqlite:///app.db", "table": "t", "column": "c"}},
            {},
            "app_db must be left out",
        ),
        ({"keys": {"include": ["a/*"]}}, {}, "keys must be left out"),
        ({"storage_class": "GLACIER", "sse": "AES256"}, {}, "storage_class, sse must be left"),
        ({"job": "j" * 95}, {}, "job must be at most 90 characters"),
        ({"versions": "all"}, {}, "versions and delete_versions must be left out"),
        ({"delete_versions": True}, {}, "versions and delete_versions must be left out"),
        ({}, {"to_region": "Europe"}, "--to-region 'Europe' is not an AWS region"),
        ({}, {"temp_bucket": "Bad_Name"}, "--temp-bucket 'Bad_Name' is not a valid"),
        ({}, {"temp_bucket": "legacy"}, "--temp-bucket must name another bucket"),
    ],
)
def test_check_options_refuses_what_a_relocation_cannot_do(
    tmp_path: Path, changes: dict[str, Any], options: dict[str, Any], expected: str
) -> None:
    cfg = load(tmp_path, relocation(**changes))
    opts = Options(**{"to_region": "eu-central-1", **options})
    with pytest.raises(ConfigError) as info:
        check_options(cfg, opts)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert info.value.exit_code == 2


def test_the_destination_may_name_the_target_region(tmp_path: Path) -> None:
    cfg = load(tmp_path, relocation(destination={"region": "eu-central-1"}))
    check_options(cfg, Options("eu-central-1"))
    for region in ("us-east-1", "us-gov-west-1", "ap-southeast-2", "il-central-1"):
        check_options(load(tmp_path, relocation()), Options(region))


@pytest.mark.parametrize("bucket", ["legacy", "a" * 63, "my.bucket.name", "b" * 44 + "-." + "c"])
def test_the_default_temporary_bucket_is_a_valid_fresh_name(bucket: str) -> None:
    names = {default_temp_bucket(bucket) for _ in range(20)}
    assert len(names) == 20  # random: a second relocation does not meet the first's name
    for name in names:
        assert BUCKET_NAME.match(name) and len(name) <= 63 and ".-" not in name
        assert name != bucket and "-relocate-" in name


def test_the_copies_are_plain_jobs_that_keep_their_sources(tmp_path: Path) -> None:
    cfg = load(tmp_path, relocation(concurrency=7, copy_mode="stream"))
    temp = cfg.destination.model_copy(update={"bucket": "legacy-tmp", "region": "eu-west-1"})
    job = job_config(cfg, cfg.job + ".to-temp", cfg.source, temp)
    assert job.job == "move-legacy.to-temp"
    assert job.delete_source == "never" and job.app_db is None
    assert job.source.bucket == "legacy" and job.source.prefix == ""
    assert job.destination.bucket == "legacy-tmp" and job.destination.region == "eu-west-1"
    assert job.concurrency == 7 and job.workers == 2 and job.copy_mode == "stream"
    assert job.transfer_part_size == 16 * 2**20  # part_size still unset: the streamed default
    assert job.attributes == cfg.attributes


def test_merge_pairs_ledger_rows_and_listed_objects_by_key() -> None:
    rows = iter([{"source_key": k} for k in ("a", "c", "d")])
    listed = iter([ListedObject(k, 1, "e", None) for k in ("b", "c", "e")])
    pairs = [
        (r["source_key"] if r else None, o.key if o else None) for r, o in _merge(rows, listed)
    ]
    assert pairs == [("a", None), (None, "b"), ("c", "c"), ("d", None), (None, "e")]


@pytest.mark.parametrize(
    ("encryption", "expected"),
    [
        (None, None),
        ({"Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]}, None),
        (
            {"Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms"}}]},
            None,
        ),
        (
            {
                "Rules": [
                    {
                        "ApplyServerSideEncryptionByDefault": {
                            "SSEAlgorithm": "aws:kms",
                            "KMSMasterKeyID": "arn:aws:kms:us-east-1:111122223333:key/abc",
                        }
                    }
                ]
            },
            ("arn:aws:kms:us-east-1:111122223333:key/abc", "us-east-1"),
        ),
        (
            {
                "Rules": [
                    {
                        "ApplyServerSideEncryptionByDefault": {
                            "SSEAlgorithm": "aws:kms",
                            "KMSMasterKeyID": "1234abcd-12ab-34cd-56ef-1234567890ab",
                        }
                    }
                ]
            },
            ("1234abcd-12ab-34cd-56ef-1234567890ab", ""),  # the bucket's own region
        ),
    ],
)
def test_kms_key_region(encryption: Any, expected: Any) -> None:
    assert kms_key_region(encryption) == expected


def test_object_facts_name_every_difference() -> None:
    a = ObjectFacts(
        10,
        "e",
        "STANDARD_IA",
        (("content-type", "image/png"), ("cache-control", "max-age=1")),
        (("x-amz-meta-owner", "u1"),),
        (("kind", "avatar"),),
    )
    assert a.differences(a) == []
    b = ObjectFacts(
        10,
        "other",
        None,
        (("content-type", "image/png"), ("expires", "Wed, 01 Jan 2031 00:00:00 GMT")),
        (),
        (("kind", "x"),),
    )
    assert a.differences(b) == [
        "storage class",
        "cache-control",
        "expires",
        "user metadata",
        "tags",
    ]


def test_phase_numbers() -> None:
    assert phase_number(Phase.CREATE_TEMP) == "1/9"
    assert phase_number(Phase.DELETE_TEMP) == "9/9"
    assert phase_number(Phase.DONE) == "done"
    assert [p.value for p in Phase][-1] == "done"
