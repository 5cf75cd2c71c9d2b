"""Markdown for ``docs/benchmarks.md`` from a ``bench.compare`` result, and the targets of
issue 5 computed from the 20k set (and the multi-host one from its scenario with CopyObject
latency). Only the text between the markers is ever rewritten."""

from __future__ import annotations

import operator
import re
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
REFERENCE_RCLONE, REFERENCE_AWS = "rclone-tuned", "aws"
LABELS = {
    "migrator-copy": "migrator copy-only",
    "migrator-full": "migrator full job",
    "aws": "`aws s3 sync`, defaults",
    "aws-tuned": "`aws s3 sync`, 64 concurrent requests",
    "rclone": "`rclone copy`, defaults",
    "rclone-tuned": "`rclone copy --transfers 32 --checkers 32`",
}

COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt}

SKELETON = f"""# Benchmarks

The tables below are written by `make bench` (`python -m bench.compare`); everything outside
the `bench` markers is hand-written and kept when they are regenerated.

{BEGIN}
{END}
"""


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None, reference: float | None) -> str:
    if not value or not reference:
        return "–"
    return f"{value / reference:.2f}×"


def _ops(ops: dict[str, int]) -> str:
    return " + ".join(f"{n:,} {op}" for op, n in sorted(ops.items(), key=lambda kv: -kv[1]))


def _ok(row: dict[str, Any]) -> bool:
    return "skipped" not in row and bool(row.get("ok"))


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 5's targets, from the 20k set: value, goal, met or not (None: not measured)."""
    tools = results.get("sets", {}).get("20k", {}).get("tools", {})

    def figure(tool: str, key: str) -> float | None:
        row = tools.get(tool, {})
        return row.get(key) if _ok(row) else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    copy_rate = figure("migrator-copy", "objects_per_s")
    rows = [
        (
            "migrator copy-only obj/s ÷ rclone --transfers 32 obj/s",
            ratio(copy_rate, figure(REFERENCE_RCLONE, "objects_per_s")),
            ">=",
            1.0,
        ),
        (
            "migrator copy-only obj/s ÷ aws s3 sync (defaults) obj/s",
            ratio(copy_rate, figure(REFERENCE_AWS, "objects_per_s")),
            ">=",
            5.0,
        ),
        (
            "migrator copy-only CPU per 1,000 objects ÷ rclone --transfers 32",
            ratio(
                figure("migrator-copy", "cpu_s_per_1000"),
                figure(REFERENCE_RCLONE, "cpu_s_per_1000"),
            ),
            "<=",
            1.5,
        ),
        (
            "migrator copy-only S3 requests per object",
            figure("migrator-copy", "requests_per_object"),
            "<=",
            1.05,
        ),
        (
            "migrator full job S3 requests per object",
            figure("migrator-full", "requests_per_object"),
            "<=",
            1.1,
        ),
        ("migrator full job obj/s", figure("migrator-full", "objects_per_s"), ">=", 1500.0),
        _multihost_target(results.get("multihost_latency", {})),
    ]
    out = []
    for name, value, op, goal in rows:
        met = None if value is None else COMPARE[op](value, goal)
        out.append({"target": name, "value": value, "op": op, "goal": goal, "met": met})
    return out


def _multihost_target(mh: dict[str, Any]) -> tuple[str, float | None, str, float]:
    """Two hosts must beat one. Judged where a host is bound by its requests in flight, as on
    real S3 (the variant with CopyObject latency), not where both share this machine's cores."""
    latency = mh.get("copy_latency_ms")
    name = "multi-host: 2 supervisors ÷ 1 supervisor obj/s (CopyObject latency "
    name += f"{latency:g} ms)" if latency else "injected; not run)"
    return name, _speedup(mh), ">", 1.0


def _speedup(mh: dict[str, Any]) -> float | None:
    """obj/s of the run with two supervisors ÷ that with one; None unless both passed."""
    rates = {r["supervisors"]: r["objects_per_s"] for r in mh.get("runs", []) if r["ok"]}
    return rates[2] / rates[1] if 1 in rates and 2 in rates else None


def _placeholders(text: str, results: dict[str, Any]) -> str:
    """Commands as a reader can type them: the scratch dir and endpoints as variables
    (``$S3``, and ``$S3_LATENCY`` for the server with injected CopyObject latency)."""
    if results.get("workdir"):
        text = text.replace(results["workdir"], "$TMP")
    endpoints = {
        "$S3": results.get("endpoint"),
        "$S3_LATENCY": results.get("multihost_latency", {}).get("endpoint"),
    }
    for name, endpoint in endpoints.items():
        if endpoint:
            host_port = re.escape(endpoint.removeprefix("http://"))
            text = re.sub(rf"http://{host_port}(?!\d)", name, text)
            text = re.sub(rf"{host_port}(?!\d)", f"{name}_HOST_PORT", text)
    return re.sub(r"/run-\d+/", "/run-N/", text)


