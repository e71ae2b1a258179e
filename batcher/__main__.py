"""`python -m batcher`: the `batcher` command (batcher/cli.py)."""

from __future__ import annotations

import sys

from batcher.cli import main

if __name__ == "__main__":  # the supervisor's spawned workers import this module too
    sys.exit(main(prog="python -m batcher"))
