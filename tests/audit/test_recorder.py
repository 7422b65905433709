"""The audit store, chain verification, the recorder's group commit, and secret masking: no processes."""

from __future__ import annotations

import base64
import fcntl
import itertools
import json
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.audit.chain import GENESIS, canonical, chain_hash
from gateway.audit.journal import Journal, journal_directory
from gateway.audit.keys import log_keys
from gateway.audit.recorder import Recorder
from gateway.audit.store import SCHEMA_VERSION, AuditStore, event
from gateway.errors import AuditError
from gateway.policy.redact import PATTERNS, SHORTEST, Redactor, looks_random, names_secret
from gateway.schema import compile_schema, describe_violation
from tests.conftest import REPO, held_while_new, write_config


def make_log(path: Path, count: int = 8) -> None:
    store = AuditStore.open_writer(path)
    try:
        for index in range(count):
            store.append([canonical(event("decision", call_id=f"c{index}", tool="box__echo", decision="allow"))])
    finally:
        store.close()


def verify(path: Path) -> tuple[int | None, str]:
    store = AuditStore.open_reader(path)
    try:
        result = store.verify()
    finally:
        store.close()
    return (result.problem.seq, result.problem.what) if result.problem else (None, "")


def tamper(path: Path, *statements: str) -> None:
    connection = sqlite3.connect(path)
    with connection:
        for statement in statements:
            connection.execute(statement)
    connection.close()


