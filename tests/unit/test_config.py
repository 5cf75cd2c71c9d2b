"""config.yaml validation: every problem is one clear line, and no password ever shows."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from migrator.config import ENV_APP_DB_URL, ENV_LEDGER, Config, load_config
from migrator.errors import ConfigError, redact
from migrator.storage.attributes import DEFAULT_ATTRIBUTES

PASSWORD = "s3cretpw"
ROLE = "arn:aws:iam::123456789012:role/migrator"
PG_WITH_PASSWORD = f"postgresql+psycopg2://u:{PASSWORD}@db.example.com/app"


def base() -> dict[str, Any]:
    """A valid configuration; each case breaks one thing."""
    return {
        "job": "avatars",
        "ledger": "sqlite:///migrator.db",
        "source": {"bucket": "legacy", "prefix": "image/", "endpoint_url": "http://127.0.0.1:5000"},
        "destination": {
            "bucket": "production",
            "prefix": "avatar/",
            "endpoint_url": "http://127.0.0.1:5000",
        },
        "app_db": {"url": "sqlite:///app.db", "table": "avatars", "column": "path"},
        "workers": 4,
        "concurrency": 16,
        "chunk_size": 500,
        "delete_source": "after_all",
    }


def write(tmp_path: Path, data: dict[str, Any] | None = None, text: str | None = None) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False) if text is None else text)
    return path


def problems(path: Path, env: dict[str, str] | None = None) -> list[str]:
    """The lines of the ConfigError that loading ``path`` must raise."""
    with pytest.raises(ConfigError) as info:
        load_config(path, env={} if env is None else env)
    message = str(info.value)
    assert message.strip() == message and message, "message is empty or padded"
    lines = message.split("\n")
    for line in lines:
        assert line.strip(), f"blank line in {message!r}"
        assert "Traceback" not in line and "errors.pydantic.dev" not in line
        assert len(line) < 400, f"line too long to be clear: {line!r}"
    assert info.value.exit_code == 2
    return lines


def mutated(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = copy.deepcopy(base())
    change(data)
    return data


def test_the_base_config_is_valid(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, base()), env={})
    assert isinstance(cfg, Config)
    assert cfg.job == "avatars" and cfg.source.bucket == "legacy"
    assert cfg.destination.prefix == "avatar/" and cfg.delete_source == "after_all"
    assert cfg.app_db is not None and cfg.app_db.column == "path"


def test_defaults_for_optional_keys(tmp_path: Path) -> None:
    data = {
        "job": "j",
        "source": {"bucket": "legacy", "prefix": "image/"},
        "destination": {"bucket": "production", "prefix": "avatar/"},
    }
    cfg = load_config(write(tmp_path, data), env={})
    assert (cfg.workers, cfg.concurrency, cfg.chunk_size) == (4, 32, 1000)
    assert cfg.delete_source == "after_all" and cfg.app_db is None
    assert cfg.source.endpoint_url is None and cfg.source.profile is None
    assert cfg.ledger == f"sqlite:///{(tmp_path / 'migrator.db').resolve()}"


# -- the file itself -----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    (line,) = problems(tmp_path / "nope.yaml")
    assert "nope.yaml" in line and "not found" in line and "--config" in line


def test_directory_instead_of_file(tmp_path: Path) -> None:
    (line,) = problems(tmp_path)
    assert "is a directory" in line


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    text = "job: avatars\nsource:\n  bucket: legacy\n  prefix: [image/\n"
    (line,) = problems(write(tmp_path, text=text))
    assert "YAML syntax error" in line
    assert "at line 5, column 1" in line  # the unclosed flow sequence ends at end of file
    assert line.startswith(str(tmp_path / "config.yaml"))


def test_yaml_tab_indentation(tmp_path: Path) -> None:
    (line,) = problems(write(tmp_path, text="job: avatars\n\tsource: x\n"))
    assert "YAML syntax error at line 2, column 1" in line


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"job: \xff\xfe avatars\n")
    (line,) = problems(path)
    assert "UTF-8" in line


@pytest.mark.parametrize("text", ["- job\n- source\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    (line,) = problems(write(tmp_path, text=text))
    assert "expected a mapping" in line


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file_lists_each_required_key(tmp_path: Path, text: str) -> None:
    lines = problems(write(tmp_path, text=text))
    assert len(lines) == 3
    assert [line.split(": ")[1] for line in lines] == ["job", "source", "destination"]
    assert all(line.endswith(": is required") for line in lines)


@pytest.mark.parametrize("key", ["job", "source", "destination"])
def test_missing_required_key(tmp_path: Path, key: str) -> None:
    (line,) = problems(write(tmp_path, mutated(lambda d: d.pop(key))))
    assert line.endswith(f": {key}: is required")


def test_missing_nested_bucket(tmp_path: Path) -> None:
    (line,) = problems(write(tmp_path, mutated(lambda d: d["destination"].pop("bucket"))))
    assert line.endswith(": destination.bucket: is required")


def test_missing_app_db_column(tmp_path: Path) -> None:
    (line,) = problems(write(tmp_path, mutated(lambda d: d["app_db"].pop("column"))))
    assert ": app_db: column is required (or give targets" in line


# -- unknown keys and credentials ----------------------------------------------------------


def test_unknown_key_suggests_workers(tmp_path: Path) -> None:
    (line,) = problems(write(tmp_path, mutated(lambda d: d.update(worker=3))))
    assert ": worker: unknown key (did you mean 'workers'?)" in line


def test_misspelled_section_suggests_source(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["sourec"] = d.pop("source")

    lines = problems(write(tmp_path, mutated(change)))
    assert len(lines) == 2  # the misspelt key, and the missing section it should have been
    assert any("sourec: unknown key (did you mean 'source'?)" in line for line in lines)
    assert any(line.endswith(": source: is required") for line in lines)


def test_nested_unknown_key_suggests_bucket(tmp_path: Path) -> None:
    (line,) = problems(write(tmp_path, mutated(lambda d: d["source"].update(bucktet="x"))))
    assert "source.bucktet: unknown key (did you mean 'bucket'?)" in line


def test_unknown_key_without_a_close_match_has_no_suggestion(tmp_path: Path) -> None:
    (line,) = problems(write(tmp_path, mutated(lambda d: d.update(colour="blue"))))
    assert line.endswith(": colour: unknown key")


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("source", "aws_secret_access_key"),
        ("destination", "aws_access_key_id"),
        ("source", "aws_session_token"),
        (None, "secret_key"),
        ("app_db", "password"),
    ],
)
def test_credentials_in_config_are_rejected(tmp_path: Path, section: str | None, key: str) -> None:
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

    def change(d: dict[str, Any]) -> None:
        (d[section] if section else d)[key] = secret

    (line,) = problems(write(tmp_path, mutated(change)))
    where = f"{section}.{key}" if section else key
    assert f": {where}: unknown key" in line
    assert "credentials never go in config.yaml" in line and "AWS credential chain" in line
    assert secret not in line


# -- values --------------------------------------------------------------------------------

VALUE_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    ("workers-string", lambda d: d.update(workers="many"), "workers", "valid integer"),
    ("workers-0", lambda d: d.update(workers=0), "workers", "greater than or equal to 1"),
    ("workers-1000", lambda d: d.update(workers=1000), "workers", "less than or equal to 64"),
    ("workers-float", lambda d: d.update(workers=2.5), "workers", "integer"),
    ("concurrency-0", lambda d: d.update(concurrency=0), "concurrency", "greater than or equal"),
    ("chunk-0", lambda d: d.update(chunk_size=0), "chunk_size", "greater than or equal to 1"),
    ("chunk-neg", lambda d: d.update(chunk_size=-5), "chunk_size", "greater than or equal"),
    (
        "bucket-upper",
        lambda d: d["source"].update(bucket="Legacy_Bucket"),
        "source.bucket",
        "not a valid S3 bucket name",
    ),
    (
        "bucket-short",
        lambda d: d["destination"].update(bucket="ab"),
        "destination.bucket",
        "not a valid S3 bucket name",
    ),
    (
        "endpoint-scheme",
        lambda d: d["source"].update(endpoint_url="ftp://127.0.0.1:5000"),
        "source.endpoint_url",
        "not an http(s) URL",
    ),
    (
        "endpoint-bare",
        lambda d: d["destination"].update(endpoint_url="localhost:9000"),
        "destination.endpoint_url",
        "not an http(s) URL",
    ),
    ("ledger-garbage", lambda d: d.update(ledger="not a url"), "ledger", "not a database URL"),
    (
        "ledger-mysql",
        lambda d: d.update(ledger="mysql+pymysql://u@127.0.0.1/ledger"),
        "ledger",
        "'mysql' is not supported here; use one of sqlite, postgresql",
    ),
    (
        "app-db-oracle",
        lambda d: d["app_db"].update(url="oracle://u@h/app"),
        "app_db.url",
        "'oracle' is not supported",
    ),
    (
        "app-db-empty-table",
        lambda d: d["app_db"].update(table=""),
        "app_db.table",
        "at least 1 character",
    ),
    (
        "app-db-mysql-without-pymysql",
        lambda d: d["app_db"].update(url="mysql://u@h/app"),
        "app_db.url",
        "use mysql+pymysql://user@host/db",
    ),
    (
        "app-value-without-key",
        lambda d: d["app_db"].update(value="https://legacy.s3.amazonaws.com/"),
        "app_db.value",
        "must contain {key} exactly once",
    ),
    (
        "app-value-key-twice",
        lambda d: d["app_db"].update(new_value="{key}?{key}"),
        "app_db.new_value",
        "must contain {key} exactly once",
    ),
    (
        "app-value-other-field",
        lambda d: d["app_db"].update(value="https://{bucket}.s3.amazonaws.com/{key}"),
        "app_db.value",
        "no braces other than {key}",
    ),
    (
        "app-value-typo",
        lambda d: d["app_db"].update(value="https://cdn/{kye}"),
        "app_db.value",
        "exactly once",
    ),
    (
        "app-value-too-long",
        lambda d: d["app_db"].update(value="x" * 1000 + "{key}"),
        "app_db.value",
        "longer than 1000 characters",
    ),
    (
        "app-targets-and-table",
        lambda d: d["app_db"].update(targets=[{"table": "t", "column": "c"}]),
        "app_db",
        "give table and column (one target) or targets (a list), not both",
    ),
    (
        "app-target-without-column",
        lambda d: d.update(app_db={"url": "sqlite:///app.db", "targets": [{"table": "t"}]}),
        "app_db.targets.0.column",
        "is required",
    ),
    (
        "app-target-unknown-key",
        lambda d: d.update(
            app_db={
                "url": "sqlite:///a.db",
                "targets": [{"table": "t", "column": "c", "vlaue": "x"}],
            }
        ),
        "app_db.targets.0.vlaue",
        "did you mean 'value'?",
    ),
    (
        "app-target-bad-template",
        lambda d: d.update(
            app_db={
                "url": "sqlite:///app.db",
                "targets": [{"table": "t", "column": "c", "new_value": "https://cdn/"}],
            }
        ),
        "app_db.targets.0.new_value",
        "exactly once",
    ),
    (
        "app-targets-twice",
        lambda d: d.update(
            app_db={"url": "sqlite:///app.db", "targets": [{"table": "t", "column": "c"}] * 2}
        ),
        "app_db",
        "t.c with value '{key}' is listed twice",
    ),
    (
        "app-new-values-look-like-old-ones",
        lambda d: d["app_db"].update(new_value="image/{key}"),
        "(top level)",
        "could be the same text",
    ),
    (
        "delete-source",
        lambda d: d.update(delete_source="sometimes"),
        "delete_source",
        "'after_all', 'per_chunk' or 'never'",
    ),
    ("job-name", lambda d: d.update(job="my job!"), "job", "letters, digits"),
    (
        "role-arn-not-a-role",
        lambda d: d["source"].update(role_arn="arn:aws:iam::123456789012:user/migrator"),
        "source.role_arn",
        "is not an IAM role ARN, e.g. arn:aws:iam::123456789012:role/migrator",
    ),
    (
        "role-arn-trailing-newline",
        lambda d: d["source"].update(role_arn=ROLE + "\n"),
        "source.role_arn",
        "is not an IAM role ARN",
    ),
    (
        "role-arn-short-account",
        lambda d: d["destination"].update(role_arn="arn:aws:iam::1234:role/migrator"),
        "destination.role_arn",
        "is not an IAM role ARN",
    ),
    (
        "external-id-spaces",
        lambda d: d["source"].update(role_arn=ROLE, external_id="has spaces"),
        "source.external_id",
        "must be 2-1224 letters, digits or characters",
    ),
    (
        "session-name-too-long",
        lambda d: d["source"].update(role_arn=ROLE, role_session_name="s" * 65),
        "source.role_session_name",
        "must be 2-64 letters",
    ),
    (
        "external-id-without-role",
        lambda d: d["destination"].update(external_id="abc"),
        "destination",
        "external_id is used only with role_arn; add role_arn or remove it",
    ),
    ("copy-mode-unknown", lambda d: d.update(copy_mode="fast"), "copy_mode", "'auto', 'server'"),
    (
        "copy-mode-server-across-endpoints",
        lambda d: (
            d.update(copy_mode="server")
            or d["destination"].update(endpoint_url="http://127.0.0.1:5001")
        ),
        "copy_mode",
        "server needs source and destination on the same endpoint_url",
    ),
    ("versions-unknown", lambda d: d.update(versions="newest"), "versions", "'latest' or 'all'"),
    (
        "delete-versions-not-bool",
        lambda d: d.update(delete_versions="yes"),
        "delete_versions",
        "valid boolean",
    ),
    ("source-not-mapping", lambda d: d.update(source="legacy"), "source", "valid dictionary"),
    ("source-null", lambda d: d.update(source=None), "source", "valid dictionary"),
    # object attributes
    ("metadata-mode", lambda d: d.update(metadata="merge"), "metadata", "'copy' or 'replace'"),
    (
        "metadata-replace-without-values",
        lambda d: d.update(metadata="replace"),
        "metadata_values",
        "is required with metadata: replace",
    ),
    (
        "metadata-values-without-replace",
        lambda d: d.update(metadata_values={"content_type": "image/png"}),
        "metadata_values",
        "is used only with metadata: replace",
    ),
    (
        "metadata-content-type",
        lambda d: d.update(metadata="replace", metadata_values={"content_type": "png"}),
        "metadata_values.content_type",
        "not a media type such as image/png",
    ),
    (
        "metadata-header-newline",
        lambda d: d.update(metadata="replace", metadata_values={"cache_control": "a\nb"}),
        "metadata_values.cache_control",
        "printable ASCII on one line",
    ),
    (
        "metadata-header-not-ascii",
        lambda d: d.update(metadata="replace", metadata_values={"content_language": "dé"}),
        "metadata_values.content_language",
        "printable ASCII",
    ),
    (
        "metadata-expires-number",
        lambda d: d.update(metadata="replace", metadata_values={"expires": 2031}),
        "metadata_values.expires",
        "not a date and time; write e.g. 2031-01-01T00:00:00Z",
    ),
    (
        "metadata-expires-text",
        lambda d: d.update(metadata="replace", metadata_values={"expires": "next year"}),
        "metadata_values.expires",
        "datetime",
    ),
    (
        "metadata-user-name",
        lambda d: d.update(metadata="replace", metadata_values={"user": {"X-Amz-Meta-A": "b"}}),
        "metadata_values.user",
        "lowercase letters, digits",
    ),
    (
        "metadata-user-too-large",
        lambda d: d.update(metadata="replace", metadata_values={"user": {"a": "x" * 2100}}),
        "metadata_values.user",
        "S3 keeps at most 2048",
    ),
    (
        "metadata-unknown-field",
        lambda d: d.update(metadata="replace", metadata_values={"content_typ": "image/png"}),
        "metadata_values.content_typ",
        "did you mean 'content_type'?",
    ),
    (
        "tags-replace-without-values",
        lambda d: d.update(tags="replace"),
        "tag_values",
        "is required with tags: replace",
    ),
    (
        "tag-values-without-replace",
        lambda d: d.update(tag_values={"a": "b"}),
        "tag_values",
        "is used only with tags: replace",
    ),
    (
        "tags-too-many",
        lambda d: d.update(tags="replace", tag_values={f"k{i}": "v" for i in range(11)}),
        "tag_values",
        "at most 10 per object",
    ),
    (
        "tag-aws-prefix",
        lambda d: d.update(tags="replace", tag_values={"aws:owner": "me"}),
        "tag_values",
        "not start with aws:",
    ),
    (
        "tag-bad-character",
        lambda d: d.update(tags="replace", tag_values={"owner": "a&b"}),
        "tag_values",
        "only letters, digits, spaces",
    ),
    (
        "storage-class",
        lambda d: d.update(storage_class="COLD"),
        "storage_class",
        "not a storage class: use copy (each object keeps its own) or one of STANDARD,",
    ),
    ("sse", lambda d: d.update(sse="kms"), "sse", "'AES256' or 'aws:kms'"),
    (
        "kms-key-without-sse-kms",
        lambda d: d.update(sse="AES256", kms_key_id="alias/avatars"),
        "kms_key_id",
        "is used only with sse: aws:kms",
    ),
    (
        "kms-key-format",
        lambda d: d.update(sse="aws:kms", kms_key_id="my key"),
        "kms_key_id",
        "give its key id, key ARN, alias/NAME or alias ARN",
    ),
    (
        "acl",
        lambda d: d.update(acl="owner-full-control"),
        "acl",
        "not a canned ACL: use one of private, public-read,",
    ),
]


@pytest.mark.parametrize(
    ("change", "where", "says"),
    [pytest.param(c, w, s, id=i) for i, c, w, s in VALUE_CASES],
)
def test_bad_value(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], where: str, says: str
) -> None:
    (line,) = problems(write(tmp_path, mutated(change)))
    assert line.startswith(f"{tmp_path / 'config.yaml'}: {where}: "), line
    assert says in line


@pytest.mark.parametrize("where", ["ledger", "app_db.url", "env"])
def test_url_with_a_non_numeric_port_is_a_config_error(tmp_path: Path, where: str) -> None:
    """SQLAlchemy's make_url raises ValueError (not ArgumentError) for ``host:port``."""
    url = "postgresql+psycopg2://postgres@127.0.0.1:fivefourthreetwo/db"
    data = base()
    env: dict[str, str] = {}
    if where == "ledger":
        data["ledger"] = url
    elif where == "app_db.url":
        data["app_db"]["url"] = url
    else:
        env[ENV_LEDGER] = url
    (line,) = problems(write(tmp_path, data), env=env)
    assert f": {'ledger' if where == 'env' else where}: " in line


