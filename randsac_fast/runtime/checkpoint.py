"""Checkpoints: torch.distributed.checkpoint (DCP), verified, written atomically, in branches.

Layout under ``<out>/checkpoints``::

    step_00000100/          .metadata + DCP shards (model, optimizer: sharded, resharding on load)
                            rank_<r>.pt   this rank's RNG states (torch, cuda, order generator)
                            meta.json     step, data position, schedule, world size, branch, and the
                                          size + sha256 of every other file (written last)
    step_00000060.branch1/  a checkpoint of branch 1 (a run resumed from an older step, see below)
    .tmp_step_00000200/     a save in progress (or one that crashed): never read, removed by the next save

**Never a broken or partial checkpoint.** Before anything is written, every rank checks its shards
of the parameters, the optimizer state and the last gradient norm for NaN/Inf, and the ranks agree
through one all-reduce: a non-finite state raises :class:`NonFiniteState` and nothing is written.
A save writes into a temporary directory, reads every file back to record its size and sha256 in
``meta.json``, renames the directory into place (the commit point) and checks the committed copy;
only then are older checkpoints of the branch pruned. A crash, a full disk (``no space left on
PATH``) or any other failure leaves the earlier checkpoints untouched and no partial files.

**Integrity on load.** :meth:`Checkpointer.verify` compares every file's size and sha256 with the
record (the ranks share the reading). ``--resume latest`` skips a damaged newest checkpoint, says so,
and takes the newest intact one; an explicitly named damaged checkpoint is refused.

**Branches (resuming from the past).** Every save gets a serial number, increasing across the run
directory. Resuming from a checkpoint that is the newest of its branch continues that branch.
Resuming from an older one (``--resume .../step_00000002`` while step 8 exists, or ``latest``
falling back past a damaged checkpoint) starts a new branch: its checkpoints are named
``step_XXXXXXXX.branchN``, pruning (``--keep``) only ever deletes checkpoints of the branch being
written, older than the one just written, and the newer checkpoints of the abandoned branch are kept.
``latest`` is the checkpoint with the highest serial, i.e. the newest save of the newest branch.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import collectives

__all__ = ["Checkpointer", "CheckpointError", "NonFiniteState", "DamagedCheckpoint", "rng_state",
           "set_rng_state", "non_finite_state", "read_meta"]

_CKPT_DIR = re.compile(r"^step_(\d{8})(?:\.branch(\d+))?$")
_META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint could not be written or read; the message says why and what to do."""


class NonFiniteState(CheckpointError):
    """The model or optimizer state holds NaN/Inf: it is not saved."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint's files do not match the sizes and digests recorded when it was saved."""


