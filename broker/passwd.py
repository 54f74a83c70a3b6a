"""Mosquitto 2.0 password-file management without the ``mosquitto_passwd`` binary.

Line format (checked against mosquitto 2.0.11, which accepts lines written here)::

    username:$7$101$<base64 12-byte salt>$<base64 PBKDF2-HMAC-SHA512 64-byte key>

``$7$`` is Mosquitto's PBKDF2-SHA512 hash id; 101 is the iteration count ``mosquitto_passwd`` uses.
Base64 is standard with padding (the 64-byte key ends in ``==``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import re
import secrets
import sys
import tempfile
from pathlib import Path

from ollama_fleet.contract.protocol import ROLE_ACCOUNT_RE

HASH_ID = 7
ITERATIONS = 101
SALT_BYTES = 12
KEY_BYTES = 64
DEFAULT_PASSWORD_FILE = Path("/mosquitto/config/fleet.passwd")
RESERVED_USERS = frozenset({"controller", "operator"})  # and `controller-N`, one per more controller: ROLE_ACCOUNT_RE
# Node id rule from the topic tree: one whole topic level, no MQTT wildcards, no leading "_"
# ("_all"/"_controller" are command targets, not nodes).
USERNAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def validate_username(username: str) -> str:
    """Return ``username`` if it is a valid node id or a reserved account, else raise ValueError."""
    if ROLE_ACCOUNT_RE.match(username):
        return username
    if not isinstance(username, str) or not USERNAME_RE.fullmatch(username):
        raise ValueError(
            f"invalid MQTT username {username!r}: node ids must match [a-z0-9][a-z0-9-]{{0,62}} "
            f"(lowercase letters, digits, '-'; at most 63 chars); reserved accounts: "
            f"{', '.join(sorted(RESERVED_USERS))}, controller-N"
        )
    return username


def generate_password() -> str:
    """A URL-safe random password (~192 bits), safe to paste into shells and MQTT URLs."""
    return secrets.token_urlsafe(24)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """The ``$7$...`` hash string Mosquitto 2.0 stores for ``password``."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    key = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, ITERATIONS, KEY_BYTES)
    b64 = base64.b64encode
    return f"${HASH_ID}${ITERATIONS}${b64(salt).decode()}${b64(key).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Check ``password`` against a ``$7$`` hash (used by tests and by ``fleet`` diagnostics)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != str(HASH_ID):
        return False
    iterations, salt, key = int(parts[2]), base64.b64decode(parts[3]), base64.b64decode(parts[4])
    got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, len(key))
    return hmac.compare_digest(got, key)


def _validate_password(password: str) -> None:
    if not password:
        raise ValueError("password must not be empty")
    if any(c in password for c in "\r\n\0"):
        raise ValueError("password must not contain newlines or NUL")


def read_entries(password_file: Path) -> dict[str, str]:
    """``{username: hash}`` from a password file (missing file = empty); comments are dropped."""
    entries: dict[str, str] = {}
    if not password_file.exists():
        return entries
    for line in password_file.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#") or ":" not in line:
            continue
        user, hashed = line.split(":", 1)
        entries[user] = hashed
    return entries


def _write_entries(password_file: Path, entries: dict[str, str]) -> None:
    """Atomically replace the file, keeping the old mode/owner (mosquitto may run as another user)."""
    password_file.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{user}:{hashed}\n" for user, hashed in entries.items())
    old = password_file.stat() if password_file.exists() else None
    fd, tmp = tempfile.mkstemp(prefix=f".{password_file.name}.", dir=password_file.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        # New files: 0640 so a "mosquitto" group can read them; never world-readable.
        os.chmod(tmp, (old.st_mode & 0o777) if old else 0o640)
        if old is not None and hasattr(os, "chown"):
            try:
                os.chown(tmp, old.st_uid, old.st_gid)
            except PermissionError:
                pass  # not root: the file simply stays ours
        os.replace(tmp, password_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_credentials(password_file: Path, username: str, password: str | None = None) -> str:
    """Add or update ``username`` in ``password_file``; return the password (generated when None).

    The broker only picks the change up after SIGHUP (or restart).
    """
    password_file = Path(password_file)
    validate_username(username)
    password = generate_password() if password is None else password
    _validate_password(password)
    entries = read_entries(password_file)
    entries[username] = hash_password(password)
    _write_entries(password_file, entries)
    return password


def remove_credentials(password_file: Path, username: str) -> bool:
    """Remove ``username``; return False when it was not present. Needs a SIGHUP to take effect."""
    password_file = Path(password_file)
    validate_username(username)
    entries = read_entries(password_file)
    if username not in entries:
        return False
    del entries[username]
    _write_entries(password_file, entries)
    return True


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleet broker passwd",
        description="Manage the Mosquitto password file (send SIGHUP to mosquitto afterwards).",
    )
    sub = p.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="add or update a user; prints a generated password once")
    add.add_argument("user")
    src = add.add_mutually_exclusive_group()
    src.add_argument("--password", help="use this password (visible in shell history: prefer stdin)")
    src.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    rm = sub.add_parser("remove", help="remove a user")
    rm.add_argument("user")
    for sp in (add, rm):
        sp.add_argument(
            "--file",
            type=Path,
            default=DEFAULT_PASSWORD_FILE,
            help=f"password file (default {DEFAULT_PASSWORD_FILE})",
        )
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns a process exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.action == "add":
            password = args.password
            if args.password_stdin:
                password = sys.stdin.readline().rstrip("\r\n")
            result = add_credentials(args.file, args.user, password)
            if password is None:
                print(result)  # the only place a generated password is ever shown
            print(f"user {args.user!r} written to {args.file}; reload mosquitto (SIGHUP)", file=sys.stderr)
            return 0
        if not remove_credentials(args.file, args.user):
            print(f"user {args.user!r} not found in {args.file}", file=sys.stderr)
            return 1
        print(f"user {args.user!r} removed from {args.file}; reload mosquitto (SIGHUP)", file=sys.stderr)
        return 0
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
