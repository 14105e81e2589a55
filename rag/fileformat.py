"""Reading a store's data files: JSON only, checked for shape, every failure one ``ValueError`` line.

A store's files choose among known formats and nothing else: no file is ever unpickled or evaluated, so a
crafted store can make opening fail (with a message) but cannot run code.
"""
from __future__ import annotations

import json
from pathlib import Path


class StoreFormatError(ValueError):
    """A store file that is missing, corrupt, or of a format this blockrag does not read."""


def read_json(path: str | Path, expect: type = dict, what: str = "index file"):
    """Parse ``path`` as UTF-8 JSON whose top level is ``expect``; anything else raises StoreFormatError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise StoreFormatError(f"{path}: {what} missing; rebuild the index") from None
    except OSError as err:
        raise StoreFormatError(f"{path}: {what} unreadable ({err.strerror})") from None
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreFormatError(f"{path}: {what} is not JSON ({type(err).__name__}); rebuild the index") from None
    if not isinstance(value, expect):
        raise StoreFormatError(f"{path}: {what} holds a {type(value).__name__}, expected a {expect.__name__}")
    return value


def require_format(meta: dict, version: int, path, what: str) -> None:
    """Refuse a file whose recorded ``format_version`` is not ``version``."""
    got = meta.get("format_version")
    if got != version:
        raise StoreFormatError(f"{path}: {what} has format version {got!r}, this blockrag reads {version}; "
                               f"rebuild it")
