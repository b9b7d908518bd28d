"""Who owns an output: every command writes only files it created, atomically, and refuses the rest.

Each directory a command writes into carries a small manifest, ``.randsac_outputs.json``::

    {"format": 1, "owner": "train", "files": {"config.json": "train", "recon.png": "viz", ...}}

``owner`` is the command that holds the directory as a whole (a run directory of train / linprobe /
finetune / ablate, a timm or save_pretrained export directory, a shard folder); ``files`` names the
top-level entries each command wrote there. Two rules follow:

* :func:`claim_dir` — a command that owns a whole directory refuses one that holds another
  command's artifacts (its manifest names another owner, or, for directories written before
  manifests existed, its files say what it is: :func:`identify`), and one whose files it would
  write exist without being its own (a ``config.json`` the user put there).
* :func:`claim_file` — a command writing single files (a figure, a weights file + its ``.json``
  sidecar, a report) may write into another command's directory (``RUN/recon.png``), but never
  replaces a file it did not write, never takes a name the directory's owner writes
  (``RUN/probe.json``), and never writes into a checkpoint directory.

Every refusal is one line naming the file and the fix: another ``--out``, or ``--force`` to write
there anyway. :func:`atomic_write` writes every file through a temporary name, fsync and rename,
under an ``flock`` of the directory (the manifest's read-modify-write too), so a reader never sees
half a file and two writers never interleave. :func:`disk_message` turns ENOSPC / EROFS / ENOTDIR /
EACCES into one line naming the path and the free space.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil

__all__ = ["OutputRefused", "MANIFEST", "RUN_FILES", "identify", "check_dir", "claim_dir", "claim_file",
           "record", "atomic_write", "disk_message", "DISK_ERRNOS", "OutputError"]

MANIFEST = ".randsac_outputs.json"

#: The top-level names each directory-owning command writes into its directory.
RUN_FILES: dict[str, tuple[str, ...]] = {
    "train": ("config.json", "metrics.jsonl", "checkpoints", "tb", "probe.json", "wandb_id", "wandb"),
    "linprobe": ("metrics.jsonl", "checkpoints", "tb", "results.json", "wandb_id", "wandb"),
    "finetune": ("metrics.jsonl", "checkpoints", "tb", "results.json", "wandb_id", "wandb"),
    "ablate": ("cells", "ablation.json", "ablation.md", "ablation.png"),
    "interop export": ("config.json", "model.safetensors"),
    "interop pretrained": ("config.json", "model.safetensors"),
    "data make-shards": ("sizes.json", "classes.json"),
}

_WHAT = {"train": "a pre-training run directory", "linprobe": "a linear-probe run directory",
         "finetune": "a fine-tuning run directory", "ablate": "an ablation directory",
         "interop export": "a timm export directory", "interop pretrained": "a save_pretrained directory",
         "data make-shards": "a shard folder", "checkpoint": "a checkpoint directory",
         "checkpoints": "a run's checkpoints directory"}

_STEP_DIR = re.compile(r"^step_\d{8}(\.branch\d+)?$")
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EISDIR)


_locked: set[str] = set()   # directories whose flock this process holds


class OutputRefused(ValueError):
    """A command would write over (or among) another command's or the user's files."""


class OutputError(OSError):
    """A write failed for a reason of the file system (full, read-only, ...); str() is one line."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


# ---- reading what a directory is ----------------------------------------------------------------
def _manifest(directory: str) -> dict:
    try:
        with open(os.path.join(directory, MANIFEST)) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _json(path: str) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _legacy_task(directory: str) -> str:
    """A run directory written before manifests: the task its checkpoints record, else train."""
    root = os.path.join(directory, "checkpoints")
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(root)):
            task = _json(os.path.join(root, name, "meta.json")).get("task")
            if task in ("linprobe", "finetune"):
                return task
            if task is None and os.path.exists(os.path.join(root, name, "meta.json")):
                return "train"
    results = _json(os.path.join(directory, "results.json"))
    if results:
        return "finetune" if "losses" in results or "layer_decay" in results.get("args", {}) else "linprobe"
    return "train"