def rng_state(order_generator: torch.Generator) -> dict:
    """Every random state a rank draws from: global torch (CPU), CUDA, and the order generator."""
    state = {"torch": torch.get_rng_state(), "order": order_generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, order_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    order_generator.set_state(state["order"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- collectives that tolerate a missing process group (tools reading one checkpoint) ----------
def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _gather(obj) -> list:
    return collectives.all_gather_object(obj)


def _agree(error: str | None) -> str | None:
    """Every rank passes its own error (or None); every rank gets the first one (or None)."""
    errors = _gather(error)
    for r, e in enumerate(errors):
        if e is not None:
            return e if _world() == 1 else f"rank {r}: {e}"
    return None


def _broadcast(obj):
    return collectives.broadcast_object(obj)


# ---- finite check --------------------------------------------------------------------------
def _local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a partial sum for a reduced norm), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def non_finite_state(model, optimizer=None, grad_norm=None) -> str | None:
    """Collective: None if every parameter, optimizer-state tensor and the gradient norm is finite,
    else a description naming the first bad tensors. One all-reduce (MAX) over a flag per tensor,
    so every rank gets the same answer; each rank reads only its own shards."""
    names = {p: n for n, p in model.named_parameters()}
    checked: list[tuple[str, torch.Tensor]] = [(n, p) for p, n in names.items()]
    if optimizer is not None:
        for p, state in optimizer.state.items():
            for key, val in state.items():
                if torch.is_tensor(val) and val.is_floating_point() and key != "step":
                    checked.append((f"optimizer {key} of {names.get(p, '?')}", val))
    if grad_norm is not None:
        checked.append(("the gradient norm", grad_norm if torch.is_tensor(grad_norm) else torch.tensor(grad_norm)))
    if not checked:
        return None
    device = _local_part(checked[0][1]).device
    # Fast screen: a sum is NaN/Inf when some element is (one read per tensor, no boolean temporary).
    # A sum can also overflow with finite elements, so a flagged tensor is checked element-wise.
    local = [_local_part(t).detach() for _, t in checked]
    flags = torch.stack([~torch.isfinite(t.sum()).to(device) for t in local]).to(torch.int32)
    for i in flags.nonzero().flatten().tolist():
        flags[i] = int(not torch.isfinite(local[i]).all())
    if _world() > 1:
        flags = collectives.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad = [checked[i][0] for i in flags.nonzero().flatten().tolist()]
    if not bad:
        return None
    params = [b for b in bad if b in names.values()]
    parts = []
    if params:
        parts.append(f"{len(params)} of {len(names)} parameter tensors hold NaN/Inf (first: {params[0]})")
    if len(bad) > len(params):
        rest = [b for b in bad if b not in params]
        parts.append(f"{len(rest)} other tensors too (first: {rest[0]})")
    return "; ".join(parts)


# ---- files -----------------------------------------------------------------------------------
def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: str, write) -> None:
    with open(path, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def _digest(path: str) -> dict:
    with open(path, "rb") as fh:
        return {"size": os.fstat(fh.fileno()).st_size, "sha256": hashlib.file_digest(fh, "sha256").hexdigest()}


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _owner(name: str, world: int) -> int:
    """The rank that wrote (and digests) a file of the checkpoint: DCP's ``__<rank>_*`` shards and
    ``rank_<r>.pt`` are local to their writer; the rest (``.metadata``) is rank 0's."""
    m = re.match(r"^(?:__(\d+)_|rank_(\d+)\.pt$)", name)
    r = int(next(g for g in m.groups() if g is not None)) if m else 0
    return r if r < world else 0


def read_meta(path: str) -> dict:
    """meta.json of a checkpoint directory; DamagedCheckpoint if unreadable or altered."""
    try:
        with open(os.path.join(path, _META)) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{path}/{_META} cannot be read ({e})") from None
    if not isinstance(meta, dict) or ("digest" in meta and meta["digest"] != _meta_digest(meta)):
        raise DamagedCheckpoint(f"{path}/{_META} does not match its recorded digest (bytes changed on disk)")
    return meta


def _disk_full(exc: BaseException) -> bool:
    """Is an ENOSPC / EDQUOT somewhere in this exception, its causes, or DCP's per-rank failures?"""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, CheckpointException):
            todo += [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        todo += [e.__cause__, e.__context__]
    return False


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, CheckpointException):
        inner = [f[0] if isinstance(f, tuple) else f for f in exc.failures.values()]
        if inner:
            exc = inner[0]
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


class Checkpointer:
    """Saves and loads the checkpoints of one run directory. Collective methods: every rank calls them."""

    def __init__(self, out_dir: str, keep: int, rank: int, world: int):
        if keep < 1:
            raise ValueError(f"--keep must be at least 1; got {keep}")
        self.root = os.path.join(out_dir, "checkpoints")
        self.keep, self.rank, self.world = keep, rank, world
        self.branch: int | None = None    # decided by load() or the first save
        self.parent: str | None = None    # the checkpoint this branch started from
        self.last_good: str | None = None  # verified: loaded or saved by this run

    # ---- finding checkpoints ----------------------------------------------------------------
    def entries(self) -> list[dict]:
        """Committed checkpoints, oldest save first: {path, name, step, branch, serial, meta or None}.
        A directory whose meta.json cannot be read sorts last (treated as the newest, damaged)."""
        if not os.path.isdir(self.root):
            return []
        found = []
        for name in os.listdir(self.root):
            m = _CKPT_DIR.match(name)
            path = os.path.join(self.root, name)
            if not m or not os.path.exists(os.path.join(path, _META)):
                continue
            try:
                meta = read_meta(path)
            except DamagedCheckpoint:
                meta = None
            step, branch = int(m.group(1)), int(m.group(2) or 0)
            serial = meta.get("serial", -1) if meta else float("inf")
            found.append(dict(path=path, name=name, step=step, branch=branch, serial=serial, meta=meta))
        return sorted(found, key=lambda e: (e["serial"], e["step"], e["branch"]))

    def incomplete(self) -> list[tuple[str, str]]:
        """Checkpoint-like directories that are not committed checkpoints, with the reason:
        ``step_X`` without meta.json (files removed or copied in part) and unfinished saves."""
        if not os.path.isdir(self.root):
            return []
        found = []
        for name in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, name)
            if _CKPT_DIR.match(name) and not os.path.exists(os.path.join(path, _META)):
                found.append((path, "it has no meta.json (an incomplete copy, or files were removed); it is kept, "
                                    "not read"))
            elif name.startswith(".tmp_step_"):
                found.append((path, "an unfinished save (interrupted); the next save removes it"))
        return found

    def complete(self) -> list[str]:
        """Committed checkpoint directories, oldest save first."""
        return [e["path"] for e in self.entries()]

    def latest(self) -> str | None:
        done = self.complete()
        return done[-1] if done else None

    def resolve(self, resume: str, say=None) -> str | None:
        """Collective. ``latest`` -> the newest intact checkpoint (None if there is none yet); a
        damaged newer one is reported through ``say`` and skipped. Else the path, verified."""
        if resume != "latest":
            if not os.path.exists(os.path.join(resume, _META)):
                raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint directory "
                                        "(no meta.json); pass 'latest' or a step_XXXXXXXX directory")
            problem = self.verify(resume)
            if problem:
                newest = self._newest_intact()
                hint = (f"; the newest intact checkpoint is {newest}" if newest
                        else "; no intact checkpoint is left in this run")
                raise DamagedCheckpoint(f"--resume {resume}: the checkpoint is damaged: {problem}{hint}")
            return resume
        entries, passed = _broadcast((self.entries(), self.incomplete()) if self.rank == 0 else None)
        for path, why in passed:     # never silently: every directory passed over is named
            (say or print)(f"warning: --resume latest skips {path}: {why}")
        damaged = []
        for e in reversed(entries):
            problem = self.verify(e["path"])
            if problem is None:
                for path, why in damaged:
                    (say or print)(f"warning: checkpoint {path} is damaged ({why}); skipping it")
                if damaged:
                    (say or print)(f"--resume latest: the newest intact checkpoint is {e['path']}")
                return e["path"]
            damaged.append((e["path"], problem))
        if damaged:
            listing = "; ".join(f"{p}: {w}" for p, w in damaged)
            raise DamagedCheckpoint(f"--resume latest: no intact checkpoint in {self.root} ({listing}); "
                                    "start without --resume and with --force (the damaged ones are kept)")
        return None

    def _newest_intact(self) -> str | None:
        for e in reversed(self.entries()):
            if self.verify(e["path"]) is None:
                return e["path"]
        return None

    def verify(self, path: str) -> str | None:
        """Collective. None if every file of the checkpoint has the size and sha256 recorded at save
        time, else what is wrong. Each rank reads the files of its own share (the writer's share)."""
        try:
            meta = read_meta(path)
        except DamagedCheckpoint as e:
            return _agree(str(e).removeprefix(f"{path}/"))
        files = meta.get("files")
        if files is None:   # written before checksums were recorded: sizes and digests unknown
            return _agree(None if os.path.exists(os.path.join(path, ".metadata")) else "no .metadata file")
        world, rank = _world(), _rank()
        problem = None
        for name in sorted(files):
            if name in ("", _META) or "/" in name or _owner(name, world) != rank:
                continue
            file = os.path.join(path, name)
            if not os.path.exists(file):
                problem = f"{name} is missing"
                break
            size = os.path.getsize(file)
            if size != files[name]["size"]:
                problem = f"{name} has {size} bytes, the save recorded {files[name]['size']} (truncated?)"
                break
            if _digest(file)["sha256"] != files[name]["sha256"]:
                problem = f"{name} does not match its recorded sha256 (bytes changed on disk)"
                break
        return _agree(problem)

    # ---- branches -----------------------------------------------------------------------------
    def _start_branch(self, entries: list[dict], parent: dict | None) -> None:
        """Continue ``parent``'s branch if it is that branch's newest save; else open a new one."""
        if parent is not None:
            same = [e for e in entries if e["branch"] == parent["branch"]]
            if not same or same[-1]["path"] == parent["path"]:
                self.branch, self.parent = parent["branch"], None
                return
        self.branch = 1 + max((e["branch"] for e in entries), default=-1)
        self.parent = parent["name"] if parent else None

    def _name(self, step: int) -> str:
        return f"step_{step:08d}" + (f".branch{self.branch}" if self.branch else "")

    # ---- saving -----------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, meta: dict, rank_state: dict, grad_norm=None) -> str:
        """Collective. Checks the state is finite, writes, verifies, commits, then prunes this
        branch. Returns the final directory. Raises NonFiniteState or CheckpointError (e.g. a full
        disk), having written nothing that stays."""
        problem = non_finite_state(model, optimizer, grad_norm)
        if problem:
            raise NonFiniteState(f"step {step}: {problem}; this state is not saved")
        entries = self.entries() if self.rank == 0 else None
        if self.rank == 0 and self.branch is None:   # a fresh start: branch 0, or a new one beside others
            self._start_branch(entries, None)
        plan = None
        if self.rank == 0:
            serial = 1 + max((e["serial"] for e in entries if e["meta"]), default=-1)
            plan = (self.branch, self.parent, serial)
        self.branch, self.parent, serial = _broadcast(plan)
        name = self._name(step)
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, f".tmp_{name}")
        try:
            self._write(step, tmp, final, serial, model, optimizer, meta, rank_state)
        except CheckpointError:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.last_good = final
        if self.rank == 0:
            try:
                self._prune(final)
            except OSError as e:   # a checkpoint that could not be pruned is not an error
                warnings.warn(f"could not prune old checkpoints in {self.root}: {e}", stacklevel=2)
        if _world() > 1:
            collectives.barrier()
        return final

    def _fail(self, step: int, error: str, disk_full: bool) -> CheckpointError:
        last = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written yet"
        if disk_full:
            return CheckpointError(f"no space left on {self.root}: the checkpoint of step {step} was not written "
                                   f"and its partial files were removed ({last}); free space, then resume with "
                                   "--resume latest")
        return CheckpointError(f"saving the checkpoint of step {step} in {self.root} failed: {error} ({last})")

    def _phase(self, step: int, fn) -> object:
        """Run ``fn`` on this rank; all ranks agree whether any failed, and raise the same error."""
        result, error, full = None, None, False
        try:
            result = fn()
        except (Exception, CheckpointException) as e:   # DCP's CheckpointException is a BaseException
            error, full = _one_line(e), _disk_full(e)
        verdict = _gather((error, full))
        failed = [(r, e, f) for r, (e, f) in enumerate(verdict) if e is not None]
        if failed:
            r, e, _ = failed[0]
            raise self._fail(step, e if len(verdict) == 1 else f"rank {r}: {e}", any(f for _, _, f in failed))
        return result

    def _write(self, step, tmp, final, serial, model, optimizer, meta, rank_state) -> None:
        def prepare():
            if self.rank == 0:
                os.makedirs(self.root, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)   # debris of a crashed save of the same step
                os.makedirs(tmp)
        self._phase(step, prepare)

        def write_shards():
            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
            _write_durable(os.path.join(tmp, f"rank_{self.rank}.pt"), lambda fh: torch.save(rank_state, fh))
        self._phase(step, write_shards)

        def digest_mine():   # read back what this rank wrote: the record the load checks against
            return {n: _digest(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))
                    if _owner(n, self.world) == self.rank and n != _META}
        manifests = _gather(self._phase(step, digest_mine))

        def commit():
            if self.rank != 0:
                return
            files = {k: v for m in manifests for k, v in m.items()}
            record = dict(meta, step=step, world=self.world, branch=self.branch, parent=self.parent,
                          serial=serial, files=files)
            record["digest"] = _meta_digest(record)
            _write_durable(os.path.join(tmp, _META), lambda fh: fh.write(json.dumps(record, indent=2).encode()))
            old = None
            if os.path.exists(final):  # the same step of the same branch again: swap, then delete
                old = os.path.join(self.root, f".old_{os.path.basename(final)}")
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
            os.rename(tmp, final)       # the commit point
            _fsync_dir(self.root)
            problem = self._check_committed(final, files)
            if problem:
                shutil.rmtree(final, ignore_errors=True)
                if old:
                    os.rename(old, final)
                raise OSError(f"the committed copy does not match what was written: {problem}")
            if old:
                shutil.rmtree(old, ignore_errors=True)
        self._phase(step, commit)

    @staticmethod
    def _check_committed(final: str, files: dict) -> str | None:
        """Cheap check after the rename (the bytes were just digested): meta.json reads back with
        its digest, every recorded file is there with its size, and DCP can read its metadata."""
        try:
            read_meta(final)
        except DamagedCheckpoint as e:
            return str(e)
        for name, rec in files.items():
            path = os.path.join(final, name)
            if not os.path.exists(path) or os.path.getsize(path) != rec["size"]:
                return f"{name} is missing or has the wrong size"
        try:
            dcp.FileSystemReader(final).read_metadata()
        except Exception as e:
            return f"DCP cannot read its metadata ({_one_line(e)})"
        return None

    def _prune(self, just_written: str) -> None:
        """Delete this branch's checkpoints older than the newest ``keep`` (never the one just
        written, never another branch's), and debris of crashed saves."""
        mine = [e["path"] for e in self.entries() if e["branch"] == self.branch and e["meta"] is not None]
        for old in mine[:-self.keep]:
            if old != just_written:
                shutil.rmtree(old, ignore_errors=True)
        for n in os.listdir(self.root):
            if n.startswith((".tmp_step_", ".old_step_")):
                shutil.rmtree(os.path.join(self.root, n), ignore_errors=True)

    # ---- loading ----------------------------------------------------------------------------
    def load(self, path: str, model, optimizer) -> tuple[dict, dict | None]:
        """Collective. Loads model and optimizer in place; returns (meta, this rank's state or None).
        Decides the branch later saves go to (see the module doc). ``path`` should come from
        :meth:`resolve`, which verified it."""
        meta = read_meta(path)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        _check_shapes(path, state)
        try:
            dcp.load(state, checkpoint_id=path)
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"--resume {path}: the checkpoint does not load into this model "
                                  f"({_one_line(e)})") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        entries = self.entries() if self.rank == 0 else None
        plan = None
        if self.rank == 0:
            me = next((e for e in entries if os.path.samefile(e["path"], path)), None)
            if me is None:   # a checkpoint of another run directory: a fresh branch here
                self._start_branch(entries, None)
                self.parent = os.path.abspath(path)
            else:
                self._start_branch(entries, me)
            plan = (self.branch, self.parent)
        self.branch, self.parent = _broadcast(plan)
        self.last_good = path
        rank_file = os.path.join(path, f"rank_{self.rank}.pt")
        if meta["world"] != self.world or not os.path.exists(rank_file):
            warnings.warn(f"checkpoint {path} was written by {meta['world']} ranks, this run has "
                          f"{self.world}: weights and optimizer are resharded, but random states "
                          "start fresh, so the run will not repeat the original exactly")
            return meta, None
        return meta, torch.load(rank_file, weights_only=False)


def _check_shapes(path: str, state: dict) -> None:
    """One line naming the first tensor whose shape differs between the checkpoint and this model
    (instead of DCP's many-line exception)."""
    try:
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as e:
        raise DamagedCheckpoint(f"--resume {path}: DCP cannot read its metadata ({_one_line(e)})") from None
    for key, t in state["model"].items():
        want = saved.get(f"model.{key}")
        if torch.is_tensor(t) and want is not None and hasattr(want, "size") and tuple(want.size) != tuple(t.shape):
            raise CheckpointError(f"--resume {path}: parameter {key} has shape {tuple(want.size)} in the checkpoint "
                                  f"but {tuple(t.shape)} in this model; a model-shape change cannot resume")
