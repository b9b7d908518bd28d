"""Benchmark: segment attention, forward and forward+backward, fused kernels vs their peers.

    python benchmarks/bench_attention.py [--quick] [--strict] [--out benchmarks/results/]

Rows (each at the same shapes, bf16, random inputs and a random order per shape):
  triton        the fused block-sparse kernels (backend="triton")
  cuda          the compiled extension (backend="cuda"; skipped if it is not available)
  sdpa_mask     torch SDPA with a dense boolean [B, 1, N, N] mask built from the seg ids
  flex          FlexAttention incl. the per-batch BlockMask build (the orders change every step)
  flex_nobuild  FlexAttention with the BlockMask built once, outside the timing
  xformers      memory-efficient attention with a tensor bias (when xformers is installed)
  causal_sdpa   SDPA is_causal=True on a length with the same visible pairs: the roofline proxy

Reported: median time (ms), TFLOP/s over *visible* (query, key) pairs (4*pairs*D*H forward, 2.5x
that backward, as FlashAttention counts), achieved HBM bandwidth for the algorithmic minimum of
bytes (q, k, v, o and their gradients once each; mask bytes are not counted), and ratios to
triton. A table is printed last; a JSON record (device, versions, commit, date, shapes, every
timing) goes to --out. Without a GPU, ``TRITON_INTERPRET=1`` runs a smoke test of the script on
tiny fp32 shapes; its timings mean nothing.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import median_ms, parser, pick_device, provenance, result_path  # noqa: E402
from randsac_fast import ops, orders, reference  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    head_dim: int
    grid: int
    spec: str
    cls: bool = False        # SAIM: a cls token at position 0 (seg 0), patch segments shifted by +1

    @property
    def tokens(self) -> int:
        return self.grid * self.grid + int(self.cls)


SHAPES = [
    Shape("vitb_144_sq16/4", 256, 12, 64, 12, "square:16/4"),
    Shape("vitb_196_random", 256, 12, 64, 14, "random"),
    Shape("vitb_197_random_cls", 256, 12, 64, 14, "random", cls=True),
    Shape("vitl_196_random", 128, 16, 64, 14, "random"),
    Shape("vitl_144_sq16/4", 128, 16, 64, 12, "square:16/4"),
    Shape("hires_576_sq36", 64, 12, 64, 24, "square:36"),
    Shape("hires_576_random", 64, 12, 64, 24, "random"),
    Shape("hires_1024_sq64", 32, 12, 64, 32, "square:64"),
    Shape("hires_1024_random", 32, 12, 64, 32, "random"),
    Shape("hires_4096_sq256", 4, 12, 64, 64, "square:256"),
    Shape("hires_4096_random", 4, 12, 64, 64, "random"),
]
QUICK = ["vitb_144_sq16/4", "vitb_197_random_cls", "hires_1024_random"]
SMOKE = [Shape("smoke_36_sq4", 1, 2, 16, 6, "square:4"), Shape("smoke_17_random_cls", 1, 2, 16, 4, "random", cls=True)]


def make_inputs(shape: Shape, dtype, device, seed: int = 0):
    """q, k, v [B, H, N, D] (randn, never zeros), seg [B, N] int32 from a sampled order, dO."""
    gen = torch.Generator().manual_seed(seed)
    seg = orders.sample(shape.spec, shape.batch, shape.grid, generator=gen).seg
    if shape.cls:
        seg = torch.cat([torch.zeros_like(seg[:, :1]), seg + 1], dim=1)
    seg = seg.to(device)
    b, h, n, d = shape.batch, shape.heads, shape.tokens, shape.head_dim
    q, k, v, do = (torch.randn(b, h, n, d, generator=gen).to(device, dtype) for _ in range(4))
    return q, k, v, seg, do


def causal_length(pairs_per_sample: float) -> int:
    """Length L whose causal mask has L(L+1)/2 ~= the given visible pairs."""
    return max(1, round((math.sqrt(8 * pairs_per_sample + 1) - 1) / 2))


def runners(shape: Shape, q, k, v, seg, inclusive: bool, available: dict):
    """name -> (fn(q, k, v) -> out, (q, k, v), forward FLOPs over visible pairs): one shape's rows."""
    scale = shape.head_dim ** -0.5
    flops = reference.attention_flops(seg, seg, inclusive, shape.heads, shape.head_dim)

    def backend(name):
        return lambda q_, k_, v_: ops.segment_attention(q_, k_, v_, seg, seg, inclusive=inclusive, backend=name,
                                                        check_sorted=False)

    # sdpa: the portable fallback, its dense boolean mask built from the seg ids on every call.
    rows = {"triton": backend("triton"), "cuda": backend("cuda"), "sdpa_mask": backend("sdpa")}
    if available["flex"]:
        from randsac_fast.ops.attention_flex import flex_segment_attention, segment_block_mask
        rows["flex"] = backend("flex")
        block_mask = segment_block_mask(seg, seg, inclusive)
        rows["flex_nobuild"] = lambda q_, k_, v_: flex_segment_attention(q_, k_, v_, block_mask, scale)
    if available["xformers"]:
        rows["xformers"] = backend("xformers")
    out = {name: (fn, (q, k, v), flops) for name, fn in rows.items()}

    n_causal = causal_length(flops / (4 * shape.head_dim * shape.heads * shape.batch))
    raster = torch.arange(n_causal, dtype=torch.int32).expand(shape.batch, n_causal)   # causal = raster, inclusive
    qkv_causal = tuple(torch.randn(shape.batch, shape.heads, n_causal, shape.head_dim, device=q.device, dtype=q.dtype)
                       for _ in range(3))
    out["causal_sdpa"] = (lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=scale),
                          qkv_causal, reference.attention_flops(raster, raster, True, shape.heads, shape.head_dim))
    return out


