"""Evaluation of a frozen backbone: weighted k-NN (InstDisc: k=200, cosine, T=0.07), a linear probe on cached
features, and export of the backbone as a plain torchvision state_dict.

    python -m bsim_fast.eval knn    --checkpoint runs/x/backbone.pt \
        --train data_out/train.beton --val data_out/test.beton
    python -m bsim_fast.eval linear --checkpoint runs/x/ckpt_00001000.pt --train ... --val ...
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .checkpoint import CKPT_RE, CheckpointError, atomic_torch_save, atomic_write_bytes, load_checkpoint, torch_load
from .config import Config, ConfigError, from_dict
from .mix import cutmix_normalize


def is_labeled(loader) -> bool:
    """Loaders say whether their set has labels (an unlabeled set stores -1 for every sample)."""
    return getattr(loader, "labeled", True)


# ----------------------------------------------------------------------------------------- features
def _gather_varsize(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor whose first dimension differs between ranks (eval splits are not padded)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    padded = x.new_zeros((top, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


@torch.no_grad()
def extract_features(backbone: nn.Module, loader, mean, std, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features and labels of every sample of `loader` (all ranks gathered)."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    from tqdm import tqdm

    main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    # minutes on ImageNet-sized banks: show it (the bar switches itself off when stdout is not a terminal)
    for x_u8, y in tqdm(loader, desc="features", unit="batch", leave=False, disable=None if main else True):
        x, _ = cutmix_normalize(x_u8.contiguous(), None, None, mean, std, dtype)  # the training path's normalise
        with torch.autocast(x.device.type, dtype=dtype, enabled=x.device.type == "cuda" and dtype != torch.float32):
            f = backbone(x)
        feats.append(F.normalize(f.float(), dim=1))
        labels.append(y.to(f.device))
    backbone.train(was_training)
    return _gather_varsize(torch.cat(feats)), _gather_varsize(torch.cat(labels))


def knn_classify(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    k: int = 200,
    t: float = 0.07,
    chunk: int = 1024,
) -> dict:
    """Weighted k-NN: each of the k nearest training features votes exp(cos/T) for its class."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, train_f.shape[0])
    top1 = top5 = 0
    for i in range(0, test_f.shape[0], chunk):
        sim = test_f[i : i + chunk] @ train_f.T
        w, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (w / t).exp())
        pred = votes.topk(min(5, num_classes), dim=1).indices
        truth = test_y[i : i + chunk].view(-1, 1)
        top1 += (pred[:, :1] == truth).sum().item()
        top5 += (pred == truth).any(dim=1).sum().item()
    n = test_f.shape[0]
    return {"knn_top1": 100.0 * top1 / n, "knn_top5": 100.0 * top5 / n}