def _command_lines(results: dict[str, Any]) -> list[str]:
    seen: dict[str, list[str]] = {}
    for entry in results.get("sets", {}).values():
        for tool, row in entry.get("tools", {}).items():
            if tool in seen or "commands" not in row:
                continue
            env = ""
            if tool == "aws-tuned":
                env = "AWS_CONFIG_FILE=$TMP/aws/config-tuned "
            elif tool == "aws":
                env = "AWS_CONFIG_FILE=$TMP/aws/config-default "
            lines = []
            for step in row["commands"]:
                for cmd in step:
                    lines.append(env + _placeholders(" ".join(cmd), results))
            seen[tool] = lines
    out = []
    for tool in LABELS:
        if tool in seen:
            out.append(f"# {LABELS[tool]}")
            out.extend(seen[tool])
    return out + _multihost_command_lines(results)


def _multihost_command_lines(results: dict[str, Any]) -> list[str]:
    """The supervisor's command of each multi-host variant, and how its server was started."""
    out = []
    for key in ("multihost", "multihost_latency"):
        runs = results.get(key, {}).get("runs", [])
        if not runs:
            continue
        flags = " ".join(results[key].get("s3fast_flags", []))
        server = f", on `s3fast {flags}` at $S3_LATENCY" if flags else ""
        out.append(f"# multi-host{server}: `migrator plan` once, then this once per supervisor")
        out.append(_placeholders(" ".join(runs[-1]["commands"][0][0]), results))
    return out


