"""``python -m fedlatent.ops [--build] [--verbose]``: print the ops' status as JSON (building the extension first
with ``--build``; exit status 1 if that fails)."""
from __future__ import annotations

import argparse
import json
import sys

from . import _build, status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedlatent.ops", description=__doc__)
    p.add_argument("--build", action="store_true", help="build / load the CUDA extension now")
    p.add_argument("--verbose", action="store_true", help="show the compiler commands while building")
    a = p.parse_args(argv)
    if a.build:
        _build.load_extension(strict=False, verbose=a.verbose)
    st = status()
    print(json.dumps(st, indent=2))
    return 1 if a.build and not st["loaded"] else 0


if __name__ == "__main__":
    sys.exit(main())
