"""Measured dispatch: among the verified candidates, ``auto`` takes the fastest for the shape.

Like ``torch.backends.cudnn.benchmark``: the first call of an op at a new shape key (device, dtype,
structure, shape) times each candidate once on a random problem of that shape (forward and
backward, a few warm-up calls — which include Triton's own autotuning — then the median of a few
timed calls, CUDA events) and caches the winner for the process.

* ``RANDSAC_FAST_AUTOTUNE``: ``1`` (default) times on CUDA devices; ``0`` never times (``auto``
  takes the first verified backend in its preference order, the behaviour without this module);
  ``all`` also times on the CPU (on CPU tensors ``auto``'s candidates are the portable fallbacks
  only, so there is normally nothing to choose).
* ``RANDSAC_FAST_AUTOTUNE_CACHE=path.json`` (or :func:`set_cache_file`): winners are loaded from
  that file at first use and the file is rewritten (atomically) after each new measurement, so a
  long run or the next run reuses them. Keys include the device name and the torch / triton
  versions, so a file carried to another GPU or install is not misapplied. A loaded winner is used
  only if it passed this process's self-check.

Timing never draws from the global RNG and runs eagerly (under ``torch.compile`` at trace time).

Kernel tiles (the second half of this module): which tile (BLOCK_M, BLOCK_N, warps, stages) a
Triton kernel launches with. A first GPU run must not spend its minutes compiling tiles that
cannot win, and every rank must launch the same tile (the tile fixes the accumulation order):

* ``RANDSAC_FAST_TILES``: ``pinned`` (default) takes a small known-good sm_90 set per (kernel, head
  dim, dtype), fixed in the kernel module: one compile per kernel variant, no timing, and the
  same tile on every rank by construction. ``sweep`` times every candidate that can win (the
  kernel's own prune drops oversized and spilling tiles) the first time a key is seen; under a
  process group rank 0 times and broadcasts its choice, so every rank launches the same tile
  (every rank must then reach each new key in the same order, as SPMD training does; else use
  ``pinned`` or carry the decisions in the cache file).
* Keys bucket the sequence lengths to powers of two (:func:`length_bucket`), so RandSAC's lengths,
  which differ per order family, share one decision per bucket.
* Swept decisions are stored with the backend winners in ``RANDSAC_FAST_AUTOTUNE_CACHE`` (a loaded
  decision needs no timing and no collective). Compiled kernels are cached by Triton itself, on
  disk under ``TRITON_CACHE_DIR`` (default ``~/.triton/cache``): a second process, or a second
  step of ``benchmarks/gpu_suite.sh``, loads them instead of compiling.
"""
from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

ENV_ENABLE = "RANDSAC_FAST_AUTOTUNE"
ENV_CACHE = "RANDSAC_FAST_AUTOTUNE_CACHE"
WARMUP, REPS = 2, 5
FORMAT_VERSION = 1

_WINNERS: dict[str, dict] = {}      # key string -> {"winner": name, "ms": {name: ms}}
_cache_file: Path | None = None
_loaded_from: Path | None = None
_UNWRITABLE: set[Path] = set()


def enabled(device: torch.device) -> bool:
    """Whether ``auto`` times its candidates on this device (see the module docstring)."""
    value = os.environ.get(ENV_ENABLE, "1").strip().lower()
    if value not in ("0", "1", "all"):
        raise ValueError(f"{ENV_ENABLE}={value!r} is not understood; use 1 (time on CUDA), 0 (never) or all")
    return value == "all" or (value == "1" and device.type == "cuda")


def set_cache_file(path: str | os.PathLike | None) -> None:
    """Persist winners to ``path`` (None: back to ``RANDSAC_FAST_AUTOTUNE_CACHE``, or memory only)."""
    global _cache_file
    _cache_file = Path(path) if path is not None else None


def cache_file() -> Path | None:
    if _cache_file is not None:
        return _cache_file
    env = os.environ.get(ENV_CACHE, "").strip()
    return Path(env) if env else None


