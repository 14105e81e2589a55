"""Refuse unsupported torch / transformers releases at import, with one line naming the supported range.

The bounds here and in ``pyproject.toml`` are the releases the test suite ran with (the lock file) up to the
next untested major; the model seam (``attention_kv/model.py``) is the only code that depends on them.
"""
from __future__ import annotations

from importlib import metadata

SUPPORTED = {
    # name: (lowest tested, first untested major)
    "torch": ((2, 3), (3, 0)),
    "transformers": ((5, 0), (6, 0)),
}


class UnsupportedDependency(ImportError):
    """A dependency is missing or outside the supported range."""


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def check_dependencies() -> None:
    """Raise :class:`UnsupportedDependency` (one line) when torch or transformers is missing or unsupported."""
    for name, (low, high) in SUPPORTED.items():
        want = f"{name}>={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise UnsupportedDependency(f"blockrag needs {want}, which is not installed "
                                        f"(see the README's set-up command)") from None
        if not low <= _version_tuple(have) < high:
            raise UnsupportedDependency(f"blockrag supports {want}; {name} {have} is installed") from None
