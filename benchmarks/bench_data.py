"""Benchmark: the input pipeline on the CPU — decode floors, a torchvision-style reference, our
per-image path, and the DataLoader end to end from a folder and from tar shards.

    python benchmarks/bench_data.py [--images 2000] [--size 224] [--quick] [--out benchmarks/results/]

The data set is written once and cached outside the repository (``--cache``, default
``~/.cache/randsac_fast/bench_data``): ``--images`` JPEGs of 500x375 at quality 90 with natural-image
statistics — a 1/f^a colour noise field (a ~ U(0.9, 1.2), channels mixed), a few flat-coloured
polygons and discs (edges), a slight blur, then fine grain (texture) — as an ImageFolder of 10
classes and as 8 WebDataset shards (``make_shards``). Files stay in the page cache
(read once before timing), so the figures are decode + augmentation cost, not disk speed.

Rows, all in one run (images/s; one process = one core, torch threads 1):

* (a) floors: decode alone at full size (Pillow -> numpy; simplejpeg), decode with DCT downscaling
  by 1/2 (both), and decode at the DCT scale our path picks for these very crops;
* (b) reference, torchvision-style, written with Pillow + numpy (torchvision cannot be installed
  beside the CPU torch here): PIL decode -> RandomResizedCrop(size, scale (0.2, 1), bicubic) as
  ``img.crop(box).resize`` -> flip -> ToTensor (array copy, HWC->CHW, float / 255) -> Normalize;
* (c) ours, ``data.Augment`` on an ``EncodedImage``: uint8 out (what the trainer ships to the
  device) and normalised float out, with each decoder;
* (d) ``data.batch_stream`` (the trainer's loader) with 1 and 2 workers, batch 64, from the folder
  and from the shards, uint8 out.

Goals (issue): (c) >= 1.5x (b); (c) within 1.3x of the downscale floor; (d) 2 workers >= 1.8x one
worker; shards >= folder. The machine load (``os.getloadavg``) is recorded before and after each
section: on a shared machine the worker scaling in particular is only as good as the idle cores.
These are CPU figures.
"""
from __future__ import annotations

import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, parser, provenance, report  # noqa: E402
from randsac_fast import data  # noqa: E402

SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)


# ---- the data set ----------------------------------------------------------------------------------
def natural_image(seed: int, w: int = 500, h: int = 375) -> bytes:
    """A JPEG (quality 90) with natural-image statistics: 1/f noise, edges, blur, grain."""
    from PIL import Image, ImageDraw, ImageFilter
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    amp = f ** -rng.uniform(0.9, 1.2)
    field = np.stack([np.fft.irfft2(amp * rng.standard_normal(amp.shape) * np.exp(2j * np.pi * rng.random(amp.shape)),
                                    s=(h, w)) for _ in range(3)], -1)
    field = field @ (0.5 * np.eye(3) + 0.5 * rng.random((3, 3)))
    field = (field - field.mean()) / (field.std() + 1e-8) * 40 + rng.uniform(80, 170, 3)
    im = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(4, 12))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.polygon([tuple(p) for p in (rng.random((int(rng.integers(3, 7)), 2)) * [w, h]).astype(int).tolist()],
                         fill=colour)
        else:
            cx, cy, r = rng.random() * w, rng.random() * h, rng.uniform(10, 80)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
    grain = rng.standard_normal((h, w, 1)) * rng.uniform(4, 12)
    out = io.BytesIO()
    Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) + grain, 0, 255).astype(np.uint8)).save(
        out, "JPEG", quality=90)
    return out.getvalue()


