"""The CRT request path against real S3 servers: same answers as boto3, same error kinds,
retries under injected faults, timeouts, and a stop flag that leaves requests unsent."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from migrator.config import Location
from migrator.errors import StorageError
from migrator.storage import s3
from migrator.storage.common import CopyItem, ErrorKind, S3OperationError
from migrator.storage.crt import _Window
from tests.conftest import S3Fast, free_port, s3_client, unique

HOSTILE_KEYS = [
    "plain.png",
    "with space.png",
    "plus+sign.png",
    "percent%20literal.png",
    "ünïcödé/ß/日本語.png",
    "emoji 🎉.png",
    "double//slash.png",
    "./dot-segment.png",
    "a/../b.png",
    "question?mark=1&and.png",
    "hash#tag.png",
    "tilde~and'quote\".png",
    "<angle>&amp.png",
    "tab\tkey.png",
    "line\nfeed.png",
    "carriage\rreturn.png",
    "k" * 900 + ".png",
]


class Flag:
    def __init__(self, value: bool = False) -> None:
        self.value = value

    def is_set(self) -> bool:
        return self.value


def service(endpoint: str, transport: str = "crt", **kw: Any) -> s3.S3Service:
    loc = Location(bucket="unused", prefix="", endpoint_url=endpoint, region="us-east-1")
    svc = s3.service(loc, transport, 8, s3.RetryCounter())
    if svc.fast is not None:
        for name, value in kw.items():
            setattr(svc.fast, name, value)
    return svc


def seed(endpoint: str, keys: list[str]) -> tuple[Any, str, str]:
    client = s3_client(endpoint)
    src, dst = unique("src"), unique("dst")
    client.create_bucket(Bucket=src)
    client.create_bucket(Bucket=dst)
    for i, key in enumerate(keys):
        client.put_object(Bucket=src, Key=f"in/{key}", Body=f"body {i}".encode())
    return client, src, dst


def listing(svc: s3.S3Service, bucket: str, prefix: str) -> list[tuple[str, int, str]]:
    return [(o.key, o.size, o.etag) for page in svc.list_pages(bucket, prefix) for o in page]


@pytest.mark.s3fast
def test_hostile_keys_list_copy_and_delete_like_boto3(s3fast: Callable[..., S3Fast]) -> None:
    server = s3fast()
    client, src, dst = seed(server.endpoint, HOSTILE_KEYS)
    crt, boto = service(server.endpoint), service(server.endpoint, "boto3")
    try:
        listed = listing(crt, src, "in/")
        assert listed == listing(boto, src, "in/")
        assert sorted(k for k, _, _ in listed) == sorted(f"in/{k}" for k in HOSTILE_KEYS)

        items = [CopyItem(key, "out/" + key[3:], etag) for key, _, etag in listed]
        results = crt.copy_many(src, dst, items, if_absent=True)
        assert results == [etag for _, _, etag in listed]
        assert listing(boto, dst, "out/") == [("out/" + k[3:], n, e) for k, n, e in listed]

        errors = crt.delete(src, [key for key, _, _ in listed])
        assert errors == {}
        assert client.list_objects_v2(Bucket=src).get("KeyCount") == 0
    finally:
        crt.close()
        boto.close()


def test_listing_pages_through_more_than_a_thousand_keys_on_moto(moto_endpoint: str) -> None:
    keys = [f"{i:05d} é+.png" for i in range(1005)]
    client, src, _ = seed(moto_endpoint, keys[:3])
    with_many = [{"Key": f"in/{k}"} for k in keys]
    for i in range(0, len(with_many), 100):
        for obj in with_many[i : i + 100]:
            client.put_object(Bucket=src, Key=obj["Key"], Body=b"x")
    crt = service(moto_endpoint)
    try:
        pages = list(crt.list_pages(src, "in/"))
        assert [len(p) for p in pages] == [1000, 5]
        assert [o.key for p in pages for o in p] == sorted(f"in/{k}" for k in keys)
        assert listing(crt, src, "in/") == listing(service(moto_endpoint, "boto3"), src, "in/")
    finally:
        crt.close()


@pytest.mark.s3fast
@pytest.mark.parametrize("transport", ["crt", "boto3"])
def test_errors_have_the_same_kinds_on_both_paths(
    s3fast: Callable[..., S3Fast], transport: str
) -> None:
    endpoint = s3fast().endpoint
    client, src, dst = seed(endpoint, ["a.png", "b.png"])
    etag = client.head_object(Bucket=src, Key="in/a.png")["ETag"].strip('"')
    client.put_object(Bucket=dst, Key="taken.png", Body=b"someone else's")
    svc = service(endpoint, transport)
    try:
        results = svc.copy_many(
            src,
            dst,
            [
                CopyItem("in/a.png", "ok.png", etag),
                CopyItem(
                    "in/a.png", "changed.png", "0" * 32
                ),  # the source is not the planned version
                CopyItem("in/gone.png", "missing.png", etag),
                CopyItem("in/a.png", "taken.png", etag),  # If-None-Match: * on a taken key
            ],
            if_absent=True,
        )
        assert results[0] == etag
        kinds = [r.kind if isinstance(r, S3OperationError) else r for r in results[1:]]
        assert kinds == [
            ErrorKind.SOURCE_CHANGED,
            ErrorKind.SOURCE_MISSING,
            ErrorKind.SOURCE_CHANGED,
        ]
        [missing_bucket] = svc.copy_many(
            src, unique("nobucket"), [CopyItem("in/a.png", "x.png", etag)], if_absent=False
        )
        assert isinstance(missing_bucket, S3OperationError)
        assert (missing_bucket.kind, missing_bucket.code) == (ErrorKind.PERMANENT, "NoSuchBucket")
        # A listing that fails ends in one line for the operator, not a traceback.
        gone = unique("nobucket")
        with pytest.raises(StorageError, match=f"listing s3://{gone}/in/ failed: NoSuchBucket"):
            listing(svc, gone, "in/")
    finally:
        svc.close()


@pytest.mark.s3fast
@pytest.mark.parametrize(
    "flags",
    [
        ("-fault-ops", "CopyObject", "-fail-rate", "0.3", "-seed", "3"),
        ("-fault-ops", "CopyObject", "-reset-rate", "0.2", "-seed", "4"),
    ],
    ids=["slowdown-30pct", "reset-20pct"],
)
def test_faults_are_retried_and_counted(s3fast: Callable[..., S3Fast], flags: tuple) -> None:
    server = s3fast(*flags)
    keys = [f"{i}.png" for i in range(200)]
    client, src, dst = seed(server.endpoint, keys)
    etags = {o["Key"]: o["ETag"].strip('"') for o in client.list_objects_v2(Bucket=src)["Contents"]}
    svc = service(server.endpoint)
    assert svc.fast is not None
    server.reset_stats()
    try:
        results = svc.copy_many(
            src, dst, [CopyItem(k, k, e) for k, e in etags.items()], if_absent=True
        )
    finally:
        svc.close()
    stats = server.stats()
    injected = stats["injected"]["slowdown"] + stats["injected"]["reset"]
    assert injected > 0
    assert results == list(etags.values())  # every copy made it, with its ETag
    # each injected fault cost exactly one more request, and was counted as a retry
    assert stats["ops"]["CopyObject"] == len(keys) + injected
    assert svc.fast.retries.take() == injected


def test_window_halves_on_throttling_and_grows_back_by_one() -> None:
    window = _Window(32)
    window.throttled()
    window.throttled()
    assert window.size == 8
    for _ in range(5):
        window.succeeded()
    assert window.size == 13
    for _ in range(100):
        window.throttled()
    assert window.size == 1
    for _ in range(100):
        window.succeeded()
    assert window.size == 32


@pytest.mark.s3fast
def test_steady_throttling_shrinks_the_window(s3fast: Callable[..., S3Fast]) -> None:
    server = s3fast("-fault-ops", "CopyObject", "-fail-rate", "0.5", "-seed", "5")
    client, src, dst = seed(server.endpoint, ["a.png"])
    etag = client.head_object(Bucket=src, Key="in/a.png")["ETag"].strip('"')
    svc = service(server.endpoint)
    assert svc.fast is not None
    window = svc.fast.window
    sizes: list[int] = []
    original = window.throttled

    def watch() -> None:
        original()
        sizes.append(window.size)

    window.throttled = watch  # type: ignore[method-assign]
    try:
        results = svc.copy_many(
            src, dst, [CopyItem("in/a.png", f"{i}", etag) for i in range(100)], if_absent=False
        )
    finally:
        svc.close()
    assert results == [etag] * 100
    assert len(sizes) == server.stats()["injected"]["slowdown"] > 0
    assert min(sizes) <= window.limit // 4


def test_unreachable_endpoint_is_a_retryable_error() -> None:
    svc = service(f"http://127.0.0.1:{free_port()}", max_attempts=2)
    try:
        [result] = svc.copy_many("a", "b", [CopyItem("k", "k", "e")], if_absent=False)
    finally:
        svc.close()
    assert isinstance(result, S3OperationError)
    assert result.kind is ErrorKind.RETRYABLE


@pytest.mark.s3fast
def test_a_request_that_hangs_is_cut_by_the_read_timeout(s3fast: Callable[..., S3Fast]) -> None:
    server = s3fast("-fault-ops", "CopyObject", "-latency", "5s")
    _, src, dst = seed(server.endpoint, ["a.png"])
    svc = service(server.endpoint, max_attempts=1, read_timeout=0.5)
    try:
        [result] = svc.copy_many(src, dst, [CopyItem("in/a.png", "a.png", "e")], if_absent=False)
    finally:
        svc.close()
    assert isinstance(result, S3OperationError)
    assert result.kind is ErrorKind.RETRYABLE


@pytest.mark.s3fast
def test_stop_leaves_the_remaining_requests_unsent(s3fast: Callable[..., S3Fast]) -> None:
    server = s3fast("-latency", "20ms")
    client, src, dst = seed(server.endpoint, ["a.png"])
    etag = client.head_object(Bucket=src, Key="in/a.png")["ETag"].strip('"')
    svc = service(server.endpoint)
    stop = Flag()
    server.reset_stats()

    def stop_after_some_copies() -> None:
        while server.stats()["ops"].get("CopyObject", 0) < 50:
            time.sleep(0.005)
        stop.value = True

    threading.Thread(target=stop_after_some_copies, daemon=True).start()
    try:
        results = svc.copy_many(
            src,
            dst,
            [CopyItem("in/a.png", f"{i}", etag) for i in range(2000)],
            if_absent=False,
            stop=stop,
        )
    finally:
        svc.close()
    sent = [r for r in results if r is not None]
    assert 50 <= len(sent) < 1000
    assert all(r == etag for r in sent)  # what was sent finished and was recorded
    assert server.stats()["ops"]["CopyObject"] == len(sent)
