"""The web QA app: a thin launcher of ``blockrag serve`` (OpenAI-compatible API + web UI at /).

    python -m examples.qa_web --store .blockrag/store --port 8080      # then open http://127.0.0.1:8080

Same flags as ``blockrag serve --help``.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from blockrag.server import add_arguments, run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
