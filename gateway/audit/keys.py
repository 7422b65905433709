"""The audit log's keys, kept outside the log: the masking key and the journal key.

The masking key makes the HMAC in `[masked:KIND:HASH]` markers; whoever holds it can test guesses
of a masked secret against them, so it is not kept in the log (a copy of the log, an export, a
backup) but in a key file beside it, `<log stem>.key` (`.mcp-armor/audit.key`), readable by its
owner only. The journal key authenticates the lines of the audit journal, so that only journals this
gateway wrote are moved into the chain. Verifying the chain needs neither key.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import AuditError

logger = logging.getLogger(__name__)

_FIELDS = ("mask_key", "journal_key")


def key_path(log: Path) -> Path:
    """The key file of the log at `log` (`.mcp-armor/audit.key` for `.mcp-armor/audit.db`)."""
    path = log.with_name(f"{log.stem}.key")
    return path if path != log else log.with_name(f"{log.name}.key")


@dataclass(frozen=True, slots=True)
class Keys:
    mask: bytes
    """The masking markers' HMAC key."""
    journal: bytes
    """The audit journal's HMAC key."""

    @classmethod
    def fresh(cls) -> Keys:
        return cls(secrets.token_bytes(32), secrets.token_bytes(32))


def read_keys(log: Path) -> Keys | None:
    """The keys of the log at `log`, or `None` when it has no key file yet; `AuditError` for one that cannot
    be used. A key file others can read or write is made the owner's only, with a warning."""
    path = key_path(log)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"{path}: cannot read the audit key file: {exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise AuditError(f"{path}: the audit key file is not a regular file")
        if mode & 0o077:
            logger.warning(
                "%s: the audit key file was open to others (mode %o); now its owner's only", path, mode & 0o777
            )
            os.fchmod(fd, 0o600)
        with os.fdopen(os.dup(fd), "rb") as file:
            data = json.loads(file.read())
        return Keys(*(bytes.fromhex(data[field]) for field in _FIELDS))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise AuditError(
            f"{path}: the audit key file cannot be used ({exc}); move it aside to start new keys"
        ) from None
    finally:
        os.close(fd)


def write_keys(log: Path, keys: Keys, *, replace: bool = False) -> Keys:
    """Store `keys` as the log's key file (mode 0600); the keys now in force.

    Without `replace`, a key file another process wrote meanwhile wins (link, never overwrite), so
    gateways starting together agree on one set of keys.
    """
    path = key_path(log)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    text = json.dumps({field: value.hex() for field, value in zip(_FIELDS, (keys.mask, keys.journal), strict=True)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(temporary, path)
            return keys
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
    except OSError as exc:
        raise AuditError(f"{path}: cannot write the audit key file: {exc}") from None
    finally:
        temporary.unlink(missing_ok=True)
    found = read_keys(log)
    if found is None:
        raise AuditError(f"{path}: the audit key file vanished as it was written")
    return found


def log_keys(log: Path) -> Keys:
    """The keys of the log at `log`, made on first use."""
    return read_keys(log) or write_keys(log, Keys.fresh())


def adopt_mask_key(log: Path, mask: bytes) -> None:
    """Move a masking key kept in the log (as older versions did) into its key file."""
    current = read_keys(log)
    if current is None:
        write_keys(log, Keys(mask, secrets.token_bytes(32)))
    elif current.mask != mask:  # the log's own markers were made with the key it held: that one stays
        write_keys(log, Keys(mask, current.journal), replace=True)
