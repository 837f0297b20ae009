"""python -m pipelines board [RUNS_DIR] [--port N] [--host H]: TensorBoard over a folder of runs."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from pipelines import _cli

SUMMARY = ("start TensorBoard over RUNS_DIR (default: runs) on a free port, print its URL and "
           "serve until Ctrl-C; every run's settings and final metrics are in the HParams tab")


def main(argv: list[str] | None = None) -> int:
    p = _cli.Parser(prog="python -m pipelines board", description=SUMMARY)
    p.add_argument("root", nargs="?", default="runs", help="a folder of runs (default: runs)")
    p.add_argument("--port", type=int, default=0, help="port to serve on (default: a free one)")
    p.add_argument("--host", default="localhost", help="address to bind (default: localhost)")
    p.add_argument("--quiet", action="store_true", help="print only the URL")
    p.add_argument("--verbose", action="store_true", help="show TensorBoard's own logs")
    args = p.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"error: runs folder '{root}' does not exist", file=sys.stderr)
        return 1
    _cli.setup_logging(args.quiet, args.verbose)
    from tfkarpa import board
    from tfkarpa.errors import TfkarpaError

    try:
        with _cli.native_stderr_silenced(not args.verbose):
            url = board.start(root, args.port, args.host)
    except TfkarpaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"TensorBoard on {root}: {url}  (Ctrl-C stops it)", flush=True)
    stop = threading.Event()
    # Ctrl-C and SIGTERM both stop it, also where a shell started it with SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    print("board: stopped", flush=True)  # the server thread is a daemon: it ends with us
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
