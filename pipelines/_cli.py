"""What every verb shares: argument parsing, recipes, logging, errors, the final summary.

A verb module defines `main(argv=None) -> int` by calling `run_verb` with its name, its own
extra arguments and a handler that returns the `{run_dir, artifacts, metrics}` result. This file
turns a `TfkarpaError` into one line on stderr and exit status 1, prints the summary, and with
`--json` makes the last stdout line one JSON object for scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

RECIPES = Path(__file__).resolve().parent / "recipes"
EXIT_ERROR = 1


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def resolve_recipe(name: str) -> Path:
    """A recipe name (pipelines/recipes/NAME.yaml) or a path to a YAML file."""
    from tfkarpa.errors import TfkarpaError

    path = Path(name)
    if path.suffix in (".yaml", ".yml") or os.sep in name:
        if not path.is_file():
            raise TfkarpaError(f"config file not found: {path}")
        return path
    candidate = RECIPES / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    close = difflib.get_close_matches(name, recipe_names(), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise TfkarpaError(f"unknown recipe '{name}'{hint} (recipes: {', '.join(recipe_names())})")


def keys_help() -> str:
    from tfkarpa.config import describe_keys  # no TensorFlow import: cheap

    rows = describe_keys()
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (key=value, dotted):"]
    for key, default, text in rows:
        shown = default or '""'
        lines.append(f"  {key:<{width}}  {text} [default: {shown}]")
    return "\n".join(lines)


def setup_logging(quiet: bool, verbose: bool) -> None:
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # C++ notices; errors reach Python
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("absl", "tensorflow", "h5py", "tensorboard", "werkzeug", "flwr", "art"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore")


@contextlib.contextmanager
def native_stderr_silenced(enabled: bool):
    """Point file descriptor 2 at /dev/null while keeping Python's own stderr on the terminal.

    TensorFlow's and LiteRT's C++ sides write start-up notices, oneDNN and XNNPACK lines straight
    to descriptor 2, whatever their log levels say; they are noise to a user. Our messages,
    logging and tracebacks go through `sys.stderr`, which is moved to a copy of the real
    descriptor, so they still show. Skipped with --verbose, and where stderr is already
    redirected (tests capture it).
    """
    if not enabled or sys.stderr is not sys.__stderr__:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    python_stderr = os.fdopen(os.dup(saved), "w", buffering=1)
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and h.stream is sys.__stderr__]
    sys.stderr = python_stderr
    for handler in handlers:
        handler.setStream(python_stderr)
    try:
        yield
    finally:
        python_stderr.flush()
        sys.stderr = sys.__stderr__
        for handler in handlers:
            handler.setStream(sys.__stderr__)
        os.dup2(saved, 2)
        os.close(saved)
        python_stderr.close()


class Parser(argparse.ArgumentParser):
    """argparse that also takes the flags as keys: `verbose=true`, `quiet=true`, `json=true`."""

    FLAGS = ("verbose", "quiet", "json")

    def parse_intermixed_args(self, args=None, namespace=None):
        return super().parse_intermixed_args(self._flags(args), namespace)

    def parse_args(self, args=None, namespace=None):
        return super().parse_args(self._flags(args), namespace)

    def _flags(self, args):
        args = sys.argv[1:] if args is None else list(args)
        out = []
        for arg in args:
            key, _, value = arg.partition("=")
            if key in self.FLAGS and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                if value.lower() in ("true", "1", "yes"):
                    out.append(f"--{key}")
            else:
                out.append(arg)
        return out


def parser(verb: str, summary: str, usage_args: str, with_keys: bool = True) -> argparse.ArgumentParser:
    p = Parser(
        prog=f"python -m pipelines {verb}", description=summary,
        usage=f"python -m pipelines {verb} {usage_args}".replace("%", "%%"),  # argparse formats it
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=keys_help() if with_keys else None,
    )
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with paths and metrics as the last stdout line")
    p.add_argument("--quiet", action="store_true", help="print only the final summary")
    p.add_argument("--verbose", action="store_true", help="show TensorFlow's own logs and warnings")
    return p


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Separate key=value overrides from positional words (recipes, paths)."""
    import re

    overrides, words = [], []
    for item in items:
        (overrides if re.match(r"^[A-Za-z_][\w.]*=", item) else words).append(item)
    return overrides, words