def _versions() -> str:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"torch {torch.__version__}, triton {triton_version}"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def shape_key(op: str, device: torch.device, dtype: torch.dtype, structure: tuple, shape: tuple) -> str:
    """The cache key: readable, and stable across processes (it is what the file stores)."""
    parts = [op, device_name(device), _versions(), str(dtype).removeprefix("torch."),
             "structure=" + ",".join(map(str, structure)), "shape=" + "x".join(map(str, shape))]
    return " | ".join(parts)


def load(path: str | os.PathLike) -> int:
    """Merge the winners stored in ``path`` into this process's cache; -> how many were read."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT_VERSION or not isinstance(data.get("entries"), dict):
        raise ValueError(f"{path} is not a randsac_fast autotune cache (format {FORMAT_VERSION}); delete it "
                         f"or point {ENV_CACHE} elsewhere")
    _WINNERS.update(data["entries"])
    return len(data["entries"])


def save(path: str | os.PathLike) -> Path:
    """Write every winner of this process (and those loaded) to ``path``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": FORMAT_VERSION, "entries": _WINNERS}, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def _load_once() -> None:
    global _loaded_from
    path = cache_file()
    if path is not None and path != _loaded_from:
        _loaded_from = path
        if path.exists():
            load(path)


def entries() -> dict[str, dict]:
    """Every cached winner: key -> {"winner": name, "ms": {candidate: median ms}}."""
    _load_once()
    return dict(_WINNERS)


def clear() -> None:
    """Forget every winner (not the file)."""
    global _loaded_from
    _WINNERS.clear()
    _loaded_from = None