def dataset(cache: Path, n: int) -> tuple[Path, str]:
    """(ImageFolder root, shard pattern), written once under ``cache``."""
    root = cache / f"natural_{n}"
    folder, shards, done = root / "folder", root / "shards", root / "done.json"
    if not done.exists():
        print(f"writing {n} JPEGs under {root} (once) ...", flush=True)
        for k in range(n):
            d, name = folder / f"class{k % 10}", f"{k:06d}.jpg"
            d.mkdir(parents=True, exist_ok=True)
            if not (d / name).exists():
                (d / name).write_bytes(natural_image(k))
        if shards.exists():
            for p in shards.iterdir():
                p.unlink()
        pattern = data.make_shards(str(folder), str(shards), shard_size=max(10, n // 8))   # 8 shards
        done.write_text(json.dumps({"images": n, "pattern": pattern}))
    return folder, json.loads(done.read_text())["pattern"]


# ---- timing ----------------------------------------------------------------------------------------
def rate(fn, items, passes: int) -> tuple[float, list[float]]:
    """(best images/s over ``passes`` passes of fn(item) over items, every pass's images/s)."""
    fn(items[0])
    rates = []
    for _ in range(passes):
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        rates.append(len(items) / (time.perf_counter() - t0))
    return max(rates), rates


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def reference_transform(size: int, mean, std):
    """torchvision's RandomResizedCrop(bicubic) + RandomHorizontalFlip + ToTensor + Normalize on a PIL
    image, with Pillow and numpy (the box is torchvision's algorithm, ``data.crop_box``)."""
    from PIL import Image
    mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def run(blob_seed):
        blob, seed = blob_seed
        g = torch.Generator().manual_seed(seed)
        img = Image.open(io.BytesIO(blob)).convert("RGB")
        top, left, h, w = data.crop_box(img.height, img.width, SCALE, RATIO, g)
        img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
        if bool(torch.rand(1, generator=g) < 0.5):
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(size, size, 3).permute(2, 0, 1).contiguous()
        return t.float().div(255).sub_(mean_t).div_(std_t)
    return run


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="JPEGs in the data set (default 2000)")
    p.add_argument("--size", type=int, default=224, help="output side (default 224)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "randsac_fast" / "bench_data"))
    p.add_argument("--per-image", type=int, default=500, help="images per pass of the one-process rows")
    p.add_argument("--passes", type=int, default=None, help="passes per row (best is reported; default 3, quick 1)")
    args = p.parse_args()
    n = 200 if args.quick else args.images
    passes = args.passes or (1 if args.quick else 3)
    torch.set_num_threads(1)
    folder, pattern = dataset(Path(args.cache).expanduser(), n)
    files = [path for path, _ in data.ImageFolderSource(str(folder)).files]
    blobs = [open(f, "rb").read() for f in files]            # also warms the page cache for (d)
    for f in sorted(Path(pattern.split("{")[0]).parent.glob("*.tar")):
        f.read_bytes()
    m = min(args.per_image, len(blobs))
    items = [(blobs[i], i) for i in range(m)]
    size, mean, std = args.size, data.IMAGENET_MEAN, data.IMAGENET_STD
    rows, loads = [], {"start": load()}
    have_sj = data.jpeg_decoder() == "simplejpeg"

    def add(section, name, best, rates, **extra):
        rows.append({"section": section, "row": name, "img_per_s": round(best, 1),
                     "ms_per_img": round(1e3 / best, 3), "passes_img_per_s": [round(r, 1) for r in rates], **extra})
        print(f"{section:>2} {name:48s} {best:8.1f} img/s  {1e3 / best:6.3f} ms", flush=True)

    # (a) floors -----------------------------------------------------------------------------------
    from PIL import Image

    def pil_decode(factor):
        def run(bs):
            im = Image.open(io.BytesIO(bs[0]))
            if factor > 1:
                im.draft("RGB", (im.width // factor, im.height // factor))
            return np.asarray(im.convert("RGB"))
        return run
    add("a", "decode full, Pillow -> numpy", *rate(pil_decode(1), items, passes))
    add("a", "decode DCT 1/2, Pillow -> numpy", *rate(pil_decode(2), items, passes))
    factors = []
    for blob, seed in items:
        h, w = Image.open(io.BytesIO(blob)).size[::-1]
        box = data.crop_box(h, w, SCALE, RATIO, torch.Generator().manual_seed(data.sample_seed(0, 0, seed)))
        factors.append(data.dct_factor(box[2], box[3], size))
    share = {f: factors.count(f) / len(factors) for f in sorted(set(factors))}
    if have_sj:
        import simplejpeg

        def sj(factor):
            return lambda bs: simplejpeg.decode_jpeg(bs[0], colorspace="RGB", min_factor=factor)
        add("a", "decode full, simplejpeg", *rate(sj(1), items, passes))
        add("a", "decode DCT 1/2, simplejpeg", *rate(sj(2), items, passes))
    picked = [(blob, f) for (blob, _), f in zip(items, factors)]
    add("a", "decode at the DCT scale our crops pick", *rate(
        lambda bf: data.EncodedImage(bf[0], "x").decode(bf[1]), picked, passes), dct_factor_share=share)
    loads["after_a"] = load()

    # (b) reference, (c) ours ----------------------------------------------------------------------
    seeded = [(blob, data.sample_seed(0, 0, seed)) for blob, seed in items]
    add("b", "reference: PIL crop/resize, ToTensor, Normalize", *rate(reference_transform(size, mean, std), seeded, passes))
    ours_u8 = data.Augment(size, SCALE, RATIO, True, mean, std, normalize=False)
    ours_f = data.Augment(size, SCALE, RATIO, True, mean, std, normalize=True)
    decoders = ["simplejpeg", "pillow"] if have_sj else ["pillow"]
    for dec in decoders:
        os.environ["RANDSAC_FAST_JPEG"] = "pillow" if dec == "pillow" else ""
        for aug, out in ((ours_u8, "uint8"), (ours_f, "float normalised")):
            add("c", f"ours ({dec}), {out} out", *rate(
                lambda bs, aug=aug: aug(data.EncodedImage(bs[0], "x"), torch.Generator().manual_seed(bs[1])),
                seeded, passes))
    os.environ.pop("RANDSAC_FAST_JPEG", None)
    loads["after_c"] = load()

    # (d) the loader end to end --------------------------------------------------------------------
    batch = 64
    for name, spec in (("folder", str(folder)), ("shards", pattern)):
        src = data.open_source(spec, size)
        ds = data.AugmentedDataset(src, ours_u8, seed=0)
        sb = data.ShardedBatches(len(src), batch, 0, 1, seed=0)
        for workers in (1, 2):
            rates = []
            for _ in range(passes):
                with data.batch_stream(ds, sb, 0, workers, False) as stream:
                    next(stream)                                   # start-up (fork, first batches)
                    for _ in range(workers):
                        next(stream)
                    steps = max(4, min(len(src), 1280) // batch)
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        next(stream)
                    rates.append(steps * batch / (time.perf_counter() - t0))
            add("d", f"loader from {name}, {workers} worker{'s' if workers > 1 else ''}", max(rates), rates,
                batch=batch)
        loads[f"after_d_{name}"] = load()

    by = {r["row"]: r["img_per_s"] for r in rows}
    ref = by["reference: PIL crop/resize, ToTensor, Normalize"]
    best_dec = decoders[0]
    ours = by[f"ours ({best_dec}), uint8 out"]
    ours_float = by[f"ours ({best_dec}), float normalised out"]
    floor_picked = by["decode at the DCT scale our crops pick"]
    floor_half = by[f"decode DCT 1/2, {'simplejpeg' if have_sj else 'Pillow -> numpy'}"]
    goals = {
        "c_over_b_uint8": round(ours / ref, 3), "c_over_b_float": round(ours_float / ref, 3),
        "floor_picked_over_c": round(floor_picked / ours, 3), "floor_half_over_c": round(floor_half / ours, 3),
        "folder_2w_over_1w": round(by["loader from folder, 2 workers"] / by["loader from folder, 1 worker"], 3),
        "shards_2w_over_1w": round(by["loader from shards, 2 workers"] / by["loader from shards, 1 worker"], 3),
        "shards_over_folder_1w": round(by["loader from shards, 1 worker"] / by["loader from folder, 1 worker"], 3),
        "shards_over_folder_2w": round(by["loader from shards, 2 workers"] / by["loader from folder, 2 workers"], 3),
    }
    print(json.dumps(goals, indent=1))
    try:
        import PIL
        import simplejpeg
        libs = {"pillow": PIL.__version__, "simplejpeg": simplejpeg.__version__ if have_sj else None}
    except ImportError:
        libs = {}
    try:
        import webdataset
        libs["webdataset"] = webdataset.__version__
    except ImportError:
        pass
    meta = {**provenance(torch.device("cpu"), cpu_note=f"cpu: {platform.processor() or platform.machine()}, "
                                                        f"{os.cpu_count()} cores (CPU figures)"),
            **libs, "images": n, "image_size": "500x375 JPEG q90", "output": size, "per_image_items": m,
            "passes": passes, "loadavg_1_5_15": loads, "goals": goals, "cache": "outside the repository"}
    report("bench_data", rows, ["section", "row", "img_per_s", "ms_per_img"], meta, args.out)


if __name__ == "__main__":
    main()