def verb_options(verb: str, items: list[str], defaults: dict[str, str], numbers: tuple = (),
                 allow_config: bool = False) -> tuple[dict[str, str], list[str], list[str]]:
    """Split a verb's `key=value` words into its own options and config overrides.

    Returns (options, config overrides, plain words). Options not named in `defaults` are
    config overrides when `allow_config`, else errors naming the closest option. Options in
    `numbers` must be positive whole numbers.
    """
    from tfkarpa.errors import TfkarpaError

    overrides, words = split_overrides(items)
    options, rest = dict(defaults), []
    for item in overrides:
        key, _, value = item.partition("=")
        if key in options:
            options[key] = value
        elif allow_config:
            rest.append(item)
        else:
            close = difflib.get_close_matches(key, list(options), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise TfkarpaError(f"unknown {verb} option '{key}'{hint} "
                               f"(options: {', '.join(f'{k}=' for k in options)})")
    for key in numbers:
        if not options[key].isdigit() or int(options[key]) < 1:
            raise TfkarpaError(f"{verb} option '{key}' must be a positive whole number, "
                               f"got '{options[key]}'")
    return options, rest, words


def comma_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def print_summary(verb: str, result: dict, started: float, as_json: bool) -> None:
    lines = [f"{verb} finished in {time.time() - started:.1f}s"]
    if result.get("run_dir"):
        lines.append(f"  run        {result['run_dir']}")
    for key, value in result.get("metrics", {}).items():
        if isinstance(value, float):
            digits = 1 if key.endswith(("seconds", "_kb")) else 3 if key.endswith("_ms") else 4
            lines.append(f"  {key:<26} {value:.{digits}f}")
        elif isinstance(value, (int, str)):
            lines.append(f"  {key:<26} {value}")
    for key, value in result.get("artifacts", {}).items():
        if key != "run_dir":
            lines.append(f"  wrote {key:<16} {value}")
    for line in result.get("lines", []):
        lines.append(line)
    print("\n".join(lines), flush=True)
    if as_json:
        payload = {k: result.get(k) for k in ("run_dir", "artifacts", "metrics")}
        payload.update({k: v for k, v in result.items() if k not in payload and k != "lines"})
        print(json.dumps(payload, default=str), flush=True)


def run_verb(verb: str, args: argparse.Namespace, handler: Callable[[argparse.Namespace], dict]) -> int:
    setup_logging(args.quiet, args.verbose)
    started = time.time()
    try:
        import tfkarpa  # noqa: F401,I001  (selects Keras 2 before TensorFlow loads)

        with native_stderr_silenced(not args.verbose):
            import tensorflow as tf

            tf.config.list_physical_devices()
            result = handler(args)
    except KeyboardInterrupt:
        print(f"{verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # user errors get one line; anything else keeps its traceback
        from tfkarpa.errors import TfkarpaError

        message = user_error(err)
        if message is None:
            raise
        cause = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if args.verbose and (cause or not isinstance(err, TfkarpaError)):
            import traceback

            traceback.print_exception(err, file=sys.stderr)  # where a damaged file failed
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR
    print_summary(verb, result, started, args.json)
    return 0


# What the machine refused, not what the code got wrong: no permission, a full disk or quota, a
# read-only file system. An OSError that names its file and has one of these causes is the
# user's to fix; every other exception is a bug and keeps its traceback.
_ENVIRONMENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT,
                                 errno.EROFS})


def user_error(err: BaseException) -> str | None:
    """The one line a user sees for `err`, or None when it is a bug (its traceback shows)."""
    from tfkarpa.errors import TfkarpaError

    if isinstance(err, TfkarpaError):
        return str(err)
    if isinstance(err, OSError) and err.errno in _ENVIRONMENT_ERRNOS and err.filename:
        return (f"cannot use '{err.filename}': {err.strerror}; fix its permissions or free "
                "space, then re-run the same command (--verbose shows where it happened)")
    return None


def task_recipe(overrides: list[str]) -> str:
    """The recipe `task=NAME` starts from when no recipe is given: the task's own for its
    embedded data, its data-adaptive one for any other `data=` source (no task=: classify's)."""
    from tfkarpa import tasks

    def last(*keys):
        values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] in keys]
        return values[-1] if values else None

    return tasks.get(last("task") or "classify").recipe_for(last("data", "data.source") or "")


def build_config(args: argparse.Namespace, words: list[str], overrides: list[str]):
    from tfkarpa import config as config_lib
    from tfkarpa.errors import TfkarpaError

    files = [resolve_recipe(w) for w in words]
    if len(files) > 1:
        raise TfkarpaError(f"give at most one recipe, got {', '.join(words)}")
    if getattr(args, "config", None):
        files.append(resolve_recipe(args.config))
    return config_lib.build(files, overrides)