def test_several_problems_give_one_line_each(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d.update(workers=0, concurrency="lots", delete_source="maybe", worker=2)
        d["source"]["bucket"] = "UPPER"

    lines = problems(write(tmp_path, mutated(change)))
    wheres = sorted(line.split(": ")[1] for line in lines)
    assert wheres == ["concurrency", "delete_source", "source.bucket", "worker", "workers"]


# -- prefixes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("image/", "image/avatar/"),  # destination inside source
        ("image/avatar/", "image/"),  # source inside destination
        ("image/", "image/"),
        ("", "avatar/"),  # the whole bucket
    ],
)
def test_overlapping_prefixes_on_the_same_bucket(tmp_path: Path, src: str, dst: str) -> None:
    def change(d: dict[str, Any]) -> None:
        d["source"]["prefix"] = src
        d["destination"].update(bucket="legacy", prefix=dst)

    (line,) = problems(write(tmp_path, mutated(change)))
    assert "overlaps source prefix" in line and "'legacy'" in line
    assert repr(src) in line and repr(dst) in line


def test_same_prefix_on_different_buckets_is_fine(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, mutated(lambda d: d["destination"].update(prefix="image/"))), env={}
    )
    assert cfg.source.prefix == cfg.destination.prefix == "image/"


def test_disjoint_prefixes_on_the_same_bucket_are_fine(tmp_path: Path) -> None:
    data = mutated(lambda d: d["destination"].update(bucket="legacy", prefix="avatar/"))
    cfg = load_config(write(tmp_path, data), env={})
    assert cfg.source.bucket == cfg.destination.bucket == "legacy"


