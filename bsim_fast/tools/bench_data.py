"""An ImageNet-like JPEG set made on the spot, for loader benchmarks on machines without a dataset.

    python -m bsim_fast.tools.bench_data OUT_DIR --count 5000          # OUT_DIR/class_XX/img_XXXXX.jpg + summary

What makes a loader fast or slow on ImageNet is the JPEG work: ~500×375 pixels and ~110 KB per file (ImageNet
train averages about 400×350 and 110 KB), photographic content (entropy-coded detail everywhere, not flat
areas that decode for free). Each image here is a random crop of a photograph, rescaled to 500×375 (a fifth
portrait, 375×500), flipped, lightly colour-shifted, with a little sensor-like noise, and re-encoded at the
JPEG quality (searched per image, 50–98) that brings it closest to a size drawn around 110 KB. Everything
is drawn from (seed, index), so a set is the same on every machine with the same photographs.

The photographs are the colour ones bundled in scikit-image's package (astronaut, coffee, chelsea, rocket,
motorcycle, Hubble deep field, immunohistochemistry; read as files) when scikit-image is installed; without
it, procedural photo-like images: coloured noise with a natural image's 1/f² power spectrum plus hard-edged
shapes, which JPEG-compress like photographs. The content used is recorded in the summary, so a report says
which it was. No network is needed either way.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bsim_fast import cli
from bsim_fast.host import available_cores

LANDSCAPE = (500, 375)
MEAN_KB = 110.0
# Colour photographs shipped inside scikit-image's wheel (skimage/data/), read as files: nothing is fetched.
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "ihc.png",
)


def skimage_photos() -> list:
    """RGB photographs bundled with scikit-image; [] without scikit-image (it is located, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    photos = []
    for name in SKIMAGE_PHOTOS:
        try:
            img = np.asarray(Image.open(folder / name).convert("RGB"))
        except OSError:  # a photo missing from this version: left out
            continue
        if min(img.shape[:2]) >= 256:
            photos.append(np.ascontiguousarray(img))
    return photos


def procedural_photo(rng: np.random.Generator, size=(768, 576)) -> np.ndarray:
    """A photo-like RGB image: per-channel-correlated noise with a 1/f² power spectrum (the statistics of
    natural images) and a few hard-edged blobs and bars (object boundaries)."""
    w, h = size
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amp = 1.0 / f ** rng.uniform(0.9, 1.15)  # amplitude ~ 1/f: power ~ 1/f²
    base = []
    for _ in range(3):
        phase = rng.uniform(0, 2 * np.pi, amp.shape)
        base.append(np.fft.irfft2(amp * np.exp(1j * phase), s=(h, w)))
    mixing = rng.uniform(0.2, 1.0, (3, 3)) + np.eye(3) * rng.uniform(0.5, 1.5)  # correlated channels
    img = np.tensordot(mixing, np.stack(base), axes=1)
    img = (img - img.mean(axis=(1, 2), keepdims=True)) / (img.std(axis=(1, 2), keepdims=True) + 1e-9)
    img = img * rng.uniform(30, 55, (3, 1, 1)) + rng.uniform(70, 180, (3, 1, 1))
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(3, 9))):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(h, w)
        if rng.random() < 0.5:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        else:
            mask = (np.abs(yy - cy) < r * 0.3) & (np.abs(xx - cx) < r * 1.5)
        img[:, mask] = img[:, mask] * rng.uniform(0.4, 0.9) + rng.uniform(0, 255, (3, 1)) * rng.uniform(0.1, 0.6)
    return np.clip(img.transpose(1, 2, 0), 0, 255).astype(np.uint8)


def _encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def encode_near(img: Image.Image, target_bytes: float) -> bytes:
    """The JPEG of `img` whose size is closest to `target_bytes`, over qualities 50..98 (bisection)."""
    lo, hi = 50, 98
    best = _encode(img, 90)
    while lo <= hi:
        q = (lo + hi) // 2
        data = _encode(img, q)
        if abs(len(data) - target_bytes) < abs(len(best) - target_bytes):
            best = data
        if len(data) < target_bytes:
            lo = q + 1
        else:
            hi = q - 1
    return best


_PHOTOS: list = []


def _init(photos) -> None:
    global _PHOTOS
    _PHOTOS = photos


def make_image(index: int, seed: int) -> bytes:
    """The JPEG bytes of image `index` of the set `seed`."""
    rng = np.random.default_rng((seed, index))
    src = _PHOTOS[index % len(_PHOTOS)] if _PHOTOS else procedural_photo(rng)
    h, w = src.shape[:2]
    out_w, out_h = LANDSCAPE if rng.random() >= 0.2 else LANDSCAPE[::-1]
    aspect = out_w / out_h
    scale = rng.uniform(0.35, 1.0)  # the crop's area fraction of the largest crop with this aspect
    ch = min(h, int(w / aspect))
    ch = max(16, int(ch * np.sqrt(scale)))
    cw = min(w, int(ch * aspect))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = src[y0 : y0 + ch, x0 : x0 + cw].astype(np.float32)
    crop = crop * rng.uniform(0.8, 1.2, 3) + rng.uniform(-20, 20, 3)  # white balance / exposure
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    img = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize((out_w, out_h), Image.BICUBIC)
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, rng.uniform(1.5, 4.0), (out_h, out_w, 1))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    target = MEAN_KB * 1000 * float(np.exp(rng.normal(-0.08, 0.4)))  # log-normal, mean ~110 KB
    return encode_near(img, target)


def _write_one(job) -> int:
    index, seed, path = job
    data = make_image(index, seed)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)


def write_set(
    out_dir: Path, count: int, classes: int = 10, seed: int = 0, workers: int = 0, content: str = "auto"
) -> dict:
    """Write `count` JPEGs as an ImageFolder tree (`classes` folders) under `out_dir`; return a summary
    (also written to `out_dir.with_suffix('.json')`). content: auto (scikit-image if installed), skimage,
    procedural."""
    photos = [] if content == "procedural" else skimage_photos()
    if content == "skimage" and not photos:
        raise RuntimeError("content=skimage: scikit-image (with its bundled photographs) is not installed")
    out_dir = Path(out_dir)
    jobs = []
    for i in range(count):
        folder = out_dir / f"class_{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((i, seed, folder / f"img_{i:05d}.jpg"))
    workers = workers or min(16, available_cores())
    if workers > 1 and count > 8:
        with ProcessPoolExecutor(workers, initializer=_init, initargs=(photos,)) as pool:
            sizes = list(pool.map(_write_one, jobs, chunksize=8))
    else:
        _init(photos)
        sizes = [_write_one(j) for j in jobs]
    summary = {
        "images": count,
        "classes": classes,
        "seed": seed,
        "width_height": list(LANDSCAPE),
        "portrait_fraction": 0.2,
        "mean_kb": float(np.mean(sizes)) / 1000,
        "total_mb": sum(sizes) / 1e6,
        "content": f"scikit-image photographs ({len(photos)})" if photos else "procedural 1/f² images",
    }
    Path(str(out_dir) + ".json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder (ImageFolder layout)")
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="processes (default: cores, at most 16)")
    p.add_argument("--content", choices=("auto", "skimage", "procedural"), default="auto")
    args = p.parse_args(argv)
    if args.count < 1 or args.classes < 1:
        print("error: --count and --classes must be at least 1", file=sys.stderr)
        return 2
    s = write_set(Path(args.out), args.count, args.classes, args.seed, args.workers, args.content)
    print(f"{s['images']} JPEGs, {s['mean_kb']:.0f} KB average, {s['total_mb']:.0f} MB, {s['content']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
