"""Run directories: where a run lives, how it is claimed and resumed, and atomic writes.

A run directory holds `config.yaml`, `manifest.json`, `checkpoints/`, `logs/` (TensorBoard),
`backup/` (BackupAndRestore state while a run is unfinished) and `metrics.json` once it is done.
Re-running a command whose run directory holds an unfinished run with the same config resumes
it; a finished or foreign run is never written into, the next free numbered name is used
instead. A run is claimed with an exclusive lock (flock), so two commands started together with
the same name get two directories, and a killed run's lock goes with its process. Every file is
written to a temporary name and renamed into place, so a reader never sees half a file.

Outputs a command is asked to write (exports, predictions, evaluations, reports, shards) never
delete or replace what tfkarpa did not write: an output path that exists is replaced only when
it is tfkarpa's own earlier output of the same kind, or an empty folder (`check_output_dir`,
`check_output_file`); anything else is an error naming it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from tfkarpa import config as config_lib
from tfkarpa.errors import TfkarpaError

LOCK = "run.lock"
DONE = "metrics.json"
PACKAGES = ("tfkarpa", "tensorflow", "tf-keras", "keras-cv", "tensorflow-datasets",
            "tensorflow-model-optimization", "numpy", "scikit-learn")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TEMPORARY = re.compile(r"^\..*tmp-(\d+)-")


def temporary_prefix(name: str) -> str:
    """How every temporary of `name` starts: hidden, with this process's id, so a later
    process can tell a killed writer's leftovers from a live one's work."""
    return f".{name}.tmp-{os.getpid()}-"


def sweep_temporaries(directory: Path) -> None:
    """Remove temporaries in `directory` left by processes that died mid-write (SIGKILL)."""
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match and not pid_alive(int(match.group(1))):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


# Outputs. tfkarpa never deletes or replaces what it did not write. A folder it produces whole
# (a SavedModel, predictions, shards, an evaluation) holds OUTPUT_MARK naming its kind; a file it
# writes into someone's folder (report.md, a .tflite) is recorded in that folder's OUTPUT_FILES.
# An output path that exists may be replaced only when it is tfkarpa's own output of the same
# kind, or an empty folder; anything else is refused, naming the path.
OUTPUT_MARK = ".tfkarpa-output"
OUTPUT_FILES = ".tfkarpa-files.json"


def output_kind(path: Path) -> str | None:
    """The kind of tfkarpa output folder `path` is, or None when it is not one."""
    path = Path(path)
    try:
        return (path / OUTPUT_MARK).read_text().strip() or None
    except OSError:
        pass
    # Folders written before the marks existed, known by the metadata tfkarpa put in them.
    meta, schema = read_json(path / "tfkarpa.json"), read_json(path / "dataset.json")
    if (path / "saved_model.pb").is_file() and isinstance(meta, dict) and "task" in meta:
        return "saved_model"
    if isinstance(schema, dict) and schema.get("format") == "tfkarpa.tfrecord":
        return "tfrecord"
    return None


def _refuse(path: Path, what: str, found: str) -> TfkarpaError:
    return TfkarpaError(f"{what} '{path}' {found}, which tfkarpa did not write and will not "
                        "replace; choose another path, or move it away yourself")


def check_output_dir(path: Path, kind: str, what: str) -> None:
    """Refuse unless the folder `path` may become a `kind` output: absent, empty, or tfkarpa's
    own earlier output of that kind."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink():  # replacing it would drop the link, whatever it points to
        raise _refuse(path, what, "is a symbolic link")
    if not path.is_dir():
        raise _refuse(path, what, "exists and is not a folder")
    found = output_kind(path)
    if found == kind:
        return
    entries = [e.name for e in path.iterdir() if not _TEMPORARY.match(e.name)]
    if not entries:
        return
    if found:
        raise TfkarpaError(f"{what} '{path}' holds another kind of tfkarpa output ({found}, "
                           f"not {kind}); choose another path")
    raise _refuse(path, what, f"holds files ('{sorted(entries)[0]}'"
                              f"{f' and {len(entries) - 1} more' if len(entries) > 1 else ''})")