# -- environment overrides -----------------------------------------------------------------


def test_env_overrides_ledger(tmp_path: Path) -> None:
    url = "postgresql+psycopg2://postgres@127.0.0.1:5432/ledger"
    cfg = load_config(write(tmp_path, base()), env={ENV_LEDGER: url})
    assert cfg.ledger == url


def test_env_overrides_app_db_url_and_keeps_table_and_column(tmp_path: Path) -> None:
    url = "postgresql+psycopg2://postgres@127.0.0.1:5432/app"
    cfg = load_config(write(tmp_path, base()), env={ENV_APP_DB_URL: url})
    assert cfg.app_db is not None
    assert (cfg.app_db.url, cfg.app_db.table, cfg.app_db.column) == (url, "avatars", "path")


def test_empty_env_values_do_not_override(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, base()), env={ENV_LEDGER: "", ENV_APP_DB_URL: ""})
    assert cfg.ledger.endswith("/migrator.db")
    assert cfg.app_db is not None and cfg.app_db.url.endswith("/app.db")


def test_env_app_db_url_without_app_db_section(tmp_path: Path) -> None:
    path = write(tmp_path, mutated(lambda d: d.pop("app_db")))
    (line,) = problems(path, env={ENV_APP_DB_URL: "sqlite:///app.db"})
    assert ENV_APP_DB_URL in line and "no app_db section" in line


