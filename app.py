"""Entry point for a checkout: `python app.py [MODEL_DIR] [--config config.toml] [--host H]
[--port P] [--workers N] [--set section.key=value ...]` is `batcher serve ...`, and
`python app.py check|loadtest ...` are those commands (batcher/cli.py). `make run` and the
tests start the server this way.
"""

from __future__ import annotations

import sys

from batcher.cli import COMMANDS, main

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(argv if argv[:1] and argv[0] in (*COMMANDS, "--version") else ["serve", *argv], prog="app.py"))