def test_an_intact_chain_verifies_and_links_every_event(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    make_log(path)
    assert verify(path) == (None, "")
    store = AuditStore.open_reader(path)
    rows = list(store.events())
    store.close()
    assert [row["seq"] for row in rows] == list(range(1, 9))
    assert rows[0]["prev_hash"] == GENESIS
    for before, after in itertools.pairwise(rows):
        assert after["prev_hash"] == before["hash"]
    body = {key: value for key, value in rows[3].items() if key not in ("seq", "prev_hash", "hash")}
    assert rows[3]["hash"] == chain_hash(rows[3]["prev_hash"], canonical(body))


@pytest.mark.parametrize(
    ("statements", "first_bad", "what"),
    [
        pytest.param(
            ["UPDATE events SET body = replace(body, '\"allow\"', '\"deny\"') WHERE seq = 3"],
            3,
            "edited",
            id="edit-a-field",
        ),
        pytest.param(["DELETE FROM events WHERE seq = 4"], 4, "missing", id="delete-a-row"),
        pytest.param(
            [
                "UPDATE events SET seq = -5 WHERE seq = 5",
                "UPDATE events SET seq = 5 WHERE seq = 6",
                "UPDATE events SET seq = 6 WHERE seq = -5",
            ],
            5,
            "prev_hash",
            id="swap-two-rows",
        ),
        pytest.param(
            [
                "CREATE TEMP TABLE b AS SELECT body FROM events WHERE seq IN (5, 6)",
                "UPDATE events SET body = (SELECT body FROM events WHERE seq = 6) WHERE seq = 5",
            ],
            5,
            "edited",
            id="copy-a-body-over-another",
        ),
        pytest.param(["DELETE FROM events WHERE seq >= 7"], 7, "truncated", id="truncate-the-tail"),
    ],
)
def test_tampering_is_found_at_the_first_bad_sequence_number(
    tmp_path: Path, statements: list[str], first_bad: int, what: str
) -> None:
    path = tmp_path / "audit.db"
    make_log(path)
    tamper(path, *statements)
    seq, problem = verify(path)
    assert seq == first_bad
    assert what in problem

    config = write_config(tmp_path, {}, policy=None, audit="audit.db")
    shown = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "verify", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert shown.returncode == 1
    assert shown.stdout.startswith(f"broken at seq {first_bad}: ")


def test_an_anchor_catches_a_rewritten_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    make_log(path, 4)
    store = AuditStore.open_reader(path)
    anchor = (3, list(store.events())[2]["hash"])  # noted from an earlier 'audit verify'/export
    store.close()
    # Rewrite the whole log consistently from event 3 on: the chain alone cannot tell.
    tamper(
        path,
        "DELETE FROM events WHERE seq >= 3",
        "UPDATE head SET seq = 2, hash = (SELECT hash FROM events WHERE seq = 2)",
    )
    writer = AuditStore.open_writer(path)
    writer.append([canonical(event("decision", call_id="forged", tool="box__echo", decision="allow"))] * 2)
    writer.close()
    assert verify(path) == (None, "")
    store = AuditStore.open_reader(path)
    result = store.verify([anchor])
    store.close()
    assert result.problem is not None and result.problem.seq == 3 and "anchored" in result.problem.what


def test_a_newer_schema_is_refused_rather_than_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    make_log(path, 1)
    tamper(path, "PRAGMA user_version = 99")
    with pytest.raises(AuditError, match="schema 99 was written by a newer mcp-armor"):
        AuditStore.open_writer(path)
    with pytest.raises(AuditError, match="audit log schema 99"):
        AuditStore.open_reader(path)


def test_a_schema_1_log_is_readable_and_migrated_in_place_with_its_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    make_log(path, 3)
    schema_1 = ("CREATE INDEX events_call ON events (call_id)", "DROP TABLE journals", "PRAGMA user_version = 1")
    tamper(path, *schema_1)
    reader = AuditStore.open_reader(path)  # a CLI older logs meet before a gateway migrates them
    assert [item["call_id"] for item in reader.events()] == ["c0", "c1", "c2"]
    reader.close()
    make_log(path, 2)  # the writer migrates, and appends on the same chain
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    indexes = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    connection.close()
    assert "events_call" not in indexes and "events_session" in indexes
    assert verify(path) == (None, "")


@pytest.mark.anyio
async def test_concurrent_records_are_committed_in_groups_in_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    recorder = Recorder(path)
    commits: list[int] = []
    async with recorder.running():
        store = recorder.store
        assert store is not None
        append = store.append

        def counting(bodies: Any, **kwargs: Any) -> int:
            commits.append(len(bodies))
            return append(bodies, **kwargs)

        store.append = counting  # type: ignore[method-assign]
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for index in range(200):
                    tg.start_soon(recorder.record, event("decision", call_id=f"c{index}", tool="t"))
    assert sum(commits) == 200
    assert len(commits) < 20  # 200 concurrent calls did not take 200 commits
    assert verify(path) == (None, "")


@pytest.mark.anyio
async def test_a_commit_failing_for_a_reason_not_the_databases_fails_its_callers_and_the_log_goes_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.db"
    recorder = Recorder(path)
    async with recorder.running():
        store = recorder.store
        assert store is not None
        append = store.append

        def failing(bodies: Any, **kwargs: Any) -> int:
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")

        store.append = failing  # type: ignore[method-assign]
        with anyio.fail_after(10):  # before, the group was dropped and its callers waited for ever
            with pytest.raises(AuditError, match="cannot write the audit log: UnicodeEncodeError"):
                await recorder.record(event("decision", call_id="lost", tool="t"))
        store.append = append  # type: ignore[method-assign]
        with anyio.fail_after(10):
            await recorder.record(event("decision", call_id="kept", tool="t"))
    assert "kept" in chain_texts(path)
    assert verify(path) == (None, "")


@pytest.mark.anyio
async def test_a_record_that_cannot_be_committed_raises_for_its_caller(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a directory")
    recorder = Recorder(tmp_path / "state" / "audit.db")
    async with recorder.running():
        assert recorder.failure is not None and "cannot open the audit log" in recorder.failure
        with pytest.raises(AuditError, match="cannot open the audit log"):
            await recorder.record(event("decision", call_id="c"))


# -- the journal ---------------------------------------------------------------------------------


def chain_texts(path: Path) -> list[str]:
    store = AuditStore.open_reader(path)
    try:
        return [item["call_id"] for item in store.events()]
    finally:
        store.close()


@pytest.mark.anyio
async def test_events_of_a_call_alone_are_journaled_at_once_and_in_the_chain_by_the_end(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    recorder = Recorder(path)
    async with recorder.running():
        for index in range(3):
            await recorder.record(event("decision", call_id=f"c{index}", tool="t"), alone=True)
        (journal,) = journal_directory(path).glob("*.jsonl")
        lines = journal.read_text().splitlines()
        # durable before any commit, each line authenticated: "MAC BODY"
        assert [json.loads(line.partition(" ")[2])["call_id"] for line in lines] == ["c0", "c1", "c2"]
    assert chain_texts(path) == ["c0", "c1", "c2"]
    assert list(journal_directory(path).iterdir()) == []  # everything moved: the journal is removed
    assert verify(path) == (None, "")


@pytest.mark.anyio
async def test_a_journal_left_by_a_gone_process_is_moved_into_the_chain_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    make_log(path, 2)
    bodies = [canonical(event("decision", call_id=f"j{index}", tool="t")) for index in range(4)]
    directory = journal_directory(path)
    directory.mkdir()
    dead = directory / "4242-0badc0de.jsonl"
    written = Journal(dead, os.open(dead, os.O_WRONLY | os.O_CREAT, 0o600), log_keys(path).journal)
    written.write(bodies)
    written.close(remove=False)
    with dead.open("a") as file:
        file.write('0123 {"torn": ')  # a write cut short by the crash
    first = len(dead.read_bytes().split(b"\n")[0]) + 1
    store = AuditStore.open_writer(path)
    store.append(bodies[:1], journal=(dead.name, first))  # the first one was moved before it died
    store.close()
    live = directory / "4243-0ddba11.jsonl"
    live.write_text(f"{canonical(event('decision', call_id='live', tool='t'))}\n")
    held = os.open(live, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # its process is still running
    try:
        async with Recorder(path).running():
            pass
    finally:
        os.close(held)
    assert chain_texts(path) == ["c0", "c1", "j0", "j1", "j2", "j3"]
    assert not dead.exists() and live.exists()
    connection = sqlite3.connect(path)
    assert connection.execute("SELECT count(*) FROM journals").fetchone()[0] == 0
    connection.close()
    assert verify(path) == (None, "")


@pytest.mark.anyio
async def test_a_journal_that_cannot_be_written_refuses_the_record_and_keeps_queued_events(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    recorder = Recorder(path)
    async with recorder.running():
        journal = recorder.journal
        assert journal is not None
        full = os.open("/dev/full", os.O_WRONLY)  # a full disk: ENOSPC
        recorder.journal = Journal(journal.path, full, recorder.keys.journal)
        with pytest.raises(AuditError, match="cannot write the audit journal"):
            await recorder.record(event("decision", call_id="refused", tool="t"), alone=True)
        recorder.queue(event("session_end", call_id="queued"))  # kept in memory, committed later
        recorder.journal.close(remove=False)
        recorder.journal = journal
    assert chain_texts(path) == ["queued"]


# -- masking -------------------------------------------------------------------------------------

REDACTOR = Redactor(b"k" * 32)
KEY = "b3BlbnNzaC1rZXktdjEAAAA"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0"


@pytest.mark.parametrize(
    ("text", "kind", "secret"),
    [
        (
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAA\n-----END OPENSSH PRIVATE KEY-----",
            "private-key",
            "b3BlbnNzaC1rZXktdjEAAAA",
        ),
        ("aws AKIAIOSFODNN7EXAMPLE here", "aws-access-key", "AKIAIOSFODNN7EXAMPLE"),
        ("gh ghp_" + "a1B2" * 9, "github-token", "a1B2" * 9),
        ("xoxb-1234567890-abcdefghij", "slack-token", "xoxb-1234567890-abcdefghij"),
        ("key AIza" + "B" * 35, "google-api-key", "B" * 35),
        ("sk-ant-" + "x" * 30, "api-key", "x" * 30),
        (
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            "jwt",
            "dozjgNryP4J3jVmNHl0w5N",
        ),
        ("Authorization: Bearer abcdef0123456789", "bearer-token", "abcdef0123456789"),
        ("https://user:pa55word@example.com/x", "url-password", "pa55word"),
        ("PGPASSWORD=hunter22 psql", "password", "hunter22"),
        ("session q8Xz2LmN4vB7tR1yK9pW3sD6hJ5fG0aC", "high-entropy", "q8Xz2LmN4vB7tR1yK9pW3sD6hJ5fG0aC"),
    ],
)
def test_secret_looking_values_are_masked(text: str, kind: str, secret: str | None) -> None:
    redaction = REDACTOR.redact({"value": text})
    assert redaction.masked and redaction.masked[0].path == "value"
    assert kind in {item.kind for item in redaction.masked}
    masked = redaction.value["value"]
    assert "[masked:" in masked
    if secret is not None:
        assert secret not in masked


@pytest.mark.parametrize(
    "text",
    [
        "src/gateway/policy_files.py",
        "4dfc2f9a1b2c3d4e5f60718293a4b5c6d7e8f901",
        "550e8400-e29b-41d4-a716-446655440000",
        "2026-11-23T10:00:00Z",
        "feature/ABC-1234-add-login",
        "America/Argentina/Buenos_Aires",
        "node_modules/@modelcontextprotocol/server-everything/dist/index.js",
        "Fix the flaky test in test_gateway_e2e.py and re-run CI",
        "https://example.com/path/to/Resource2024?x=1",
    ],
)
def test_ordinary_values_are_kept(text: str) -> None:
    assert REDACTOR.redact({"value": text}).masked == ()


def test_random_tokens_are_recognised_as_key_material() -> None:
    generator = random.Random(7)  # fixed, so the test cannot flake
    tokens = [base64.b64encode(generator.randbytes(30)).decode() for _ in range(300)]
    assert sum(looks_random(token) for token in tokens) >= 285


def test_short_strings_skipped_by_the_quick_check_hold_nothing_any_pattern_finds() -> None:
    rng = random.Random(7)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_ .@/+~\n"
    words = ["AKIA", "ghp_", "glpat-", "xoxb-", "AIza", "sk_live_", "sk-", "eyJ", "bearer ", "token ", "pwd", "-----"]
    for _ in range(20000):
        parts = [rng.choice(words) if rng.random() < 0.3 else rng.choice(alphabet) for _ in range(rng.randint(1, 14))]
        text = "".join(parts)[: SHORTEST - 1]
        if "-p" in text or "--" in text:
            continue  # an option's password (`mysql -pX`, `--pass X`): never skipped by the quick check
        assert not any(pattern.search(text) for _, pattern in PATTERNS), text
    redactor = Redactor(b"k" * 32)
    for _ in range(2):  # a string with a secret is never remembered as clean
        assert "[masked:password:" in redactor.mask_text("pwd=hunter2", "", [], {})


def test_secret_names_mask_whole_values_and_markers_correlate() -> None:
    arguments = {
        "user": "bob",
        "password": "hunter2-secret",
        "headers": {"X-Api-Key": "k1", "Accept": "json"},
        "credentials": {"id": "x", "pin": "1234"},
        "max_tokens": 10,
        "again": "password=hunter2-secret",
    }
    redaction = REDACTOR.redact(arguments)
    value = redaction.value
    assert value["user"] == "bob" and value["headers"]["Accept"] == "json" and value["max_tokens"] == 10
    assert value["password"].startswith("[masked:key-name:")
    assert value["headers"]["X-Api-Key"].startswith("[masked:key-name:")
    assert value["credentials"]["pin"].startswith("[masked:key-name:")
    assert value["password"].rsplit(":", 1)[1] == value["again"].rsplit(":", 1)[1]  # same secret, same hash
    assert "hunter2-secret" not in json.dumps(value)
    scrubbed = redaction.scrub("the value 'hunter2-secret' is too short", REDACTOR)
    assert scrubbed.startswith("the value '[masked:") and scrubbed.endswith("]' is too short")
    assert "hunter2" not in scrubbed
    assert [names_secret(key) for key in ("apiKey", "GITHUB_TOKEN", "max_tokens", "monkey", "author")] == [
        True,
        True,
        False,
        False,
        False,
    ]


@pytest.mark.parametrize("secret", ['hunter"2-secret', "hunter\\2-secret", "hunter\n2-secret"])
def test_a_secret_quoted_in_a_schema_violation_is_scrubbed_however_json_escapes_it(secret: str) -> None:
    # An input-schema refusal quotes the argument as JSON: a '"', '\\' or newline in it is escaped there.
    arguments = {"password": secret, "creds": {"password": secret}}
    validator = compile_schema(
        {"type": "object", "properties": {"password": {"maxLength": 4}, "creds": {"type": "string"}}}
    )
    redaction = REDACTOR.redact(arguments)
    for error in validator.iter_errors(arguments):
        scrubbed = redaction.scrub(
            f"arguments do not match the tool's input schema: {describe_violation(error)}", REDACTOR
        )
        assert "hunter" not in scrubbed and "[masked:key-name:" in scrubbed, scrubbed


def test_paths_named_by_policy_are_masked_whatever_their_type() -> None:
    arguments = {"connection": {"dsn": "db", "port": 5432}, "items": [{"note": "a"}, {"note": "b"}]}
    redaction = REDACTOR.redact(arguments, [("connection", "port"), ("items", "*", "note")])
    assert redaction.value["connection"] == {"dsn": "db", "port": redaction.value["connection"]["port"]}
    assert redaction.value["connection"]["port"].startswith("[masked:policy:")
    assert [item.path for item in redaction.masked] == ["connection.port", "items.0.note", "items.1.note"]


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("mysql -uroot -pS3cretPass db", "S3cretPass"),
        ("cd /srv && /usr/bin/mysqldump -h db -pS3cretPass shop > dump.sql", "S3cretPass"),
        ("mariadb -p'S3cretPass' -e 'select 1'", "S3cretPass"),
        ("deploy --password=S3cretPass --verbose", "S3cretPass"),
        ("deploy --password S3cretPass --verbose", "S3cretPass"),
        ("psql --db-password 'S3cretPass' -c x", "S3cretPass"),
        ("curl -u alice:S3cretPass https://api.example.com", "S3cretPass"),
        ("curl --user alice:S3cretPass https://api.example.com", "S3cretPass"),
        ("curl -ualice:S3cretPass https://api.example.com", "S3cretPass"),
        ("sshpass -p S3cretPass ssh host", "S3cretPass"),
        ("sshpass -pS3cretPass ssh host", "S3cretPass"),
        ("run psql postgresql://app:S3cretPass@db.internal:5432/prod now", "S3cretPass"),
        ("mysql://root:S3cretPass@localhost/shop", "S3cretPass"),
        ("redis://:S3cretPass@cache:6379/0", "S3cretPass"),
        ("amqp://guest:S3cretPass@rabbit/vhost", "S3cretPass"),
        ('export DSN="mongodb+srv://u:S3cretPass@c.example.net/db"', "S3cretPass"),
    ],
)
def test_credentials_on_command_lines_and_in_urls_are_masked(text: str, secret: str | None) -> None:
    masked = REDACTOR.redact({"command": text}).value["command"]
    assert "[masked:" in masked, masked
    if secret is not None:
        assert secret not in masked, masked


@pytest.mark.parametrize(
    "text",
    [
        "docker run -p 8080:80 nginx",
        "ls -pla /tmp",
        "mysql -p shop",  # a space after -p: mysql asks for the password, `shop` is the database
        "ssh user@host.example.com",
        "git clone git@github.com:org/repo.git",
        "mkdir -p build/out",
        "docker run -u 1000:1000 image",
        "curl https://example.com/path?x=1",
        "grep --pass-through pattern file",
        "sort -u names.txt",
    ],
)
def test_command_lines_without_credentials_are_kept(text: str) -> None:
    assert REDACTOR.redact({"command": text}).masked == ()


def test_secrets_used_as_object_keys_are_masked_and_the_structure_kept() -> None:
    token = "sk-live-" + "a1B2c3D4e5F6g7H8i9J0"
    arguments = {"env": {token: 1, "HOME": "/root"}, "tokens": {"ghp_" + "a1B2" * 9: "read"}}
    redaction = REDACTOR.redact(arguments)
    text = json.dumps(redaction.value)
    assert token not in text and "a1B2" * 9 not in text
    env = redaction.value["env"]
    assert env["HOME"] == "/root" and len(env) == 2
    (masked_key,) = [key for key in env if key != "HOME"]
    assert masked_key.startswith("[masked:") and env[masked_key] == 1
    assert all(token not in item.path for item in redaction.masked)
    assert REDACTOR.redact(redaction.value).value == redaction.value  # masking again changes nothing


def test_masking_patterns_finish_on_hostile_text() -> None:
    # Each would make a pattern that restarts inside a run rescan the rest from each position: hours, not ms.
    texts = ["eyJ-" * 50_000, "xoxb-" * 50_000, "sk-" * 70_000, "a." * 100_000, "mysql " * 40_000, "curl -u " * 30_000]
    for text in texts:
        assert isinstance(REDACTOR.redact({"value": text}).value["value"], str)


@pytest.mark.parametrize("secret", ["hunter\\2-secret", "hunter\t2-secret", "hunter\x012-secret", 'hu"nter\\2'])
@pytest.mark.parametrize(
    ("schema", "arguments"),
    [
        ({"properties": {"x": {"type": "string"}}}, lambda s: {"x": {"a": "y" * 272, "password": s}}),  # cut at 300
        ({"properties": {"x": {"propertyNames": {"maxLength": 3}}}}, lambda s: {"x": {"ghp_hunter" + "a1B2" * 8: 1}}),
        ({"properties": {"x": {"additionalProperties": False}}}, lambda s: {"x": {"password=hunter2-secret": 1}}),
        ({"properties": {"password": {"items": False}}}, lambda s: {"password": [s]}),
        ({"properties": {"password": {"maxLength": 4}}}, lambda s: {"password": s}),
    ],
)
def test_values_are_masked_before_a_schema_violation_is_written(secret: str, schema: Any, arguments: Any) -> None:
    given = arguments(secret)
    error = next(iter(compile_schema({"type": "object", **schema}).iter_errors(given)))
    text = describe_violation(error, REDACTOR.mask_at)
    assert "hunt" not in text and "nter" not in text, text
    assert "[mask" in text, text  # a marker, maybe cut short with the rest of a long line


@pytest.mark.parametrize(
    "secret", ["hunter\t2-secret", "hunter\\2-secret", "hunter\x01zwei-secret", "hünter2-secret\u202e"]
)
def test_a_secret_quoted_as_python_or_ascii_json_writes_it_is_scrubbed(secret: str) -> None:
    # A path message quotes with repr; an ASCII-only JSON writer escapes non-ASCII: neither spelling survives.
    redaction = REDACTOR.redact({"password": secret})
    for quoted in (repr(secret), json.dumps(secret), json.dumps(secret, ensure_ascii=False)):
        scrubbed = redaction.scrub(f"cannot use {quoted} as a path", REDACTOR)
        assert "hunter" not in scrubbed and "nter2" not in scrubbed and "[masked:key-name:" in scrubbed, scrubbed


@pytest.mark.anyio
async def test_a_checkpoint_falls_due_in_a_commit_made_on_the_event_loop_and_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.audit.recorder as recorder_module

    ran = anyio.Event()
    monkeypatch.setattr(recorder_module, "CHECKPOINT_EVERY", 5)
    monkeypatch.setattr(recorder_module, "_checkpoint", lambda path: ran.set())
    recorder = Recorder(tmp_path / "audit.db")
    with anyio.fail_after(20):
        async with recorder.running():
            for n in range(12):  # alone: journaled, then moved into the chain by an event-loop callback
                await recorder.record(event("decision", call_id=f"c{n}"), alone=True)
            await ran.wait()


def test_a_gone_process_settles_only_its_own_calls_of_a_session_another_process_serves(tmp_path: Path) -> None:
    # Two HTTP gateways on one state: a principal's stateless 2026-07-28 session has one id in both.
    from gateway.audit.leases import endings

    store = AuditStore.open_writer(tmp_path / "audit.db")
    try:
        store.append(
            [
                canonical(event("session_start", session_id="s", lease="gone")),
                canonical(event("session_start", session_id="s", lease="live")),
                canonical(event("decision", session_id="s", call_id="mine", tool="t", decision="allow", lease="gone")),
                canonical(event("decision", session_id="s", call_id="other", tool="t", decision="allow", lease="live")),
            ]
        )
        settled = endings(store, "gone", "the gateway process 1")
    finally:
        store.close()
    assert [(body["kind"], body.get("call_id")) for body in settled] == [("outcome", "mine"), ("session_end", None)]


@pytest.mark.anyio
async def test_events_queued_while_the_log_cannot_be_written_wait_for_it_and_recorded_ones_are_their_callers(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the log's directory should be")
    recorder = Recorder(blocker / "audit.db")
    with anyio.fail_after(20):
        async with recorder.running():
            recorder.queue(event("decision", call_id="queued"))
            with pytest.raises(AuditError):  # the same failed commit took the queued event along
                await recorder.record(event("decision", call_id="recorded-while-blocked"))
            with pytest.raises(AuditError):  # and failed again: still kept
                await recorder.record(event("decision", call_id="again"))
            blocker.unlink()
            await recorder.record(event("decision", call_id="after"))
    store = AuditStore.open_reader(blocker / "audit.db")
    try:
        assert [e["call_id"] for e in store.events()] == ["queued", "after"]
    finally:
        store.close()


def test_a_new_log_another_process_is_still_making_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two replicas starting at once on one new log: the one that has it holds it while the other would
    # switch it to WAL, which SQLite refuses at once ("locked") rather than wait. The other waits.
    path = tmp_path / "audit.db"
    with held_while_new(path, monkeypatch) as pauses:
        store = AuditStore.open_writer(path)
    store.append([json.dumps(event("session_start", session_id="s1"))])
    assert pauses
    assert [record["kind"] for record in AuditStore.open_reader(path).events()] == ["session_start"]