def test_bad_env_ledger_is_reported_as_ledger(tmp_path: Path) -> None:
    (line,) = problems(write(tmp_path, base()), env={ENV_LEDGER: "mysql://u@h/db"})
    assert ": ledger: " in line and "'mysql' is not supported" in line


def test_load_config_reads_os_environ_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "postgresql+psycopg2://postgres@127.0.0.1:5432/from_env"
    monkeypatch.setenv(ENV_LEDGER, url)
    monkeypatch.delenv(ENV_APP_DB_URL, raising=False)
    assert load_config(write(tmp_path, base())).ledger == url


# -- relative SQLite paths -----------------------------------------------------------------


def test_relative_sqlite_paths_are_anchored_at_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = mutated(lambda d: d.update(ledger="sqlite:///state/ledger.db"))
    path = conf_dir / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(Path("..") / "conf" / "config.yaml", env={})
    assert cfg.ledger == f"sqlite:///{(conf_dir / 'state' / 'ledger.db').resolve()}"
    assert cfg.app_db is not None
    assert cfg.app_db.url == f"sqlite:///{(conf_dir / 'app.db').resolve()}"
    assert cfg.ledger_url.database == str((conf_dir / "state" / "ledger.db").resolve())


@pytest.mark.parametrize("ledger", ["sqlite:////var/lib/migrator/l.db", "sqlite://"])
def test_absolute_and_memory_sqlite_urls_are_kept(tmp_path: Path, ledger: str) -> None:
    cfg = load_config(write(tmp_path, mutated(lambda d: d.update(ledger=ledger))), env={})
    assert cfg.ledger == ledger