def _set_table(name: str, entry: dict[str, Any]) -> list[str]:
    tools = entry["tools"]
    ref_rclone = tools.get(REFERENCE_RCLONE, {})
    ref_aws = tools.get(REFERENCE_AWS, {})
    rclone_rate = ref_rclone.get("objects_per_s") if _ok(ref_rclone) else None
    aws_rate = ref_aws.get("objects_per_s") if _ok(ref_aws) else None
    lines = [
        f"### {name}: {entry['description']} ({entry['objects']:,} objects, "
        f"{entry['bytes'] / 1e6:,.1f} MB)",
        "",
        "| tool | wall s | obj/s | MB/s | CPU s / 1,000 obj | requests / obj "
        "| peak RSS / PSS MiB | s3fast CPU s | Postgres CPU s "
        "| vs rclone --transfers 32 | vs aws defaults |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    details = []
    for tool in LABELS:
        row = tools.get(tool)
        if row is None:
            continue
        if "skipped" in row:
            reason = " ".join(row["skipped"].split()).replace("|", "/")
            lines.append(f"| {LABELS[tool]} | skipped: {reason} ||||||||||")
            continue
        label = LABELS[tool] if row["ok"] else f"{LABELS[tool]} **FAILED**"
        wall = _num(row["wall_s"], 2)
        if row.get("plan_s") is not None:
            wall += f" ({_num(row['plan_s'], 2)} + {_num(row['run_s'], 2)})"
        lines.append(
            f"| {label} | {wall} | {_num(row['objects_per_s'])} | {_num(row['mb_per_s'], 1)} "
            f"| {_num(row['cpu_s_per_1000'], 2)} | {_num(row['requests_per_object'], 3)} "
            f"| {_num(row['peak_rss_mib'])} / {_num(row['peak_pss_mib'])} "
            f"| {_num(row['server_cpu_s'], 2)} | {_num(row.get('postgres_cpu_s'), 2)} "
            f"| {_ratio(row['objects_per_s'], rclone_rate)} "
            f"| {_ratio(row['objects_per_s'], aws_rate)} |"
        )
        details.append(f"- {LABELS[tool]}: {_ops(row['ops'])}")
        if not row["ok"]:
            details.append(f"  - failed: {'; '.join(row['problems'])[:500]}")
    repeats = max((r.get("repeats", 1) for r in tools.values() if "repeats" in r), default=1)
    runs = f"median of {repeats} runs" if repeats > 1 else "one run"
    lines += ["", f"Requests by operation ({runs}):", ""]
    return [*lines, *details, ""]


def _multihost_table(mh: dict[str, Any]) -> list[str]:
    if "skipped" in mh:
        return [f"Skipped: {mh['skipped']}", ""]
    lines = [
        _multihost_intro(mh),
        "",
        "| supervisors | plan s | run s | obj/s (run) | CPU s / 1,000 obj | CopyObject "
        "| DeleteObjects requests | keys deleted twice, at most | ledger rows retried "
        "| requests / obj | Postgres connections, ledger / app | Postgres CPU s | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for row in mh["runs"]:
        result = "ok" if row["ok"] else "FAILED: " + "; ".join(row["problems"])[:300]
        conns = row.get("pg_connections_peak", {})
        lines.append(
            f"| {row['supervisors']} | {_num(row['plan_s'], 2)} | {_num(row['run_s'], 2)} "
            f"| {_num(row['objects_per_s'])} | {_num(row['cpu_s_per_1000'], 2)} "
            f"| {row['copy_objects']:,} | {row['delete_requests']:,} "
            f"| {row['double_deletes_at_most']:,} | {row['ledger_rows_retried']:,} "
            f"| {_num(row['requests_per_object'], 3)} "
            f"| {conns.get('ledger', '–')} / {conns.get('app', '–')} "
            f"| {_num(row.get('postgres_cpu_s'), 2)} | {result} |"
        )
        notes.append(_ledger_note(row, mh["objects"]))
    speedup = _speedup(mh)
    if speedup is not None:
        lines += ["", f"Two supervisors ÷ one: {speedup:.2f}× the objects/s of the run."]
    lines += [
        "",
        *notes,
        "",
        '"Keys deleted twice, at most": s3fast counts DeleteObjects requests, not keys. A '
        "worker deletes only rows of the chunk it holds, so a request carries at most "
        "`chunk_size` keys; the listing shows every source gone, so at least N distinct keys "
        "were sent; hence keys sent twice ≤ requests × chunk_size − N. Zero proves that no key "
        "was deleted twice. The ledger shows every row `done`.",
        "",
    ]
    return lines


def _multihost_title(mh: dict[str, Any]) -> str:
    latency = mh.get("copy_latency_ms")
    where = f"s3fast with {latency:g} ms per CopyObject" if latency else "s3fast without latency"
    return f"### Two supervisors on one job (stand-ins for two hosts), {where}"


def _multihost_intro(mh: dict[str, Any]) -> str:
    """What ran; with injected latency, also the ceiling it puts on one supervisor."""
    workers = mh["workers_per_supervisor"]
    text = (
        f"One full job (copy + verify + Postgres app-DB rewrite + delete, `after_all`) of "
        f"{mh['objects']:,} objects of 2 KiB on one Postgres ledger; each supervisor has "
        f"`workers: {workers}`. `migrator plan` ran once, then the `migrator run`s were "
        "started at the same moment."
    )
    latency, concurrency = mh.get("copy_latency_ms"), mh.get("concurrency")
    if not latency:
        return text + " Client, s3fast and PostgreSQL share this machine's cores."
    flags = " ".join(mh.get("s3fast_flags", []))
    in_flight = workers * concurrency
    return text + (
        f" A separate s3fast server (`{flags}`) answers every CopyObject {latency:g} ms late "
        f"and every other request at once, as S3 takes tens of ms per copy: one supervisor "
        f"has at most `workers × concurrency` = {workers} × {concurrency} = {in_flight} copies "
        f"in flight, so it copies at most {in_flight / latency * 1000:,.0f} objects/s."
    )


def _ledger_note(row: dict[str, Any], objects: int) -> str:
    """Ledger bytes and WAL per object, the inputs of docs/scaling.md's arithmetic."""
    planned, after = row.get("ledger_after_plan") or {}, row.get("ledger_after_run") or {}
    if not planned or not after:
        return f"- {row['supervisors']} supervisor(s): ledger sizes not measured"

    def per_row(size: dict[str, Any]) -> str:
        heap = size["heap_bytes"] / objects
        index = sum(size["index_bytes"].values()) / objects
        return f"heap {heap:,.0f} B + indexes {index:,.0f} B per object"

    return (
        f"- {row['supervisors']} supervisor(s): ledger after plan {per_row(planned)} "
        f"(average row {planned['avg_row_bytes']:,.0f} B); after the run {per_row(after)} "
        f"({after['dead_rows']:,} dead rows not yet vacuumed). WAL written, server-wide: "
        f"{row['wal_bytes_plan'] / objects:,.0f} B per object for plan, "
        f"{row['wal_bytes_run'] / objects:,.0f} B per object for the run."
    )


def _targets_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | measured | goal | |", "|---|---|---|---|"]
    for t in rows:
        value = "–" if t["value"] is None else f"{t['value']:,.2f}"
        met = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {value} | {t['op']} {t['goal']:g} | {met} |")
    return [*lines, ""]


def render_tables(results: dict[str, Any]) -> str:
    lines: list[str] = []
    for name, entry in results.get("sets", {}).items():
        lines += _set_table(name, entry)
    for key in ("multihost", "multihost_latency"):
        if key in results:
            mh = results[key]
            lines += [_multihost_title(mh), "", *_multihost_table(mh)]
    lines += [
        "### Targets (20k set; the multi-host row from its scenario with CopyObject latency)",
        "",
        *_targets_table(results.get("targets", [])),
    ]
    return "\n".join(lines)


def render(results: dict[str, Any], raw: Path) -> str:
    m, v = results["machine"], results["versions"]
    settings = results["settings"]["migrator"]
    load = ", ".join(f"{x:.2f}" for x in m["load_average_at_start"])
    latency_server = "endpoint" in results.get("multihost_latency", {})
    lines = [
        f"Generated by `make bench` on {results['started']} "
        f"(finished {results['finished']}); raw figures: `bench/results/{raw.name}`.",
        "",
        f"- Machine: {m['cores']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, Linux "
        f"{m['kernel']}; load average at start {load}. Client, s3fast and PostgreSQL share "
        "these cores.",
        f"- Versions: migrator {v['migrator']} (git {v['git']}), Python {v['python']}, boto3 "
        f"{v['boto3']}"
        + "".join(f", {v[k]}" for k in ("aws", "rclone") if k in v)
        + (f", PostgreSQL {v['postgres']}." if "postgres" in v else "."),
        f"- migrator settings: `workers: {settings['workers']}`, "
        f"`concurrency: {settings['concurrency']}`, `chunk_size: {settings['chunk_size']}`; "
        "copy-only: SQLite ledger, `delete_source: never`, no app DB; full job: Postgres "
        "ledger and app DB, `delete_source: after_all`.",
        f"- Repeats per tool: {results['args']['repeat']} (the median of each figure).",
        "",
        "How to read the columns: wall is the whole command (for migrator one `run`, "
        "listing included); obj/s and MB/s (10^6 bytes) are over that wall time; CPU is user + "
        "system of the tool's whole process tree (a cgroup v2 per run; migrator's fork "
        "server and workers included); requests are everything s3fast served during the run, "
        "retries included; peak RSS and PSS are the largest sums over the process tree, "
        "sampled every 0.1 s (PSS splits pages shared by forked workers); s3fast CPU is the "
        "server's own; Postgres CPU (full jobs) is that of the server backends serving the "
        'job\'s ledger and app databases. "vs" columns are obj/s ratios.',
        "",
        "Commands (`$S3` is the s3fast endpoint, `http://$S3_HOST_PORT`, "
        + ("`$S3_LATENCY` the second one with CopyObject latency, " if latency_server else "")
        + "and `$TMP` the scratch directory; all tools get "
        "`AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x AWS_DEFAULT_REGION=us-east-1`, a private "
        "`AWS_CONFIG_FILE` and no `AWS_CA_BUNDLE`; `config-tuned` was written by `aws "
        "configure set default.s3.max_concurrent_requests 64`):",
        "",
        "```sh",
        *_command_lines(results),
        "```",
        "",
    ]
    seeding = results.get("seed_commands", {})
    if seeding:
        lines += [
            "Seeding (before each run whose sources are not all in place; the 20-odd large "
            "objects of the mixed set are uploaded with boto3's `upload_fileobj`, multipart in "
            "5 MiB parts; app tables are written by the seeder's own `seed_app_db`):",
            "",
            "```sh",
            *(
                f"# {name}\n{_placeholders(' '.join(cmd), results)}"
                for name, cmd in seeding.items()
            ),
            "```",
            "",
        ]
    for kind, text in results.get("migrator_configs", {}).items():
        lines += [f"migrator config ({kind}):", "", "```yaml"]
        lines += [_placeholders(text, results).rstrip(), "```", ""]
    lines.append(render_tables(results))
    return "\n".join(lines).rstrip() + "\n"


def update_doc(path: Path, block: str) -> None:
    """Replace what lies between the markers (creating the file if needed)."""
    text = path.read_text() if path.exists() else SKELETON
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{BEGIN}\n{block}{END}{tail}")
