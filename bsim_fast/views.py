"""See a batch as the training step sees it: one PNG grid of the views, and a histogram of λ beside it.

    python -m bsim_fast.views small/byol_bsim --data builtin --out views.png \\
        [--n 8] [--seed S] [--draws 10000] [--device cuda] [section.key=value ...]

One row per sample: the loader's uint8 crops of views a and b (random resized crop + flip), their photometric
results (`augment.photometric` with the recipe's two policies) and, in BSIM / WBSIM, the mixed views m' and m''
(`mix.make_views`, denormalised) with the CutMix box outlined, the partner's index and λ', λ''. Beside the
grid: λ over `--draws` boxes (`mix.sample_boxes` at the recipe's resolution and `bsim.alpha`), with their mean
and the analytic mean of docs/METHOD.md (`mix.expected_lam`).

Nothing here re-implements a step: `build_train_loader` reads batch 0 of epoch 0 with a batch of `--n` images
(so every partner is a row of the picture), `TrainLoader.augment` draws its photometric parameters, and
`make_views` mixes with the generator of training step 0 (`train.step_generator`). The picture is step 0 of a
one-process run of the recipe with `data.batch_size=N` and `train.seed=S`, normalised in fp32 (a GPU run
rounds the normalised views to its autocast dtype). The PNG also carries the numbers, as JSON in a text chunk
named `bsim_fast.views`: partner, boxes, λ', λ'' per row, the histogram's mean and the analytic value.

`views_grid` returns the picture as an HWC uint8 array (what TensorBoard's `add_image` takes); the CLI writes
it atomically. Bad arguments: one line and exit 2, before any image is read.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import cli
from .atomic import write_bytes_atomic
from .config import Config, ConfigError, load_config
from .mix import draw_mixing, expected_lam, make_views, sample_boxes
from .recipes import recipe_path

PNG_KEY = "bsim_fast.views"  # the PNG text chunk holding the picture's numbers
MIN_PANEL = 96  # pixels: smaller views are enlarged by a whole factor (nearest), so every pixel stays exact
BOX_RGB = (255, 0, 255)  # the CutMix box outline
MARGIN, GAP, LABEL_W, HEADER_H, HIST_W, HIST_MIN_H = 12, 6, 118, 52, 430, 330
DPI = 100
MAX_N = 64  # rows: a taller picture is not looked at


class ViewsError(ConfigError):
    """A bad argument: one line, exit 2."""


@dataclass
class ViewBatch:
    """One batch at each stage of the step, uint8 [N, S, S, 3] numpy arrays (the mixed views denormalised).

    The mixing fields are None in SIM (no mixed views); `crops_*` are None where only the photometric views
    are at hand (a training step). Boxes are [N, 4] (y0, y1, x0, x1), half-open, as `mix.sample_boxes`."""

    photo_a: np.ndarray
    photo_b: np.ndarray
    crops_a: np.ndarray | None = None
    crops_b: np.ndarray | None = None
    mixed_a: np.ndarray | None = None
    mixed_b: np.ndarray | None = None
    boxes_a: np.ndarray | None = None
    boxes_b: np.ndarray | None = None
    partner: np.ndarray | None = None
    lam_a: np.ndarray | None = None
    lam_b: np.ndarray | None = None

    def columns(self) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
        """(header, images, boxes to outline) of each column present, left to right."""
        cols = [
            ("crop a\n(loader)", self.crops_a, None),
            ("crop b\n(loader)", self.crops_b, None),
            ("a = t'(x)\n(photometric)", self.photo_a, None),
            ("b = t''(x)\n(photometric)", self.photo_b, None),
            ("m': box from\nthe partner's a", self.mixed_a, self.boxes_a),
            ("m'': box from\nthe partner's b", self.mixed_b, self.boxes_b),
        ]
        return [c for c in cols if c[1] is not None]


def host_u8(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def denormalize(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised [N, 3, S, S] views -> uint8 [N, S, S, 3]: x * std + mean, rounded (exact for fp32 views of
    uint8 pixels: `cutmix_normalize` is within an fp32 ulp of (u - mean) / std)."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    u8 = (x.float() * s + m).round_().clamp_(0, 255).to(torch.uint8)
    return host_u8(u8.permute(0, 2, 3, 1))


def step_views(
    a_u8: torch.Tensor, b_u8: torch.Tensor, cfg: Config, gen: torch.Generator, rows: int | None = None
) -> ViewBatch:
    """The photometric views a, b of a step and what `make_views` makes of them with `gen` (the step's
    generator); the boxes come from replaying `gen`'s draws through `mix.draw_mixing`, as make_views drew.
    `rows`: only the first rows reach the host (the trainer's picture of a large batch); the whole batch is
    mixed, so a partner may be a row left out."""
    replay = torch.Generator(device=gen.device)
    replay.set_state(gen.get_state())
    views = make_views(a_u8.contiguous(), b_u8.contiguous(), cfg, gen, torch.float32)
    kept = slice(rows)
    batch = ViewBatch(photo_a=host_u8(a_u8[kept]), photo_b=host_u8(b_u8[kept]))
    if "mixed_a" not in views:
        return batch
    n, height, width, _ = a_u8.shape
    _, boxes_a, _, boxes_b, _ = draw_mixing(n, height, width, cfg.bsim.alpha, replay)
    batch.mixed_a = denormalize(views["mixed_a"][kept], cfg.data.mean, cfg.data.std)
    batch.mixed_b = denormalize(views["mixed_b"][kept], cfg.data.mean, cfg.data.std)
    batch.boxes_a, batch.boxes_b = boxes_a[kept].numpy(), boxes_b[kept].numpy()
    batch.partner = views["partner"][kept].cpu().numpy()
    batch.lam_a, batch.lam_b = views["lam_a"][kept].cpu().numpy(), views["lam_b"][kept].cpu().numpy()
    return batch


def first_batch(cfg: Config, device) -> ViewBatch:
    """Batch 0 of epoch 0 of `cfg`'s own train loader (rank 0 of 1), at each stage of training step 0."""
    from .loaders import build_train_loader
    from .step import step_generator

    loader = build_train_loader(cfg, 0, 1, device)
    if len(loader) < 1:
        raise ViewsError(
            f"--n {cfg.data.batch_size}: {cfg.data.train} holds {loader.num_samples} images, fewer than one batch"
        )
    crops = loader.crops(0, 0)
    try:
        crops_a, crops_b, _ = next(crops)
    finally:
        crops.close()  # the back end's workers stop here
    photo_a, photo_b = loader.augment(crops_a, crops_b, 0, 0)
    batch = step_views(photo_a, photo_b, cfg, step_generator(cfg.train.seed, 0, 0))
    batch.crops_a, batch.crops_b = host_u8(crops_a), host_u8(crops_b)
    return batch


def lam_draws(draws: int, side: int, alpha: float, seed: int) -> np.ndarray:
    """λ of `draws` CutMix boxes at `side` px, as the training step draws them (`mix.sample_boxes`)."""
    _, lam = sample_boxes(draws, side, side, alpha, generator=torch.Generator().manual_seed(seed))
    return lam.numpy()


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class GridLayout:
    """Where everything is, in pixels of the picture (y down, x right)."""

    rows: int
    cols: int
    side: int  # the views' side S
    scale: int  # each view pixel is a scale x scale block

    @property
    def panel(self) -> int:
        return self.side * self.scale

    def panel_origin(self, row: int, col: int) -> tuple[int, int]:
        """(y, x) of the top-left pixel of panel (row, col)."""
        return HEADER_H + row * (self.panel + GAP), MARGIN + LABEL_W + col * (self.panel + GAP)

    @property
    def grid_width(self) -> int:
        return self.cols * self.panel + (self.cols - 1) * GAP

    @property
    def grid_height(self) -> int:
        return self.rows * self.panel + (self.rows - 1) * GAP

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the picture."""
        height = HEADER_H + max(self.grid_height, HIST_MIN_H) + MARGIN
        return height, MARGIN + LABEL_W + self.grid_width + HIST_W + MARGIN


def grid_layout(batch: ViewBatch) -> GridLayout:
    n, side = batch.photo_a.shape[:2]
    return GridLayout(rows=n, cols=len(batch.columns()), side=side, scale=max(1, math.ceil(MIN_PANEL / side)))


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement by a whole factor: each pixel becomes a scale x scale block."""
    return image.repeat(scale, axis=0).repeat(scale, axis=1)


def outline(panel: np.ndarray, box, scale: int) -> None:
    """Draws the box's border on the enlarged panel, on the outer pixel ring of its border blocks, so that
    from a scale of 3 up every block keeps its centre pixel (an empty box, λ = 1, draws nothing)."""
    y0, y1, x0, x1 = (int(v) * scale for v in box)
    if y1 <= y0 or x1 <= x0:
        return
    panel[y0, x0:x1] = panel[y1 - 1, x0:x1] = BOX_RGB
    panel[y0:y1, x0] = panel[y0:y1, x1 - 1] = BOX_RGB


def panel_grid(batch: ViewBatch, layout: GridLayout) -> np.ndarray:
    """The panels on a white ground, [grid_height, grid_width, 3] uint8, pixel for pixel."""
    grid = np.full((layout.grid_height, layout.grid_width, 3), 255, np.uint8)
    top, left = layout.panel_origin(0, 0)
    for col, (_, images, boxes) in enumerate(batch.columns()):
        for row in range(layout.rows):
            panel = enlarge(images[row], layout.scale)
            if boxes is not None:
                outline(panel, boxes[row], layout.scale)
            y, x = layout.panel_origin(row, col)
            grid[y - top : y - top + layout.panel, x - left : x - left + layout.panel] = panel
    return grid


# ---------------------------------------------------------------------------------------------- drawing
def views_grid(batch: ViewBatch, lam: np.ndarray, alpha: float, title: str = "") -> np.ndarray:
    """The picture, HWC uint8: the panels of `batch` (`GridLayout` says where) with row and column labels,
    and the histogram of `lam` (draws of `mix.sample_boxes` with `alpha`) with its mean and the analytic
    mean. The panels are placed unresampled: their pixels are the views' pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layout = grid_layout(batch)
    height, width = layout.size
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    top, left = layout.panel_origin(0, 0)
    fig.figimage(panel_grid(batch, layout), xo=left, yo=height - top - layout.grid_height, origin="upper")

    def text(x: float, y: float, s: str, **kw) -> None:  # pixel coordinates, y down
        fig.text(x / width, 1 - y / height, s, va="top", **kw)

    text(MARGIN, 8, title, fontsize=10, weight="bold")
    for col, (header, _, _) in enumerate(batch.columns()):
        text(layout.panel_origin(0, col)[1], top - 26, header, fontsize=8)
    for row in range(layout.rows):
        y = layout.panel_origin(row, 0)[0]
        label = f"#{row}"
        if batch.partner is not None:
            label += f"  partner #{batch.partner[row]}\nλ' {batch.lam_a[row]:.3f}\nλ'' {batch.lam_b[row]:.3f}"
        text(MARGIN, y + 2, label, fontsize=8, family="monospace")
    _histogram(fig, layout, lam, alpha, used=batch.partner is not None)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _histogram(fig, layout: GridLayout, lam: np.ndarray, alpha: float, used: bool) -> None:
    height, width = layout.size
    x0 = MARGIN + LABEL_W + layout.grid_width + 70
    top, bottom = HEADER_H, height - MARGIN - 40
    ax = fig.add_axes(((x0) / width, 1 - bottom / height, (width - MARGIN - x0) / width, (bottom - top) / height))
    counts = ax.hist(lam, bins=40, range=(0.0, 1.0), color="#4c72b0")[0]
    ax.set_ylim(0, 1.3 * max(counts.max(), 1))  # headroom for the legend
    mean, analytic = float(np.mean(lam, dtype=np.float64)), expected_lam(alpha)
    ax.axvline(mean, color="black", linewidth=1.2, label=f"mean {mean:.4f} ({len(lam):,} draws)")
    label = f"analytic {analytic:.4f}\n(docs/METHOD.md: continuous box sides)"
    ax.axvline(analytic, color="#dd8452", linestyle="--", linewidth=1.2, label=label)
    ax.set_xlim(0, 1)
    ax.set_xlabel("λ = 1 - clipped box area / image area", fontsize=8)
    ax.set_ylabel("boxes", fontsize=8)
    unused = "" if used else "\n(a SIM recipe mixes nothing: no λ in its loss)"
    ax.set_title(f"λ of mix.sample_boxes, α = {alpha:g}, {layout.side} px{unused}", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper left")


def record(batch: ViewBatch, lam: np.ndarray, alpha: float, **about) -> dict:
    """The picture's numbers (stored in the PNG and printed)."""
    out = dict(about)
    if batch.partner is not None:
        out.update(partner=batch.partner.tolist(), lam_a=batch.lam_a.tolist(), lam_b=batch.lam_b.tolist())
        out.update(boxes_a=batch.boxes_a.tolist(), boxes_b=batch.boxes_b.tolist())
    out.update(alpha=alpha, lam_draws=len(lam), lam_mean=float(np.mean(lam, dtype=np.float64)))
    out["lam_analytic"] = expected_lam(alpha)
    return out


def png_bytes(image: np.ndarray, numbers: dict) -> bytes:
    """Lossless PNG of `image` with `numbers` as JSON in the text chunk PNG_KEY."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps(numbers))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info, optimize=True)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- CLI
SET_BY_FLAGS = {"data.batch_size": "--n", "data.train": "--data", "train.seed": "--seed", "train.accum_steps": "--n"}


def parse_args(argv):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a recipe by name (small/byol_bsim) or a .yaml file")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.loader=torch")
    p.add_argument("--data", help="the training set to read (default: the recipe's data.train)")
    p.add_argument("--out", default="views.png", help="the PNG to write (default: views.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--n", type=int, default=8, help=f"images in the batch, one row each (2..{MAX_N}; default 8)")
    p.add_argument("--seed", type=int, help="train.seed of the run pictured (default: the recipe's)")
    p.add_argument("--draws", type=int, default=10_000, help="boxes in the λ histogram (default 10000)")
    p.add_argument("--device", help="where the step runs: cpu, cuda, cuda:N (default: cuda when there is one)")
    return p.parse_intermixed_args(argv)


def pick_device(name: str | None) -> torch.device:
    """--device as a torch.device; one line for a name torch does not know or a GPU that is not there."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ViewsError(f"--device {name}: not a device name (cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ViewsError(f"--device {name}: the step runs on cpu or cuda")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ViewsError(f"--device {name}: {torch.cuda.device_count()} CUDA device(s) here")
    return device


def check_arguments(args) -> Config:
    """The config of the pictured run; every bad argument is a ViewsError / ConfigError, before any work."""
    if not 2 <= args.n <= MAX_N:
        raise ViewsError(f"--n {args.n}: must be in 2..{MAX_N} (a partner needs a second image)")
    if not 1 <= args.draws <= 10**7:
        raise ViewsError(f"--draws {args.draws}: must be in 1..10000000")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ViewsError(f"--out {out}: must name a .png file")
    if out.exists() and not args.overwrite:
        raise ViewsError(f"--out {out}: exists; pass --overwrite to replace it")
    for text in args.overrides:
        key = text.split("=", 1)[0]
        if key in SET_BY_FLAGS:
            raise ViewsError(f"override {text!r}: {key} is set by {SET_BY_FLAGS[key]}")
    cfg = load_config(recipe_path(args.recipe), args.overrides)
    cfg.data.batch_size, cfg.train.accum_steps = args.n, 1
    if args.data is not None:
        cfg.data.train = args.data
    if args.seed is not None:
        cfg.train.seed = args.seed
    from .loaders import check_dataset, check_kind

    check_kind(cfg.data.loader, cfg.where("data.loader"))
    check_dataset(cfg.data.loader, cfg.data.train, "--data")
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = check_arguments(args)
        device = pick_device(args.device)
        kind, side = cfg.data.loader, cfg.data.image_size
        print(f"[views] {cfg.recipe}: batch 0 of {args.n} images from {cfg.data.train} ({kind} loader, {device})")
        batch = first_batch(cfg, device)
        lam = lam_draws(args.draws, side, cfg.bsim.alpha, cfg.train.seed)
        title = (
            f"{args.recipe} ({cfg.method.mode.upper()}) · {kind} loader · seed {cfg.train.seed} · step 0 · {side} px"
        )
        image = views_grid(batch, lam, cfg.bsim.alpha, title)
        about = dict(recipe=str(args.recipe), overrides=args.overrides, loader=kind, data=cfg.data.train)
        numbers = record(batch, lam, cfg.bsim.alpha, seed=cfg.train.seed, image_size=side, **about)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out, png_bytes(image, numbers))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lam_line = f"λ mean {numbers['lam_mean']:.4f} over {args.draws:,} draws (analytic {numbers['lam_analytic']:.4f})"
    print(f"[views] wrote {out} ({image.shape[1]}x{image.shape[0]}); {lam_line}")
    return 0


__all__ = [
    "ViewBatch",
    "GridLayout",
    "step_views",
    "first_batch",
    "lam_draws",
    "views_grid",
    "record",
    "png_bytes",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