# -- secrets -------------------------------------------------------------------------------

SECRET_CASES: list[tuple[str, Callable[[dict[str, Any]], None], dict[str, str]]] = [
    (
        "app-db-url-and-bad-workers",
        lambda d: d.update(workers=0, app_db={**d["app_db"], "url": PG_WITH_PASSWORD}),
        {},
    ),
    (
        "app-db-url-and-unknown-key",
        lambda d: d["app_db"].update(url=PG_WITH_PASSWORD, colum="path"),
        {},
    ),
    (
        "unsupported-ledger-with-password",
        lambda d: d.update(ledger=f"mysql://root:{PASSWORD}@h/ledger"),
        {},
    ),
    (
        "unsupported-app-db-with-password",
        lambda d: d["app_db"].update(url=f"oracle://scott:{PASSWORD}@h/orcl"),
        {},
    ),
    (
        "env-ledger-with-password-and-bad-bucket",
        lambda d: d["source"].update(bucket="Bad_Bucket"),
        {ENV_LEDGER: f"postgresql+psycopg2://u:{PASSWORD}@h/ledger"},
    ),
    (
        "env-app-db-url-without-app-db-section",
        lambda d: d.pop("app_db"),
        {ENV_APP_DB_URL: PG_WITH_PASSWORD},
    ),
    (
        "ledger-port-not-a-number",
        lambda d: d.update(ledger=f"postgresql+psycopg2://u:{PASSWORD}@h:port/ledger"),
        {},
    ),
    (
        "endpoint-url-with-userinfo",
        lambda d: d["source"].update(endpoint_url=f"ftp://admin:{PASSWORD}@minio:9000"),
        {},
    ),
]


