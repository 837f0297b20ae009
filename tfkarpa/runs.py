"""Run directories: where a run lives, how it is claimed and resumed, and atomic writes.

A run directory holds `config.yaml`, `manifest.json`, `checkpoints/`, `logs/` (TensorBoard),
`backup/` (BackupAndRestore state while a run is unfinished) and `metrics.json` once it is done.
Re-running a command whose run directory holds an unfinished run with the same config resumes
it; a finished or foreign run is never written into, the next free numbered name is used
instead. A run is claimed with an exclusive lock file, so two commands started together with the
same name get two directories. Every file is written to a temporary name and renamed into
place, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from tfkarpa.errors import TfkarpaError

LOCK = "run.lock"
DONE = "metrics.json"
PACKAGES = ("tfkarpa", "tensorflow", "tf-keras", "keras-cv", "tensorflow-datasets",
            "tensorflow-model-optimization", "numpy", "scikit-learn")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling directory; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_lock(directory: Path) -> bool:
    lock = directory / LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                return False
            if pid and _pid_alive(pid) and pid != os.getpid():
                return False
            lock.unlink(missing_ok=True)  # left by a process that died: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
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
        (self.dir / LOCK).unlink(missing_ok=True)

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


def claim(runs_root: str, name: str, run_dir: str, config: dict) -> Run:
    """Claim the directory for a run: resume an unfinished twin, else the next free name."""
    if run_dir:
        directory = Path(run_dir)
        ensure_writable(directory, "run_dir")
        if (directory / DONE).exists():
            raise TfkarpaError(
                f"run_dir '{directory}' already holds a finished run; choose another run_dir"
            )
        if directory.exists() and any(directory.iterdir()) and not _same_config(directory, config):
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


def manifest(config: dict, data_summary: dict, extra: dict | None = None) -> dict:
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "packages": package_versions(),
        "seed": config.get("seed"),
        "data": data_summary,
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        **(extra or {}),
    }