def linear_probe(
    train_f,
    train_y,
    test_f,
    test_y,
    epochs: int = 100,
    lr: float = 0.1,
    wd: float = 1e-6,
    batch: int = 1024,
    seed: int = 0,
) -> dict:
    """A linear classifier on cached, standardised features (SGD + cosine): minutes instead of hours."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mu, sd = train_f.mean(0, keepdim=True), train_f.std(0, keepdim=True) + 1e-6
    xtr, xte = (train_f - mu) / sd, (test_f - mu) / sd
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    # the head's initial weights come from `seed` as well, not from the global RNG, whose state depends on what
    # ran before (loading a training checkpoint builds the whole method): the probe is a function of its inputs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(xtr.shape[1], num_classes)
    head = head.to(xtr.device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    steps = epochs * max(1, (xtr.shape[0] + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        order = torch.randperm(xtr.shape[0], generator=g).to(xtr.device)
        for i in range(0, xtr.shape[0], batch):
            idx = order[i : i + batch]
            loss = F.cross_entropy(head(xtr[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        pred = head(xte).topk(min(5, num_classes), dim=1).indices
    truth = test_y.view(-1, 1)
    return {
        "linear_top1": 100.0 * (pred[:, :1] == truth).float().mean().item(),
        "linear_top5": 100.0 * (pred == truth).any(dim=1).float().mean().item(),
    }


def knn_monitor(
    backbone: nn.Module,
    cfg: Config,
    build_eval_loader: Callable,
    rank: int,
    world: int,
    device: torch.device,
    dtype=torch.float32,
    log: Callable[[str], None] = print,
) -> dict | None:
    """k-NN top-1/top-5 of the current backbone: training split (no augmentation) as the bank, data.val as
    queries. None, after one line through `log`, when either set is unlabeled (nothing is extracted)."""
    bank = build_eval_loader(cfg, cfg.data.train, rank, world, device)
    queries = build_eval_loader(cfg, cfg.data.val, rank, world, device)
    for key, loader in (("data.train", bank), ("data.val", queries)):
        if not is_labeled(loader):
            log(
                f"[knn] {key} = {getattr(cfg.data, key[5:])!r} is unlabeled: the k-NN monitor needs labelled "
                f"data and is skipped"
            )
            return None
    train_f, train_y = extract_features(backbone, bank, cfg.data.mean, cfg.data.std, dtype)
    test_f, test_y = extract_features(backbone, queries, cfg.data.mean, cfg.data.std, dtype)
    return knn_classify(train_f, train_y, test_f, test_y, cfg.train.knn_k, cfg.train.knn_t)


# ------------------------------------------------------------------------------------------- export
def _plain_module(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)


def export_backbone(backbone: nn.Module, cfg: Config, path: Path) -> Path:
    """The online encoder as a torchvision resnet state_dict (no `fc`), plus `<name>.json` saying how to
    rebuild it: `m = torchvision.models.resnet50(); m.fc = nn.Identity(); m.load_state_dict(sd)`."""
    path = Path(path)
    state = _plain_module(backbone).state_dict()
    sd = {k.replace("_orig_mod.", ""): v.detach().cpu().clone() for k, v in state.items()}
    atomic_torch_save(sd, path)
    meta = {
        "arch": cfg.model.arch,
        "cifar_stem": cfg.model.cifar_stem,
        "recipe": cfg.recipe,
        "image_size": cfg.data.image_size,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
    }
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
    return path


def load_backbone(path: Path, log: Callable[[str], None] = print) -> tuple[nn.Module, Config]:
    """A backbone from an exported `backbone.pt` (with the `backbone.json` written beside it) or from a training
    checkpoint (verified by its .sha256 when it has one; without, loaded after a one-line warning)."""
    from .models import build_backbone

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    meta_path = path.with_suffix(".json")
    if CKPT_RE.match(path.name) or not meta_path.is_file():
        state = load_checkpoint(path, require_hash=False, log=log)
        if not (isinstance(state, dict) and "model" in state and "config" in state):
            raise CheckpointError(
                f"{path}: an exported backbone needs the {meta_path.name} written beside it "
                f"(architecture and stem); copy it along"
            )
        cfg = from_dict(state["config"], source=str(path))
        from .methods import build_method

        method = build_method(cfg)
        _load_state(method, state["model"], path)
        return method.backbone, cfg
    meta = json.loads(meta_path.read_text())
    cfg = Config()
    cfg.model.arch, cfg.model.cifar_stem = meta["arch"], meta["cifar_stem"]
    cfg.data.image_size = meta["image_size"]
    cfg.data.mean, cfg.data.std = tuple(meta["mean"]), tuple(meta["std"])
    backbone, _ = build_backbone(cfg.model.arch, cfg.model.cifar_stem)
    _load_state(backbone, torch_load(path), path)
    return backbone, cfg


def _load_state(module: nn.Module, state: dict, path: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # torch lists every key: one line instead
        raise CheckpointError(
            f"{path}: its tensors do not fit the model it names ({str(e).splitlines()[0].rstrip(':.')})"
        ) from None


def _loader_kind(path: str) -> str:
    p = Path(path)
    if p.suffix == ".beton":
        return "ffcv"
    if (p / "meta.json").is_file():
        return "dali"
    return "torch"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["knn", "linear", "export"])
    parser.add_argument("--checkpoint", required=True, help="backbone.pt (exported) or ckpt_*.pt (training)")
    parser.add_argument(
        "--train",
        help="knn/linear: the labelled training split (.beton, DALI shard folder or "
        "ImageFolder), the k-NN bank or the probe's training set",
    )
    parser.add_argument("--val", help="knn/linear: the labelled evaluation split, same kinds")
    parser.add_argument("--output", help="export: where to write the backbone state_dict (and its .json)")
    parser.add_argument("--overwrite", action="store_true", help="export: replace an existing --output")
    parser.add_argument("--k", type=int, default=200, help="k-NN neighbours (default: 200)")
    parser.add_argument("--t", type=float, default=0.07, help="k-NN vote temperature (default: 0.07)")
    parser.add_argument(
        "--epochs", type=int, default=100, help="linear probe epochs over cached features (default: 100)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per feature batch (default: 256)")
    parser.add_argument("--workers", type=int, default=4, help="loader workers (default: 4)")
    args = parser.parse_args(argv)
    try:
        for name, low in (("k", 1), ("epochs", 1), ("batch_size", 1), ("workers", 0)):
            if getattr(args, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} = {getattr(args, name)} must be >= {low}")
        if not args.t > 0:
            raise ConfigError(f"--t = {args.t} must be > 0")
        if args.task == "export" and not args.output:
            raise ConfigError("export needs --output PATH")
        if args.task == "export" and Path(args.output).exists() and not args.overwrite:
            raise ConfigError(f"--output {args.output}: exists; pass --overwrite to replace it")
        if args.task != "export":  # before loading anything
            if not (args.train and args.val):
                raise ConfigError(f"{args.task} needs --train and --val")
            for p in (args.train, args.val):
                if not p.startswith("builtin") and not Path(p).exists():
                    raise ConfigError(f"{p}: dataset not found")
        backbone, cfg = load_backbone(Path(args.checkpoint), log=lambda m: print(m, file=sys.stderr))
        if args.task == "export":
            print(export_backbone(backbone, cfg, Path(args.output)))
            return 0
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        backbone = backbone.to(device).to(memory_format=torch.channels_last)
        cfg.data.batch_size, cfg.data.workers = args.batch_size, args.workers
        from .loaders import build_eval_loader

        loaders = []
        for flag, path in (("--train", args.train), ("--val", args.val)):
            cfg.data.loader = _loader_kind(path)
            loader = build_eval_loader(cfg, path, 0, 1, device)
            if not is_labeled(loader):  # before minutes of feature extraction
                raise ConfigError(
                    f"{flag} {path}: unlabeled dataset; {args.task} needs labelled --train and --val "
                    f"(the backbone itself may come from unlabeled pretraining)"
                )
            loaders.append(loader)
        if device.type == "cpu":  # after every check, so that a refusal stays one line
            from .dist import set_cpu_threads

            set_cpu_threads(1, log=lambda m: print(m, file=sys.stderr))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        tr_f, tr_y = extract_features(backbone, loaders[0], cfg.data.mean, cfg.data.std, dtype)
        te_f, te_y = extract_features(backbone, loaders[1], cfg.data.mean, cfg.data.std, dtype)
        if args.task == "knn":
            result = knn_classify(tr_f, tr_y, te_f, te_y, args.k, args.t)
        else:
            result = linear_probe(tr_f, tr_y, te_f, te_y, epochs=args.epochs)
        result = {k: round(v, 2) for k, v in result.items()}  # percentages: more digits are noise
        result.update(train_images=tr_f.shape[0], val_images=te_f.shape[0])
        print(json.dumps(result))
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