@pytest.mark.parametrize(("change", "env"), [pytest.param(c, e, id=i) for i, c, e in SECRET_CASES])
def test_no_password_in_config_errors(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], env: dict[str, str]
) -> None:
    lines = problems(write(tmp_path, mutated(change)), env=env)
    for line in lines:
        assert PASSWORD not in line, line


# -- redact --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"could not connect to {PG_WITH_PASSWORD}: timeout",
            "could not connect to postgresql+psycopg2://u:***@db.example.com/app: timeout",
        ),
        (
            "mysql://root:pa%40ss@h/db and postgresql://x:y2@h2:5432/d",
            "mysql://root:***@h/db and postgresql://x:***@h2:5432/d",
        ),
        ("postgresql://u@h/db", "postgresql://u@h/db"),  # nothing to hide
        ("http://127.0.0.1:9000/bucket/key", "http://127.0.0.1:9000/bucket/key"),
        ("plain text, no URL", "plain text, no URL"),
    ],
)
def test_redact_masks_url_passwords(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "name", ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"]
)
def test_redact_masks_aws_credentials_from_the_environment(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = f"{name.lower()}-VALUE-1234567890"
    monkeypatch.setenv(name, value)
    out = redact(f"signature failed for {value} (again: {value})")
    assert value not in out
    assert out == "signature failed for *** (again: ***)"


def test_redact_leaves_very_short_env_values_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")  # masking "x" would garble every message
    assert redact("x marks the spot") == "x marks the spot"


# -- app_db: value templates, targets, MySQL ----------------------------------------------


def test_app_db_single_form_is_one_target_with_bare_keys(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, base()), env={})
    assert cfg.app_db is not None
    (t,) = cfg.app_db.all_targets
    assert (t.table, t.column, t.old, t.new) == ("avatars", "path", "{key}", "{key}")
    assert t.old.render("image/1.png") == "image/1.png"


def test_app_db_templates_and_targets(tmp_path: Path) -> None:
    data = base()
    data["app_db"] = {
        "url": "mysql+pymysql://root@127.0.0.1:3306/app",
        "targets": [
            {"table": "avatars", "column": "path"},
            {
                "table": "avatars",
                "column": "path",
                "value": "https://legacy.s3.amazonaws.com/{key}",
                "new_value": "https://cdn.example.com/{key}",
            },
            {"table": "shop.products", "column": "image_url", "value": "/media/{key}?v=1"},
        ],
    }
    cfg = load_config(write(tmp_path, data), env={})
    assert cfg.app_db is not None
    bare, url, media = cfg.app_db.all_targets
    assert bare.old.render("image/1.png") == "image/1.png"
    assert url.old.render("image/1.png") == "https://legacy.s3.amazonaws.com/image/1.png"
    assert url.new.render("avatar/1.png") == "https://cdn.example.com/avatar/1.png"
    # new_value defaults to value: the same text around another key
    assert media.new.render("avatar/1.png") == "/media/avatar/1.png?v=1"
    assert media.old.key_of("/media/image/1.png?v=1") == "image/1.png"
    assert media.old.key_of("/media/image/1.png") is None


def test_single_form_takes_templates_too(tmp_path: Path) -> None:
    data = base()
    data["app_db"]["value"] = "s3://legacy/{key}"
    data["app_db"]["new_value"] = "s3://production/{key}"
    cfg = load_config(write(tmp_path, data), env={})
    assert cfg.app_db is not None
    (t,) = cfg.app_db.all_targets
    assert (t.old, t.new) == ("s3://legacy/{key}", "s3://production/{key}")


def test_mysql_app_db_password_never_shows(tmp_path: Path) -> None:
    data = base()
    data["app_db"]["url"] = f"mysql://root:{PASSWORD}@db.example.com/app"
    (line,) = problems(write(tmp_path, data))
    assert PASSWORD not in line and "mysql+pymysql://" in line


HOOK = "https://hooks.slack.com/services/T0/B0/s3cretHook"