def claim_output_dir(path: Path, kind: str, what: str) -> Path:
    """Check `path` as a `kind` output folder (see `check_output_dir`), create it and mark it:
    for outputs written file by file into one folder (an evaluation's reports)."""
    path = Path(path)
    check_output_dir(path, kind, what)
    path.mkdir(parents=True, exist_ok=True)
    if output_kind(path) != kind:
        atomic_write_text(path / OUTPUT_MARK, kind + "\n")
    return path


def check_output_file(path: Path, kind: str, what: str = "output") -> None:
    """Refuse unless the file `path` is absent or tfkarpa wrote it as a `kind` output."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() or path.is_symlink():
        raise _refuse(path, what, "is a folder or a symbolic link")
    if _output_files(path.parent).get(path.name) != kind:
        raise _refuse(path, what, "exists")


def _output_files(folder: Path) -> dict:
    known = read_json(folder / OUTPUT_FILES)
    return known if isinstance(known, dict) else {}


def _record_output_file(path: Path, kind: str) -> None:
    record = path.parent / OUTPUT_FILES
    known = _output_files(path.parent)
    if known.get(path.name) != kind:
        atomic_write_json(record, {**known, path.name: kind})


def atomic_write_bytes(path: Path, data: bytes, kind: str | None = None) -> None:
    """Write `path` whole, under a temporary name renamed into place. With `kind` it is an
    output the user asked for, in a folder that may hold their files: it may replace only
    tfkarpa's own earlier `kind` output (see `check_output_file`), and is recorded as one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind:
        check_output_file(path, kind)
        _record_output_file(path, kind)  # first: a file on disk is always on the record
    sweep_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; the result is ordinary
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str, kind: str | None = None) -> None:
    atomic_write_bytes(path, text.encode(), kind)


