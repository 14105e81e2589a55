"""Test-only fault injection: ``BLOCKRAG_FAULT=<point>`` kills the process (SIGKILL) when it reaches that
commit point, so tests can check that every point leaves a store the next open repairs exactly.

Points (see :data:`POINTS`) are named ``<operation>:<step>``; ``save:<index>:...`` points carry the index
name. Unset (the normal case) this costs one dictionary look-up per point.
"""
from __future__ import annotations

import os
import signal

POINTS = (
    "ingest:rows-written",       # document and chunk rows written, transaction open
    "ingest:indexes-updated",    # indexes updated in memory, transaction still open
    "ingest:committed",          # rows + generation + journal committed, no index saved
    "delete:rows-deleted",       # rows deleted, transaction open
    "delete:indexes-updated",
    "delete:committed",
    "save:{name}:written",       # an index folder swapped in, its manifest row not yet updated
    "save:{name}:recorded",      # manifest row updated (applied generation)
    "save:done",                 # every index saved, before the journal is pruned
    "swap:between-renames",      # inside a folder swap: old folder moved aside, new one not yet in place
    "build:{name}:built",        # index built in memory, not saved
)


def fault(point: str) -> None:
    """Kill this process if ``BLOCKRAG_FAULT`` names ``point`` (a no-op otherwise)."""
    if os.environ.get("BLOCKRAG_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