def time_ms(step: Callable[[], None], device: torch.device, warmup: int = WARMUP, reps: int = REPS) -> float:
    """Median milliseconds of ``step()`` after ``warmup`` untimed calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def case_step(impl: Callable, case) -> Callable[[], None]:
    """One forward (+ backward when the case has grad inputs) of ``impl`` on a :class:`selfcheck.Case`."""
    from .selfcheck import _with_dtype   # one place that builds fresh leaves

    leaves = _with_dtype(case, None)
    grads = [leaves[i] for i in case.grad_inputs]

    def step():
        out = impl(*leaves)
        if grads:
            torch.autograd.grad(out, grads, torch.ones_like(out))
    return step


def best(key: str, candidates: dict[str, Callable], make_case: Callable, device: torch.device) -> str:
    """The fastest of ``candidates`` (name -> implementation) at ``key``: cached, else measured.

    A candidate that raises while being timed is dropped (recorded as ``None``).
    """
    _load_once()
    known = _WINNERS.get(key)
    if known is not None and known.get("winner") in candidates:
        return known["winner"]
    case = make_case()
    ms: dict[str, float | None] = {}
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for name, impl in candidates.items():
            try:
                ms[name] = time_ms(case_step(impl, case), device)
            except Exception:  # noqa: BLE001 — a candidate that cannot run this shape is not a winner
                ms[name] = None
    timed = {n: t for n, t in ms.items() if t is not None}
    winner = min(timed, key=timed.get) if timed else next(iter(candidates))
    _WINNERS[key] = {"winner": winner, "ms": ms}
    path = cache_file()
    if path is not None:
        try:
            save(path)
        except OSError as e:   # an unwritable cache location must not stop training; say so once
            if path not in _UNWRITABLE:
                _UNWRITABLE.add(path)
                warnings.warn(f"randsac_fast: cannot write the autotune cache {path} ({e}); winners stay in "
                              f"memory only. Point {ENV_CACHE} at a writable file", RuntimeWarning, stacklevel=2)
    return winner


# ----------------------------------------------------------------------------------------------
# Kernel tiles: pinned by default, swept on request, one decision per bucket shared by every rank
# ----------------------------------------------------------------------------------------------
ENV_TILES = "RANDSAC_FAST_TILES"
TILE_MODES = ("pinned", "sweep")
_TILE_PREFIX = "tile | "


from ..kernels.tiles import Tile  # noqa: E402  (re-exported: the kernels' launch configuration)


def tiles_mode() -> str:
    """``pinned`` (default) or ``sweep``, from ``RANDSAC_FAST_TILES`` (see the module docstring)."""
    value = os.environ.get(ENV_TILES, "pinned").strip().lower() or "pinned"
    if value not in TILE_MODES:
        raise ValueError(f"{ENV_TILES}={value!r} is not understood; use pinned (the known-good sm_90 tiles, "
                         f"the default) or sweep (time every candidate once per key)")
    return value


def length_bucket(n: int) -> int:
    """The power of two (at least 16) that a sequence length is filed under in a tile key."""
    return max(16, 1 << max(int(n) - 1, 0).bit_length())


def tile_key(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int, n_q: int, n_k: int) -> str:
    """The decision key of a tiled kernel: lengths bucketed, so nearby lengths share one decision."""
    return _TILE_PREFIX + " | ".join([kernel, device_name(device), _versions(), str(dtype).removeprefix("torch."),
                                      f"D={head_dim}", f"NQ<={length_bucket(n_q)}", f"NK<={length_bucket(n_k)}"])


def fits(tile: Tile, n_q: int, n_k: int) -> bool:
    """Whether a tile is not larger than the (bucketed) problem: no tile row or column only pads."""
    return tile.block_m <= length_bucket(n_q) and tile.block_n <= length_bucket(n_k)


def pinned_tile(pinned: Sequence[Tile], candidates: Sequence[Tile], n_q: int, n_k: int) -> Tile:
    """The first pinned tile that fits the bucketed lengths, else the smallest candidate."""
    for tile in pinned:
        if fits(tile, n_q, n_k):
            return tile
    return min(candidates, key=lambda t: (t.block_m * t.block_n, t.num_warps, t.num_stages))


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shared_decision(key: str, decide: Callable[[], Tile]) -> Tile:
    """``decide()`` on rank 0 only, its result broadcast to every rank (a no-op without a group).

    Every rank must call this for the same key at the same point (a rank asking for another key
    is an error, not a silent mismatch of tiles).
    """
    rank, world = _world()
    if world == 1:
        return decide()
    import torch.distributed as dist
    box = [(key, decide().as_list()) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    decided_key, tile = box[0]
    if decided_key != key:
        raise RuntimeError(f"{ENV_TILES}=sweep: rank {rank} tunes {key!r} while rank 0 tuned {decided_key!r}; "
                           f"ranks reached different kernel shapes. Use {ENV_TILES}=pinned, or run the ranks "
                           f"on equal shapes until every bucket is decided")
    return Tile(*tile)


def choose_tile(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int, n_q: int, n_k: int,
                pinned: Sequence[Tile], candidates: Sequence[Tile], bench: Callable[[Tile], float]) -> Tile:
    """The tile a kernel launches with (see the module docstring).

    pinned: the known-good tiles, best first; candidates: the tiles a sweep may time (already
    pruned); bench(tile) -> ms, called only in sweep mode on rank 0, only for a key not decided yet.
    """
    if tiles_mode() == "pinned":
        return pinned_tile(pinned, candidates, n_q, n_k)
    key = tile_key(kernel, device, dtype, head_dim, n_q, n_k)
    _load_once()
    known = _WINNERS.get(key)
    if known is not None and "tile" in known:
        return Tile(*known["tile"])

    def decide() -> Tile:
        fitting = [t for t in candidates if fits(t, n_q, n_k)] or [pinned_tile(pinned, candidates, n_q, n_k)]
        if len(fitting) == 1:
            return fitting[0]
        ms = {}
        for tile in fitting:
            try:
                ms[tile] = bench(tile)
            except Exception:  # noqa: BLE001 — e.g. out of shared memory on this GPU: not a winner
                ms[tile] = float("inf")
        return min(fitting, key=lambda t: ms[t])

    tile = shared_decision(key, decide)
    _WINNERS[key] = {"tile": tile.as_list(), "kernel": kernel}
    path = cache_file()
    if path is not None:
        try:
            save(path)
        except OSError:
            pass     # best() warns about an unwritable cache; a tile decision stays in memory
    return tile