@pytest.mark.parametrize(
    ("notify", "expected"),
    [
        (
            {"webhook_url": "ftp://hooks.example.com/x"},
            "notify.webhook_url: must be an http(s) URL",
        ),
        ({"webhook_url": "https:///no-host"}, "notify.webhook_url: must be an http(s) URL"),
        ({"webhook_url": HOOK + " extra"}, "notify.webhook_url: must be an http(s) URL"),
        ({"webhook_url": HOOK, "events": ["done"]}, "notify.events.0: Input should be"),
        ({"webhook_url": HOOK, "events": []}, "notify.events: list at least one of"),
        ({"webhook_url": HOOK, "timeout_seconds": 0}, "notify.timeout_seconds: Input should be"),
        ({"events": ["started"]}, "notify.webhook_url: is required"),
        ({"webhook_url": HOOK, "event": ["started"]}, "notify.event: unknown key (did you mean"),
    ],
)
def test_bad_notify_is_one_line_and_never_echoes_the_url(
    tmp_path: Path, notify: dict[str, Any], expected: str
) -> None:
    lines = problems(write(tmp_path, mutated(lambda d: d.update(notify=notify))))
    assert len(lines) == 1 and expected in lines[0], lines
    assert "s3cretHook" not in lines[0]


def test_notify_defaults_and_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, mutated(lambda d: d.update(notify={"webhook_url": HOOK})))
    cfg = load_config(path, env={})
    assert cfg.notify is not None and cfg.notify.webhook_url == HOOK
    assert cfg.notify.events == ("started", "stage_completed", "failed", "finished")
    assert cfg.notify.timeout_seconds == 5.0
    assert load_config(write(tmp_path, base()), env={}).notify is None
    from_env = load_config(write(tmp_path, base()), env={"MIGRATOR_WEBHOOK_URL": HOOK})
    assert from_env.notify is not None and from_env.notify.webhook_url == HOOK
    kept = mutated(lambda d: d.update(notify={"webhook_url": "http://x", "events": ["failed"]}))
    both = load_config(write(tmp_path, kept), env={"MIGRATOR_WEBHOOK_URL": HOOK})
    assert both.notify is not None and both.notify.webhook_url == HOOK
    assert both.notify.events == ("failed",)


# -- object attributes ---------------------------------------------------------------------


def test_object_attributes_default_to_what_copy_object_keeps(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, base()), env={})
    assert (cfg.metadata, cfg.tags, cfg.storage_class) == ("copy", "copy", "copy")
    assert (cfg.sse, cfg.kms_key_id, cfg.acl) == (None, None, None)
    assert cfg.attributes == DEFAULT_ATTRIBUTES


def test_object_attributes_set_by_config(tmp_path: Path) -> None:
    text = yaml.safe_dump(base(), sort_keys=False) + (
        "metadata: replace\n"
        "metadata_values:\n"
        "  content_type: image/webp\n"
        "  cache_control: public, max-age=31536000\n"
        "  expires: 2031-01-02 03:04:05\n"  # a YAML timestamp, read as UTC
        "  user: {migrated-by: migrator}\n"
        "tags: replace\n"
        "tag_values: {project: avatars}\n"
        "storage_class: GLACIER_IR\n"
        "sse: aws:kms\n"
        "kms_key_id: arn:aws:kms:eu-west-1:111122223333:alias/avatars\n"
        "acl: bucket-owner-full-control\n"
    )
    attrs = load_config(write(tmp_path, text=text), env={}).attributes
    assert attrs.replace_metadata and attrs.replace_tags
    assert dict(attrs.content) == {
        "content_type": "image/webp",
        "cache_control": "public, max-age=31536000",
        "expires": datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC),
    }
    assert attrs.user == (("migrated-by", "migrator"),)
    assert attrs.tags == (("project", "avatars"),)
    assert (attrs.storage_class, attrs.sse, attrs.acl) == (
        "GLACIER_IR",
        "aws:kms",
        "bucket-owner-full-control",
    )
    assert attrs.kms_key_id == "arn:aws:kms:eu-west-1:111122223333:alias/avatars"


@pytest.mark.parametrize(
    "key",
    [
        "1234abcd-12ab-34cd-56ef-1234567890ab",
        "mrk-1234abcd12ab34cd56ef1234567890ab",
        "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "alias/aws/s3",
        "arn:aws-cn:kms:cn-north-1:111122223333:alias/avatars",
    ],
)
def test_kms_key_forms(tmp_path: Path, key: str) -> None:
    data = mutated(lambda d: d.update(sse="aws:kms", kms_key_id=key))
    assert load_config(write(tmp_path, data), env={}).kms_key_id == key


def test_replace_with_empty_values_is_allowed(tmp_path: Path) -> None:
    """``tag_values: {}`` removes every tag; ``metadata_values: {}`` keeps nothing."""
    data = mutated(
        lambda d: d.update(metadata="replace", metadata_values={}, tags="replace", tag_values={})
    )
    attrs = load_config(write(tmp_path, data), env={}).attributes
    assert attrs.replace_metadata and attrs.content == () and attrs.user == ()
    assert attrs.replace_tags and attrs.tags == ()


