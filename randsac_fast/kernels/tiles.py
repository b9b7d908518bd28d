"""The launch configuration of a tiled Triton kernel (here, below ``ops``, so the kernels need not
import the dispatch layer; :mod:`randsac_fast.ops.autotune` chooses among them)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tile:
    """One launch configuration of a tiled kernel."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def as_list(self) -> list[int]:
        return [self.block_m, self.block_n, self.num_warps, self.num_stages]

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"