def bytes_moved(rows: int, head_dim: int, elt: int, backward: bool) -> int:
    """Algorithmic minimum HBM traffic for ``rows`` = B*H*N: each operand read / written once.

    fwd: q, k, v, o + fp32 lse; bwd adds q, k, v, o, dO read, dq, dk, dv written + lse, delta.
    """
    fwd = rows * (4 * head_dim * elt + 4)
    bwd = rows * (8 * head_dim * elt + 8)
    return fwd + bwd if backward else fwd


def run(args, device: torch.device, progress=None) -> dict:
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32    # the interpreter mishandles bf16 dots
    available = {"flex": on_gpu, "xformers": False}        # flex has no CPU backward
    if on_gpu:
        try:
            import xformers.ops  # noqa: F401
            available["xformers"] = True
        except ImportError:
            pass
    if not on_gpu:
        shapes = SMOKE
    elif args.shapes:
        shapes = [s for s in SHAPES if s.name in args.shapes]
    else:
        shapes = [s for s in SHAPES if not args.quick or s.name in QUICK]
    reps = args.reps or (5 if args.quick else 20)
    inclusive = not args.strict
    records, skipped = [], []
    for shape in shapes:
        q, k, v, seg, _ = make_inputs(shape, dtype, device)
        for name, (fn, qkv, fwd_flops) in runners(shape, q, k, v, seg, inclusive, available).items():
            tokens = qkv[0].shape[2]
            for mode in ("fwd", "fwd+bwd"):
                backward = mode == "fwd+bwd"
                leaves = [t.detach().requires_grad_(backward) for t in qkv]
                grad = torch.randn_like(leaves[0])

                def step(fn=fn, leaves=leaves, backward=backward, grad=grad):
                    if backward:
                        for t in leaves:
                            t.grad = None
                        fn(*leaves).backward(grad)
                    else:
                        with torch.no_grad():
                            fn(*leaves)

                try:
                    step()      # compile / autotune outside the timing; a missing backend skips its row
                    ms = median_ms(step, device, reps)
                except (ops.BackendUnavailable, NotImplementedError, RuntimeError, ValueError) as e:
                    skipped.append({"shape": shape.name, "backend": name, "mode": mode, "reason": str(e)[:300]})
                    break
                flops = fwd_flops * (3.5 if backward else 1.0)      # backward = 2.5 x forward
                moved = bytes_moved(shape.batch * shape.heads * tokens, shape.head_dim, dtype.itemsize, backward)
                records.append({"shape": shape.name, "backend": name, "mode": mode, "ms": ms,
                                "tflops": flops / ms / 1e9, "gbps": moved / ms / 1e6,
                                "visible_pairs": fwd_flops // (4 * shape.head_dim * shape.heads), "tokens": tokens})
                if progress is not None:     # a killed run keeps every row it measured
                    progress({"records": records, "skipped": skipped})
        del q, k, v
        if on_gpu:
            torch.cuda.empty_cache()
    return {"records": records, "skipped": skipped, "shapes": [asdict(s) | {"tokens": s.tokens} for s in shapes],
            "dtype": str(dtype), "inclusive": inclusive}


def table(result: dict) -> str:
    """One line per (shape, mode, backend); ratio = that row's time / triton's time."""
    triton_ms = {(r["shape"], r["mode"]): r["ms"] for r in result["records"] if r["backend"] == "triton"}
    lines = [f"{'shape':<22}{'mode':<9}{'backend':<14}{'ms':>10}{'TFLOP/s':>10}{'GB/s':>9}{'x triton':>10}"]
    order = {s["name"]: i for i, s in enumerate(result["shapes"])}
    for r in sorted(result["records"], key=lambda r: (order[r["shape"]], r["mode"])):   # stable: row order kept
        ref = triton_ms.get((r["shape"], r["mode"]))
        ratio = f"{r['ms'] / ref:10.2f}" if ref else f"{'-':>10}"
        lines.append(f"{r['shape']:<22}{r['mode']:<9}{r['backend']:<14}{r['ms']:10.3f}{r['tflops']:10.1f}"
                     f"{r['gbps']:9.0f}{ratio}")
    for s in result["skipped"]:
        lines.append(f"skipped {s['backend']} on {s['shape']} ({s['mode']}): {s['reason'][:100]}")
    return "\n".join(lines)


def main(argv=None):
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--strict", action="store_true", help="strict (decoder / query-stream) mask instead of inclusive")
    p.add_argument("--shapes", nargs="*", help=f"subset of shape names: {[s.name for s in SHAPES]}")
    args = p.parse_args(argv)
    device = pick_device()
    out = result_path("attention", args.out)
    head = provenance(device) | {"args": vars(args)}

    def write(partial):
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(partial, indent=1))
        tmp.replace(out)

    result = head | run(args, device, progress=lambda rows: write(head | rows | {"partial": True}))
    write(result)
    print(f"# {result['device']}  torch {result['torch']}  triton {result['triton']}  cuda {result['cuda']}  "
          f"commit {(result['git_commit'] or '')[:10]}  {result['dtype']}  inclusive={result['inclusive']}  -> {out}")
    print(table(result))


if __name__ == "__main__":
    main()
