"""``migrator iam-policy``: least-privilege IAM policies for the two sides of a job.

One policy per side, because source and destination may be read and written by different
principals (``source.profile`` / ``destination.profile``). Every statement names exactly the
bucket and prefix of the config, and an action is listed only when the job's settings use it
(no ``s3:DeleteObject`` on the source under ``delete_source: never``).

What each action is for (the S3 API call that needs it):

* source ``s3:ListBucket``: ``plan`` (ListObjectsV2), the pre-flight ``HeadBucket``, and a
  404 rather than a 403 for a source deleted since the plan; ``s3:GetObject``:
  ``CopyObject``'s read of the source, and ``HeadObject`` when a copy is refused (412);
  ``s3:GetObjectTagging``: ``CopyObject`` copies the tags (not with ``tags: replace``);
  ``s3:DeleteObject``:
  ``DeleteObjects`` of migrated sources.
* destination ``s3:PutObject`` (+ ``s3:PutObjectTagging``): ``CopyObject``'s write, and the
  parts of a multipart copy; ``s3:GetObject``: ``HeadObject`` (verify, conflicts, ``migrator
  verify``); ``s3:ListBucket``: ``HeadBucket``, ``migrator verify``'s listing, and a 404 rather
  than a 403 for a missing key; ``s3:AbortMultipartUpload`` and
  ``s3:ListBucketMultipartUploads``: cleaning up incomplete multipart uploads.
* source with ``versions: all``: ``s3:GetObjectVersion`` (+ ``s3:GetObjectVersionTagging``)
  for ``CopyObject`` of a version by its id; with ``versions: all`` or ``delete_versions``:
  ``s3:ListBucketVersions`` (``plan`` lists versions); with ``delete_versions``:
  ``s3:DeleteObjectVersion`` instead of ``s3:DeleteObject`` (deletes by version id).
* both: ``s3:GetBucketVersioning`` and ``s3:GetBucketLocation`` for ``migrator check``.
* destination with ``acl``: ``s3:PutObjectAcl`` (a copy that sets a canned ACL).
* destination with ``sse: aws:kms`` and a ``kms_key_id``: on that key ``kms:GenerateDataKey``
  (S3 encrypts each copy), ``kms:Decrypt`` (S3 reads the parts of a multipart copy, and
  ``HeadObject`` with checksums, which verifies SSE-KMS copies, needs it) and
  ``kms:DescribeKey`` (``migrator check``). The key is named by its ARN; a key id or alias
  without one leaves region and account open (``*``), an alias is matched by the key's
  aliases (``kms:ResourceAliases``). Without ``kms_key_id`` S3 uses the AWS managed key
  ``aws/s3``, whose key policy already lets the account use it through S3: no statement.
  Sources that are themselves SSE-KMS need ``kms:Decrypt`` on their keys for the source's
  principal; migrator cannot know those keys from the config.

Streamed copies (``copy_mode: stream``) need the same: the source's ``s3:GetObject`` for
``GetObject`` (whole, or by range for parts) and ``HeadObject``, ``s3:GetObjectTagging`` for
its tags; the destination's ``s3:PutObject`` for ``PutObject`` and the multipart calls,
``s3:PutObjectTagging`` for the tags. A server-side copy whose sides have different
credentials (``copy_mode: server``, another account) is sent with the destination's, so the
destination policy also grants reading the source (``DestinationReadsSource``); the source
bucket's policy must allow that principal too.

Object statements are limited to ``bucket/prefix*``; bucket statements cannot be (see
``_bucket_statement``). A prefix holding ``*`` or ``?`` would widen the object resource, as
those are wildcards in IAM resource ARNs.
"""

from __future__ import annotations

from typing import Any

from migrator.config import Config, Location

VERSION = "2012-10-17"


def partition(region: str | None) -> str:
    """The ARN partition of a region (AWS China and GovCloud have their own)."""
    if region and region.startswith("cn-"):
        return "aws-cn"
    if region and region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def _bucket_arn(loc: Location) -> str:
    return f"arn:{partition(loc.region)}:s3:::{loc.bucket}"