def atomic_write_json(path: Path, obj, kind: str | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", kind)


@contextlib.contextmanager
def atomic_dir(final: Path, kind: str, what: str = "output"):
    """Yield a temporary sibling directory; on success it replaces `final` in one rename.

    `final` may be replaced only when it is absent, empty, or tfkarpa's own `kind` output
    (checked first, and again just before the swap); the result is marked as one."""
    final = Path(final)
    check_output_dir(final, kind, what)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(final.name), dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        (tmp / OUTPUT_MARK).write_text(kind + "\n")
        check_output_dir(final, kind, what)
        old = None
        if final.exists():
            old = final.parent / f"{temporary_prefix(final.name)}old"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_writable(directory: Path, what: str) -> None:
    """Fail early, before any work, if `directory` could not be created and written.

    Probes the nearest existing ancestor with a temporary file and creates nothing, so a
    command that fails later leaves no empty folders behind.
    """
    directory = Path(directory).absolute()
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    problem = None
    if not probe.is_dir():
        problem = f"'{probe}' is not a directory"
    else:
        try:
            with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-test-"):
                pass
        except OSError as err:
            problem = err.strerror or str(err)
    if problem:
        raise TfkarpaError(f"{what} '{directory}' is not writable: {problem}")


# Locks this process holds, by run directory: the open descriptor keeps the flock.
_HELD: dict[str, int] = {}


def _try_lock(directory: Path) -> bool:
    """Take the run's lock: an exclusive flock on `run.lock`, held while this process owns the
    run. The kernel drops it when the process ends, however it ends, so a killed run never
    leaves a stale lock; the pid in the file is for people reading it."""
    key = str(Path(directory).resolve())
    if key in _HELD:
        return True
    path = Path(directory) / LOCK
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:  # the holder before us may have removed the file we opened: lock the current one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD[key] = fd
    return True


def _release_lock(directory: Path) -> None:
    fd = _HELD.pop(str(Path(directory).resolve()), None)
    if fd is not None:
        (Path(directory) / LOCK).unlink(missing_ok=True)  # then unlock: see _try_lock
        os.close(fd)


def lock_held(directory: Path) -> bool:
    """Whether a live process holds the run's lock."""
    path = Path(directory) / LOCK
    if str(Path(directory).resolve()) in _HELD:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing also drops a lock we just took
    return False


@dataclass
class Run:
    """A claimed run directory."""

    dir: Path
    name: str
    resumed: bool
    created: bool = True  # False when the user's own (empty) run_dir was used
    shared: Path | None = None  # a non-chief worker's view of the chief's run directory

    @property
    def backup_dir(self) -> Path | None:
        return self.shared / "backup" if self.shared else None

    @property
    def chief_checkpoints(self) -> Path:
        """Where every worker reads checkpoint state: the same files, the same decisions."""
        return (self.shared or self.dir) / "checkpoints"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def backup(self) -> Path:
        return self.backup_dir or self.dir / "backup"

    def release(self) -> None:
        _release_lock(self.dir)

    def discard(self) -> None:
        """Remove a run that failed before it produced anything worth keeping.

        A run_dir the user made beforehand is emptied, not removed."""
        if self.created:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        for child in self.dir.iterdir():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()


def _same_config(directory: Path, config: dict) -> bool:
    try:
        return yaml.safe_load((directory / "config.yaml").read_text()) == config
    except (OSError, yaml.YAMLError):
        return False


def finished_twin(runs_root: str, name: str, config: dict) -> dict | None:
    """The result ({run_dir, artifacts, metrics}) of a finished run named `name` with exactly
    this config, if there is one: chained commands (compress stages, finetune head=probe) use
    it to go on after a stop without redoing their finished steps."""
    directory = Path(runs_root) / name
    done = read_json(directory / DONE)
    if not done or not _same_config(directory, config):
        return None
    return {"run_dir": str(directory), "artifacts": done.get("artifacts", {}),
            "metrics": done.get("metrics", {})}


def _holds_files(directory: Path) -> bool:
    """Whether `directory` holds anything besides a run lock and writers' temporaries: a run
    being claimed at this moment by another process has made its lock file, nothing else."""
    try:
        return any(e.name != LOCK and not _TEMPORARY.match(e.name) for e in directory.iterdir())
    except OSError:
        return False


def claim(runs_root: str, name: str, run_dir: str, config: dict) -> Run:
    """Claim the directory for a run: resume an unfinished twin, else the next free name."""
    if run_dir:
        directory = Path(run_dir)
        ensure_writable(directory, "run_dir")
        if (directory / DONE).exists():
            raise TfkarpaError(
                f"run_dir '{directory}' already holds a finished run; choose another run_dir"
            )
        if _holds_files(directory) and not _same_config(directory, config):
            if lock_held(directory):  # a twin started at the same moment: its config is not
                raise TfkarpaError(   # written yet, so only the lock tells it apart
                    f"run_dir '{directory}' is in use by another process")
            if not (directory / "config.yaml").exists():
                raise _refuse(directory, "run_dir", "holds files and no tfkarpa run")
            raise TfkarpaError(
                f"run_dir '{directory}' holds a different, unfinished run; choose another run_dir "
                "or re-run with that run's config to resume it"
            )
        existed = directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        if not _try_lock(directory):
            raise TfkarpaError(f"run_dir '{directory}' is in use by another process")
        return Run(directory, directory.name, resumed=(directory / "config.yaml").exists(),
                   created=not existed)

    problem = config_lib.run_name_problem(name)  # validated with the config; a library caller too
    if problem:
        raise TfkarpaError(f"run name {problem}")
    root = Path(runs_root)
    ensure_writable(root, "runs_root")
    root.mkdir(parents=True, exist_ok=True)
    for index in range(1, 10_000):
        candidate = root / (name if index == 1 else f"{name}-{index}")
        try:
            candidate.mkdir()
            fresh = True
        except FileExistsError:
            fresh = False
        if not fresh and ((candidate / DONE).exists() or not _same_config(candidate, config)):
            continue
        if _try_lock(candidate):
            return Run(candidate, candidate.name, resumed=not fresh)
    raise TfkarpaError(f"no free run name '{name}-N' under '{root}'")


def read_json(path: Path) -> dict:
    """A JSON file's content, or {} when it is missing or unreadable (reports, listings)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def save_config(cfg: config_lib.Config, path: Path) -> None:
    atomic_write_text(path, config_lib.dump(cfg))


def read_config(run_dir: str | Path, overrides: list[str] = ()) -> config_lib.Config:
    """The run's resolved `config.yaml` as a Config (`overrides` applied), or an error that says
    what `run_dir` is instead."""
    path = Path(run_dir) / "config.yaml"
    try:
        stored = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        if not Path(run_dir).exists():
            raise TfkarpaError(f"'{run_dir}' is not a run directory: it does not exist") from None
        raise TfkarpaError(f"'{run_dir}' is not a run directory (no config.yaml)") from None
    except yaml.YAMLError as err:
        raise TfkarpaError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(stored, dict):
        raise TfkarpaError(f"{path}: not a run config (a mapping of keys)")
    return config_lib.build(base=stored, overrides=overrides)


def _model_label(cfg: dict) -> str:
    """The model column of a run listing; an ensemble lists its method and size."""
    members = (cfg.get("ensemble") or {}).get("members") or []
    name = (cfg.get("model") or {}).get("name")
    if members:
        return f"ensemble({len(members)}, {cfg['ensemble'].get('method', 'mean')})"
    return name


def class_names(run_dir: str | Path) -> list[str]:
    """The classes a run was trained on, from its manifest."""
    manifest = read_json(Path(run_dir) / "manifest.json")
    if "data" not in manifest:
        raise TfkarpaError(f"run '{run_dir}' has no manifest.json: it did not get past its start")
    return list(manifest["data"]["classes"])


def weights_file(run_dir: str | Path) -> Path:
    """A run's weights: the final ones of a finished run, else its best, else its last
    checkpoint."""
    checkpoints = Path(run_dir) / "checkpoints"
    for name in ("final.weights.h5", "best.weights.h5", "last.weights.h5"):
        if (checkpoints / name).exists():
            return checkpoints / name
    raise TfkarpaError(f"run '{run_dir}' has no checkpoint yet (checkpoints/*.weights.h5); "
                       "train it first")


def describe(run_dir: Path) -> dict:
    """What `runs` lists and the report's overview shows about one run directory."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    manifest = read_json(run_dir / "manifest.json")
    done = read_json(run_dir / DONE)
    metrics = done.get("metrics", {})
    # The fit loop records the task's headline figure in the manifest; runs from before it
    # did show their first test figure.
    key = manifest.get("key_metric") or next(
        (k for k in metrics if k.startswith("test_")), "test_accuracy")
    weights = run_dir / "checkpoints" / "final.weights.h5"
    status = "finished" if done else ("running" if lock_held(run_dir) else "unfinished")
    return {"name": run_dir.name, "path": str(run_dir), "status": status,
            "task": cfg.get("task"),
            "data": cfg.get("data", {}).get("source"), "model": _model_label(cfg),
            "stages": cfg.get("stages") or [], "metric": key, "value": metrics.get(key),
            "params": manifest.get("model", {}).get("params"),
            "size_bytes": weights.stat().st_size if weights.is_file() else None,
            "epochs": metrics.get("epochs_run"), "seconds": metrics.get("total_seconds"),
            "created": manifest.get("created")}


def list_runs(root: str | Path) -> list[dict]:
    """Every run directory directly under `root` (or `root` itself), oldest first."""
    root = Path(root)
    dirs = [root] if (root / "config.yaml").is_file() else sorted(
        d for d in root.iterdir() if (d / "config.yaml").is_file())
    found = []
    for d in dirs:
        try:
            found.append(describe(d))
        except (OSError, yaml.YAMLError, AttributeError) as err:
            found.append({"name": d.name, "path": str(d), "status": "unreadable", "task": "-",
                          "data": "-", "model": str(err)[:60], "stages": [], "metric": "-",
                          "value": None, "params": None, "size_bytes": None, "epochs": None,
                          "seconds": None, "created": None})
    return sorted(found, key=lambda r: (r.get("created") or "", r["name"]))


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
            text=True, timeout=5, cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def command_line() -> list[str]:
    """The command as the user typed it: `python -m pipelines demo`, not the path of the
    module's `__main__.py` that `sys.argv` holds (the interpreter shown by its name)."""
    argv = list(getattr(sys, "orig_argv", None) or sys.argv)
    if argv and Path(argv[0]).name.startswith("python"):
        argv[0] = "python"
    return argv


def manifest(config: dict, data_summary: dict, extra: dict | None = None) -> dict:
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "packages": package_versions(),
        "seed": config.get("seed"),
        "data": data_summary,
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        **(extra or {}),
    }