def identify(directory: str) -> str | None:
    """The command that owns ``directory`` (its manifest's owner; else what its files show for a
    directory written before manifests existed: a run directory, a checkpoint, an export ...), or
    None for a plain directory (or one that does not exist)."""
    owner = _manifest(directory).get("owner")
    if owner:
        return owner
    try:
        names = set(os.listdir(directory))
    except OSError:
        return None
    if "meta.json" in names and (".metadata" in names or any(n.startswith("rank_") for n in names)):
        return "checkpoint"
    if any(_STEP_DIR.match(n) for n in names):
        return "checkpoints"
    if "checkpoints" in names or "metrics.jsonl" in names:
        return _legacy_task(directory)
    if "config.json" in names and "model.safetensors" in names:
        cfg = _json(os.path.join(directory, "config.json"))
        return "interop pretrained" if cfg.get("format") == "randsac_fast" else "interop export"
    if "ablation.json" in names or "cells" in names:
        return "ablate"
    if "sizes.json" in names and any(n.endswith(".tar") for n in names):
        return "data make-shards"
    if "config.json" in names and {"model", "train"} <= set(_json(os.path.join(directory, "config.json"))):
        return "train"
    return None


def describe(owner: str) -> str:
    return _WHAT.get(owner, f"{owner}'s output")


# ---- the rules ------------------------------------------------------------------------------------
def check_dir(out: str, command: str, *, force: bool = False, flag: str = "--out") -> None:
    """Raise OutputRefused unless ``command`` may hold ``out`` as its own directory (pure: writes nothing)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputRefused(f"{flag} {out} is a file; {command} writes a directory — pass a directory path")
    if force or not os.path.isdir(out):
        return
    owner = identify(out)
    if owner is not None and owner != command:
        raise OutputRefused(f"{flag} {out} is {describe(owner)} ({owner} wrote it); {command} does not write among "
                            f"another command's files — pass another {flag} (e.g. {os.path.join(out, command.split()[-1])}) "
                            "or --force to write there anyway")
    mine = _manifest(out).get("files", {})
    for name in RUN_FILES.get(command, ()):
        if os.path.lexists(os.path.join(out, name)) and owner is None and mine.get(name) != command:
            raise OutputRefused(f"{flag} {out} already holds {name}, which {command} did not write; pass another "
                                f"{flag} or --force to replace it")


def claim_dir(out: str, command: str, *, force: bool = False, flag: str = "--out") -> None:
    """Check (see :func:`check_dir`), create ``out`` and record ``command`` as its owner."""
    check_dir(out, command, force=force, flag=flag)
    with _writing(out):
        os.makedirs(out, exist_ok=True)
    record(out, command, RUN_FILES.get(command, ()), owner=True)


def claim_file(path: str, command: str, *, force: bool = False, flag: str = "--out") -> None:
    """Raise OutputRefused unless ``command`` may write the single file ``path`` (pure)."""
    directory, name = os.path.split(os.path.abspath(path))
    if os.path.isdir(path):
        raise OutputRefused(f"{flag} {path} is a directory; pass a file name")
    if force or not os.path.isdir(directory):
        return
    owner = identify(directory)
    if owner in ("checkpoint", "checkpoints"):
        raise OutputRefused(f"{flag} {path} is inside {describe(owner)}, which holds only what the trainer's save "
                            f"wrote; pass another {flag} (e.g. beside the run directory)")
    written_by = _manifest(directory).get("files", {}).get(name)
    if os.path.lexists(path) and written_by != command:
        whose = f"{written_by} wrote it" if written_by else f"{command} did not write it"
        if owner is not None and name in RUN_FILES.get(owner, ()):
            whose = f"it belongs to {describe(owner)}"
        raise OutputRefused(f"{flag} {path}: {path} exists and {whose}; pass another {flag} or --force to replace it")
    if owner is not None and owner != command and name in RUN_FILES.get(owner, ()):
        raise OutputRefused(f"{flag} {path}: {name} is a name {describe(owner)} uses ({owner} writes it); pass "
                            f"another {flag}")


def record(directory: str, command: str, names, *, owner: bool = False) -> None:
    """Add ``names`` (top-level entries of ``directory``) to its manifest as written by ``command``."""
    names = list(names)
    with _writing(directory):
        data = _manifest(directory) or {"format": 1, "owner": None, "files": {}}
        files = data.setdefault("files", {})
        changed = False
        if owner and data.get("owner") != command:
            data["owner"], changed = command, True
        for n in names:
            if files.get(n) != command:
                files[n], changed = command, True
        if changed:
            _replace(os.path.join(directory, MANIFEST),
                     lambda tmp: _write_text(tmp, json.dumps(data, indent=1, sort_keys=True) + "\n"))


# ---- writing --------------------------------------------------------------------------------------
def _write_text(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


@contextlib.contextmanager
def _writing(directory: str):
    """An flock of ``directory`` (no file of its own) for the duration; best effort where the file
    system has no flock. Any OSError inside becomes an OutputError naming the path."""
    fd, key = None, os.path.abspath(directory)
    try:
        with contextlib.suppress(OSError):
            os.makedirs(directory, exist_ok=True)
        if key not in _locked:          # flock is per open file: this process already holds it
            with contextlib.suppress(OSError):
                fd = os.open(directory, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX)
                _locked.add(key)
        yield
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(e.errno, disk_message(e, getattr(e, "filename", None) or directory)) from None
    finally:
        if fd is not None:
            _locked.discard(key)
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace(path: str, write) -> None:
    """``write(tmp)`` creates a temporary file beside ``path``; fsync it and rename it over ``path``."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.tmp{os.getpid()}{os.path.splitext(name)[1]}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OutputError(e.errno, disk_message(e, path)) from None   # the file meant, not its temporary
        raise
    _fsync_dir(directory)