def _bucket_statement(sid: str, loc: Location, actions: list[str]) -> dict[str, Any]:
    # s3:ListBucket without an s3:prefix condition: HeadBucket and HeadObject carry no prefix,
    # so such a condition denies them — and without ListBucket, S3 answers a HeadObject of a
    # missing key 403 instead of 404, which would hide a deleted source or a free destination.
    return {"Sid": sid, "Effect": "Allow", "Action": actions, "Resource": _bucket_arn(loc)}


def _objects(sid: str, loc: Location, actions: list[str]) -> dict[str, Any]:
    return {
        "Sid": sid,
        "Effect": "Allow",
        "Action": actions,
        "Resource": f"{_bucket_arn(loc)}/{loc.prefix}*",
    }


def source_policy(cfg: Config) -> dict[str, Any]:
    src = cfg.source
    objects = ["s3:GetObject"]
    if cfg.tags == "copy":
        objects.append("s3:GetObjectTagging")
    objects += _version_reads(cfg)
    if cfg.delete_source != "never":
        objects.append("s3:DeleteObjectVersion" if cfg.delete_versions else "s3:DeleteObject")
    bucket = ["s3:ListBucket", "s3:GetBucketLocation", "s3:GetBucketVersioning"]
    if cfg.lists_versions:
        bucket.append("s3:ListBucketVersions")
    return {
        "Version": VERSION,
        "Statement": [
            _bucket_statement("SourceBucket", src, bucket),
            _objects("SourceObjects", src, objects),
        ],
    }


def destination_policy(cfg: Config) -> dict[str, Any]:
    dst = cfg.destination
    bucket = [
        "s3:ListBucket",
        "s3:ListBucketMultipartUploads",
        "s3:GetBucketLocation",
        "s3:GetBucketVersioning",
    ]
    objects = ["s3:PutObject", "s3:PutObjectTagging", "s3:GetObject", "s3:AbortMultipartUpload"]
    if cfg.acl is not None:
        objects.append("s3:PutObjectAcl")
    statements = [
        _bucket_statement("DestinationBucket", dst, bucket),
        _objects("DestinationObjects", dst, objects),
    ]
    if cfg.sse == "aws:kms" and cfg.kms_key_id is not None:
        statements.append(_kms_statement("DestinationKmsKey", dst, cfg.kms_key_id))
    if not cfg.streams and cfg.source.principal != cfg.destination.principal:
        # CopyObject / UploadPartCopy read the source with the destination's credentials;
        # ListBucket makes a deleted source a 404 rather than a 403.
        statements += [
            _bucket_statement("DestinationListsSource", cfg.source, ["s3:ListBucket"]),
            _objects(
                "DestinationReadsSource",
                cfg.source,
                ["s3:GetObject", "s3:GetObjectTagging", *_version_reads(cfg)],
            ),
        ]
    return {"Version": VERSION, "Statement": statements}


def _version_reads(cfg: Config) -> list[str]:
    """What a copy of a source version by its id needs (``versions: all``)."""
    if cfg.versions != "all":
        return []
    return ["s3:GetObjectVersion"] + (["s3:GetObjectVersionTagging"] if cfg.tags == "copy" else [])


def _kms_statement(sid: str, loc: Location, key: str) -> dict[str, Any]:
    """Use of the destination's KMS key, named as exactly as ``kms_key_id`` allows."""
    statement: dict[str, Any] = {
        "Sid": sid,
        "Effect": "Allow",
        "Action": ["kms:GenerateDataKey", "kms:Decrypt", "kms:DescribeKey"],
    }
    region, arn_partition, account = loc.region or "*", partition(loc.region), "*"
    alias = key
    if key.startswith("arn:"):  # arn:PARTITION:kms:REGION:ACCOUNT:key/ID or …:alias/NAME
        _, arn_partition, _, region, account, alias = key.split(":", 5)
    if not alias.startswith("alias/"):  # a key ARN or key id
        key_id = alias.removeprefix("key/")
        statement["Resource"] = f"arn:{arn_partition}:kms:{region}:{account}:key/{key_id}"
        return statement
    statement["Resource"] = f"arn:{arn_partition}:kms:{region}:{account}:key/*"
    statement["Condition"] = {"ForAnyValue:StringEquals": {"kms:ResourceAliases": alias}}
    return statement


def policies(cfg: Config) -> dict[str, dict[str, Any]]:
    """``{"source": policy, "destination": policy}`` for this job."""
    return {"source": source_policy(cfg), "destination": destination_policy(cfg)}