# -- copy mode and credentials per side ------------------------------------------------------


def _sides(**changes: dict[str, Any]) -> dict[str, Any]:
    data = base()
    for side, values in changes.items():
        data[side].update(values)
    return data


@pytest.mark.parametrize(
    ("copy_mode", "source", "destination", "streams"),
    [
        ("auto", {}, {}, False),  # one endpoint, one principal: server-side, as before
        ("auto", {}, {"region": "eu-west-1"}, False),  # a cross-region CopyObject
        ("auto", {}, {"endpoint_url": "http://127.0.0.1:5001"}, True),
        ("auto", {"profile": "a"}, {"profile": "b"}, True),
        ("auto", {"profile": "a"}, {"profile": "a", "role_arn": ROLE}, True),
        ("auto", {"profile": "a", "role_arn": ROLE}, {"profile": "a", "role_arn": ROLE}, False),
        ("server", {"profile": "a"}, {"profile": "b"}, False),  # cross-account bucket policy
        ("stream", {}, {}, True),
    ],
)
def test_copy_mode_decides_how_objects_are_copied(
    tmp_path: Path,
    copy_mode: str,
    source: dict[str, Any],
    destination: dict[str, Any],
    streams: bool,
) -> None:
    data = _sides(source=source, destination=destination)
    data["copy_mode"] = copy_mode
    cfg = load_config(write(tmp_path, data), env={})
    assert cfg.streams is streams


def test_role_options_are_kept_per_side(tmp_path: Path) -> None:
    data = _sides(
        source={"profile": "legacy-account"},
        destination={
            "profile": "ops",
            "role_arn": "arn:aws-cn:iam::210987654321:role/path/to/migrator-writer",
            "external_id": "ext:id/1",
            "role_session_name": "migrator@avatars",
        },
    )
    cfg = load_config(write(tmp_path, data), env={})
    assert cfg.copy_mode == "auto"
    assert (cfg.source.profile, cfg.source.role_arn) == ("legacy-account", None)
    dst = cfg.destination
    assert dst.profile == "ops"
    assert dst.role_arn == "arn:aws-cn:iam::210987654321:role/path/to/migrator-writer"
    assert (dst.external_id, dst.role_session_name) == ("ext:id/1", "migrator@avatars")


def test_sse_kms_with_streamed_copies_is_refused_in_one_line(tmp_path: Path) -> None:
    def stream_kms(d: dict[str, Any]) -> None:
        d.update(sse="aws:kms", copy_mode="stream")

    lines = problems(write(tmp_path, mutated(stream_kms)))
    assert len(lines) == 1 and "sse: aws:kms cannot be verified on streamed copies" in lines[0]

    def other_profile(d: dict[str, Any]) -> None:  # auto streams with other credentials
        d.update(sse="aws:kms")
        d["destination"]["profile"] = "other"

    lines = problems(write(tmp_path, mutated(other_profile)))
    assert "copy_mode auto streams here" in lines[0]
    server = mutated(lambda d: d.update(sse="aws:kms", copy_mode="server"))
    server["destination"]["profile"] = "other"
    assert load_config(write(tmp_path, server), env={}).sse == "aws:kms"


def test_streamed_copies_use_smaller_parts_unless_part_size_is_set(tmp_path: Path) -> None:
    """Each part a worker streams is held in memory: 16 MiB parts by default, not 64."""
    server_side = load_config(write(tmp_path, base()), env={})
    assert not server_side.streams and server_side.transfer_part_size == 64 * 2**20

    def streamed(d: dict[str, Any]) -> None:
        d.update(copy_mode="stream")

    stream = load_config(write(tmp_path, mutated(streamed)), env={})
    assert stream.transfer_part_size == 16 * 2**20

    def streamed_with_parts(d: dict[str, Any]) -> None:
        d.update(copy_mode="stream", part_size=8 * 2**20)

    chosen = load_config(write(tmp_path, mutated(streamed_with_parts)), env={})
    assert chosen.transfer_part_size == 8 * 2**20


def test_every_version_needs_server_side_copies(tmp_path: Path) -> None:
    """A version is copied by S3 from its version id; a streamed copy reads only the current
    object, so ``versions: all`` with a streaming copy_mode is refused in one line."""

    def all_streamed(d: dict[str, Any]) -> None:
        d.update(versions="all", copy_mode="stream")

    lines = problems(write(tmp_path, mutated(all_streamed)))
    assert len(lines) == 1 and "versions: all needs server-side copies" in lines[0]
    cfg = load_config(write(tmp_path, mutated(lambda d: d.update(versions="all"))), env={})
    assert cfg.versions == "all" and cfg.lists_versions and not cfg.delete_versions
    latest = load_config(write(tmp_path, mutated(lambda d: d.update(delete_versions=True))), env={})
    assert latest.versions == "latest" and latest.lists_versions
    assert not load_config(write(tmp_path, base()), env={}).lists_versions