def atomic_write(path: str, write, command: str | None = None) -> str:
    """Write ``path`` through ``write(tmp_path)`` (which creates the file at ``tmp_path``), fsync,
    rename, under the directory's flock; record it in the manifest as ``command``'s when given.
    A file-system failure raises OutputError with one line (see :func:`disk_message`)."""
    directory = os.path.dirname(os.path.abspath(path))
    with _writing(directory):
        if command is not None:
            record(directory, command, [os.path.basename(path)])
        _replace(path, write)
    return path


def atomic_text(path: str, text: str, command: str | None = None) -> str:
    return atomic_write(path, lambda tmp: _write_text(tmp, text), command)


# ---- file-system errors as one line ---------------------------------------------------------------
def _free(path: str) -> str:
    probe = path
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        free = shutil.disk_usage(probe or ".").free
    except OSError:
        return "free space unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"
        free /= 1024
    return ""


def disk_message(e: OSError, path: str | None = None) -> str:
    """One line for a file-system failure: what happened, where, the free space there, the fix."""
    path = path if path is not None else getattr(e, "filename", None)
    path = os.fspath(path) if path is not None else "?"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on {path} ({_free(path)}); free space there or pass another --out, "
                "then run the command again (files written before are kept)")
    if e.errno == errno.EROFS:
        return f"{path} is on a read-only file system; pass an --out on a writable one"
    if e.errno == errno.ENOTDIR:
        return f"{path}: a part of this path is a file, not a directory; pass another path"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{path}: permission denied; pass a path you can write to"
    if e.errno == errno.EISDIR:
        return f"{path} is a directory; pass a file name"
    return f"{path}: {e.strerror or e}"
