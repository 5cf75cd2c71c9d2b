"""Key rules end to end (moto, SQLite and Postgres): a regex rewrite with include/exclude
moves exactly the selected objects to the right keys and rewrites their app rows; a rule that
maps two sources to one destination is refused across pages by the ledger, which stays
consistent, and a re-plan with a fixed rule takes over the rows already planned."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from rich.console import Console

from migrator.errors import ConfigError
from migrator.ledger.repo import Ledger, Planned, open_ledger, utcnow
from migrator.ledger.tables import State, objects
from migrator.supervisor import run_job
from tests.helpers import app_paths, expected_untouched, list_keys, make_job, read, run_cli

RULE = {
    "pattern": r"^image/(\d+)/(.*)$",
    "replace": r"avatar/\1/\2",
    "include": ["image/**/*.png"],
    "exclude": ["**/tmp/*"],
}
# source key -> destination key, or None: not selected, must stay where it is
KEYS: dict[str, str | None] = {
    "image/1/a.png": "avatar/1/a.png",
    "image/1/x/y/b.png": "avatar/1/x/y/b.png",
    "image/22/c.png": "avatar/22/c.png",
    "image/1/tmp/d.png": None,  # excluded
    "image/3/e.jpg": None,  # not included
    "image/x/f.png": None,  # included, the pattern does not match
    "image/g.png": None,  # included, the pattern does not match
}


def test_regex_rule_moves_exactly_the_selected_objects(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, db_urls: dict[str, str]
) -> None:
    job = make_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        ledger=db_urls["ledger"],
        app=db_urls["app"],
        keys=list(KEYS),
        key_rule=RULE,
    )
    src, dst = job.cfg.source.bucket, job.cfg.destination.bucket

    preview = run_cli("run", "--dry-run", "--config", str(job.config_path))
    assert preview.returncode == 0, preview.stderr
    assert "would skip     2 excluded, 2 not matched" in preview.stdout
    assert "would copy     3 objects" in preview.stdout
    assert "e.g. copy image/1/x/y/b.png -> avatar/1/x/y/b.png" in preview.stdout
    assert list_keys(moto_s3, dst) == set()

    assert run_job(job.cfg, console=Console(stderr=True, quiet=True)) == 0

    moved = {k: d for k, d in KEYS.items() if d is not None}
    stayed = {k for k, d in KEYS.items() if d is None}
    assert list_keys(moto_s3, dst) == set(moved.values())
    for obj in job.objects:
        if obj.key in moved:
            assert read(moto_s3, dst, moved[obj.key]) == obj.body
    assert list_keys(moto_s3, src) == stayed  # selected sources deleted, the others kept
    paths = app_paths(job)
    assert paths[: len(KEYS)] == [KEYS[o.key] or o.key for o in job.objects]
    assert paths[len(KEYS) :] == expected_untouched(job)

    # The independent audit agrees: the sources left are not the job's.
    verify = run_cli("verify", "--config", str(job.config_path))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # A re-plan lists the four sources left and plans none of them again.
    plan = run_cli("plan", "--config", str(job.config_path))
    assert plan.returncode == 0, plan.stderr
    assert "4 listed, 0 new, 0 changed, 0 unchanged, 2 excluded, 2 not matched" in plan.stderr
    status = run_cli("status", "--json", "--config", str(job.config_path))
    assert json.loads(status.stdout)["counts"]["done"] == 3
    assert json.loads(status.stdout)["total"] == 3


# -- the ledger: collisions across pages, re-plans with a changed rule ------------------------


def rows(pairs: list[tuple[str, str]]) -> list[Planned]:
    return [
        Planned(k, d, 10, hashlib.md5(k.encode()).hexdigest(), utcnow().replace(microsecond=0))
        for k, d in pairs
    ]


def dests(ledger: Ledger) -> dict[str, tuple[str, str]]:
    with ledger.engine.connect() as conn:
        found = conn.execute(
            sa.select(objects.c.source_key, objects.c.dest_key, objects.c.state).where(
                objects.c.job == ledger.job
            )
        ).all()
    return {k: (d, s) for k, d, s in found}


@pytest.fixture
def ledger(db_urls: dict[str, str]) -> Any:
    engine = open_ledger(db_urls["ledger"])
    led = Ledger(engine, "keys")
    led.ensure_job("s3://legacy/image/", "s3://production/avatar/")
    yield led
    engine.dispose()


def test_collision_across_pages_names_both_keys_and_writes_nothing(ledger: Ledger) -> None:
    first = rows([("image/a/1.png", "avatar/1.png"), ("image/a/2.png", "avatar/2.png")])
    assert ledger.upsert_page(first, replan=False).added == 2
    second = rows([("image/b/0.png", "avatar/0.png"), ("image/b/2.png", "avatar/2.png")])
    with pytest.raises(ConfigError) as info:
        ledger.upsert_page(second, replan=False)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    assert "'image/a/2.png' and 'image/b/2.png' both map to 'avatar/2.png'" in message
    # The refused page is rolled back whole: not even its innocent row is in.
    assert set(dests(ledger)) == {"image/a/1.png", "image/a/2.png"}
    assert ledger.counts()["pending"] == 2
    # The same destination in another job is no collision.
    other = Ledger(ledger.engine, "other-keys")
    other.ensure_job("s3://legacy/image/", "s3://production/avatar/")
    assert other.upsert_page(second, replan=False).added == 2


def test_replan_remaps_and_drops_never_copied_rows_only(ledger: Ledger) -> None:
    old = rows([(f"image/{c}/1.png", f"avatar/1-{c}.png") for c in "abcdef"])
    ledger.upsert_page(old, replan=False)
    copied = ledger.claim("w", [State.PENDING], 3, 60)  # image/a, image/b, image/c
    done = ledger.record_copied("w", [(r.id, r.etag) for r in copied], release=True)
    assert len(done) == 3
    # image/b and image/c change at the source: back to pending, their dest_etag kept.
    changed = [
        Planned(p.source_key, p.dest_key, p.size, "changed", p.last_modified) for p in old[1:3]
    ]
    assert ledger.upsert_page(changed).reset == 2
    # The fixed rule: image/<c>/1.png -> avatar/<c>/1.png; image/c and image/f are no longer
    # selected.
    new = rows([(f"image/{c}/1.png", f"avatar/{c}/1.png") for c in "abde"])
    res = ledger.upsert_page(new, ["image/c/1.png", "image/f/1.png"], replan=True)
    assert (res.added, res.remapped, res.dropped) == (0, 2, 1)
    assert dests(ledger) == {
        # a verified copy was recorded: the key stays, whatever the rule says now
        "image/a/1.png": ("avatar/1-a.png", "copied"),
        "image/b/1.png": ("avatar/1-b.png", "pending"),
        "image/c/1.png": ("avatar/1-c.png", "pending"),
        # never copied: the current rule decides
        "image/d/1.png": ("avatar/d/1.png", "pending"),
        "image/e/1.png": ("avatar/e/1.png", "pending"),
    }
    assert ledger.counts()["pending"] == 4 and ledger.counts()["copied"] == 1
    # Never-copied rows may take keys others give up in the same page, in any row order.
    for chain in (
        [("image/d/1.png", "avatar/x.png"), ("image/e/1.png", "avatar/d/1.png")],
        [("image/d/1.png", "avatar/d/1.png"), ("image/e/1.png", "avatar/x.png")],  # a swap
    ):
        assert ledger.upsert_page(rows(chain), replan=True).remapped == 2
        assert {k: dests(ledger)[k][0] for k, _ in chain} == dict(chain)
    assert ledger.counts()["pending"] == 4 and ledger.counts()["copied"] == 1
    # But not a key that a copied row holds.
    clash = re.escape("'image/a/1.png' and 'image/d/1.png' both map to 'avatar/1-a.png'")
    with pytest.raises(ConfigError, match=clash):
        ledger.upsert_page(rows([("image/d/1.png", "avatar/1-a.png")]), replan=True)
    assert dests(ledger)["image/d/1.png"] == ("avatar/d/1.png", "pending")


def test_replan_leaves_rows_a_worker_holds_alone(ledger: Ledger) -> None:
    """A pending row under a live lease may have its copy in flight: a re-plan with a changed
    rule neither drops it nor gives it a new key (its copy would land under a key no row
    names); once the lease is gone, the next re-plan does."""
    old = rows([(f"image/{c}/1.png", f"avatar/1-{c}.png") for c in "ab"])
    ledger.upsert_page(old, replan=False)
    held = ledger.claim("w", [State.PENDING], 2, 60)
    assert len(held) == 2
    new = rows([("image/a/1.png", "avatar/a/1.png")])
    res = ledger.upsert_page(new, ["image/b/1.png"], replan=True)
    assert (res.remapped, res.dropped) == (0, 0)
    assert dests(ledger) == {
        "image/a/1.png": ("avatar/1-a.png", "pending"),
        "image/b/1.png": ("avatar/1-b.png", "pending"),
    }
    ledger.release("w")
    res = ledger.upsert_page(new, ["image/b/1.png"], replan=True)
    assert (res.remapped, res.dropped) == (1, 1)
    assert dests(ledger) == {"image/a/1.png": ("avatar/a/1.png", "pending")}
