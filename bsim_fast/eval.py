"""Evaluation of a frozen backbone: weighted k-NN (InstDisc: k=200, cosine, T=0.07), a linear probe on cached
features, and export of the backbone as a plain torchvision state_dict (torch or safetensors file).

    python -m bsim_fast.eval knn    --checkpoint runs/x/backbone.pt \
        --train data_out/train.beton --val data_out/test.beton
    python -m bsim_fast.eval linear --checkpoint runs/x/ckpt_00001000.pt --train ... --val ...
    python -m bsim_fast.eval export --checkpoint runs/x/ckpt_00001000.pt --output runs/x/backbone.safetensors
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

from . import cli, loaders
from .atomic import DiskFullError, write_bytes_atomic
from .checkpoint import CKPT_RE, CheckpointError, atomic_torch_save, load_checkpoint, torch_load
from .config import MODES, Config, ConfigError, from_dict
from .dist import set_cpu_threads
from .methods import build_method
from .mix import cutmix_normalize
from .models import build_backbone
from .precision import Precision, precision_for


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
def extract_features(
    backbone: nn.Module, loader, mean, std, precision: Precision | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features and labels of every sample of `loader` (all ranks gathered), computed as the
    trainer computes (`precision_for(cfg.train.precision, device)`; fp32 without one)."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    from tqdm import tqdm

    main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    # minutes on ImageNet-sized banks: show it (the bar switches itself off when stdout is not a terminal)
    for x_u8, y in tqdm(loader, desc="features", unit="batch", leave=False, disable=None if main else True):
        p = precision or precision_for("fp32", x_u8.device)
        x, _ = cutmix_normalize(x_u8.contiguous(), None, None, mean, std, p.view_dtype)  # the training normalise
        with p.autocast_context():
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
    log: Callable[[str], None] = print,
) -> dict | None:
    """k-NN top-1/top-5 of the current backbone (computed in `train.precision`): training split (no
    augmentation) as the bank, data.val as queries. None, after one line through `log`, when either set is
    unlabeled (nothing is extracted)."""
    bank = build_eval_loader(cfg, cfg.data.train, rank, world, device)
    queries = build_eval_loader(cfg, cfg.data.val, rank, world, device)
    for key, loader in (("data.train", bank), ("data.val", queries)):
        if not is_labeled(loader):
            log(
                f"[knn] {key} = {getattr(cfg.data, key[5:])!r} is unlabeled: the k-NN monitor needs labelled "
                f"data and is skipped"
            )
            return None
    precision = precision_for(cfg.train.precision, device)
    train_f, train_y = extract_features(backbone, bank, cfg.data.mean, cfg.data.std, precision)
    test_f, test_y = extract_features(backbone, queries, cfg.data.mean, cfg.data.std, precision)
    return knn_classify(train_f, train_y, test_f, test_y, cfg.train.knn_k, cfg.train.knn_t)


# ------------------------------------------------------------------------------------------- export
# How an exported backbone is stored; a safetensors file is named *.safetensors (load_backbone reads by suffix).
EXPORT_FORMATS = ("torch", "safetensors")
SAFETENSORS_SUFFIX = ".safetensors"


def _plain_module(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)


def safetensors_torch():
    """The `safetensors.torch` module, or a one-line ConfigError saying how to install it (an extra)."""
    try:
        import safetensors.torch
    except ImportError:
        raise ConfigError(
            "--format safetensors needs the safetensors package: pip install 'bsim_fast[safetensors]'"
        ) from None
    return safetensors.torch


def export_meta(cfg: Config) -> bytes:
    """`<name>.json` beside an export: what rebuilds the network (arch, stem) and what its inputs were."""
    meta = {
        "arch": cfg.model.arch,
        "cifar_stem": cfg.model.cifar_stem,
        "recipe": cfg.recipe,
        "image_size": cfg.data.image_size,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "precision": cfg.train.precision,
    }
    return json.dumps(meta, indent=1).encode()


def export_backbone(backbone: nn.Module, cfg: Config, path: Path, fmt: str = "torch") -> Path:
    """The online encoder as a torchvision resnet state_dict (no `fc`; timm's ResNets share the key names),
    plus `<name>.json` saying how to rebuild it (`m = torchvision.models.resnet50(); m.fc = nn.Identity();
    m.load_state_dict(sd)`) and the precision it was trained in (what `eval` computes its features in). `fmt`:
    "torch" (torch.save) or "safetensors" (the file's metadata holds the json too). Both written atomically."""
    path = Path(path)
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    state = _plain_module(backbone).state_dict()
    # contiguous: safetensors stores plain row-major buffers (a channels_last weight is not one)
    sd = {k.replace("_orig_mod.", ""): v.detach().cpu().contiguous().clone() for k, v in state.items()}
    meta = export_meta(cfg)
    if fmt == "torch":
        atomic_torch_save(sd, path)
    else:
        write_bytes_atomic(path, safetensors_torch().save(sd, metadata={"format": "pt", "bsim_fast": meta.decode()}))
    write_bytes_atomic(path.with_suffix(".json"), meta)
    return path


def load_backbone(path: Path, log: Callable[[str], None] = print) -> tuple[nn.Module, Config]:
    """A backbone from an exported `backbone.pt` or `*.safetensors` (with the `.json` written beside it) or from
    a training checkpoint (verified by its .sha256 when it has one; without, loaded after a one-line warning)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    meta_path = path.with_suffix(".json")
    no_meta = CheckpointError(
        f"{path}: an exported backbone needs the {meta_path.name} written beside it (architecture and stem); "
        f"copy it along"
    )
    if path.suffix == SAFETENSORS_SUFFIX and not meta_path.is_file():
        raise no_meta
    if CKPT_RE.match(path.name) or not meta_path.is_file():
        state = load_checkpoint(path, require_hash=False, log=log)
        if not (isinstance(state, dict) and "model" in state and "config" in state):
            raise no_meta
        cfg = from_dict(state["config"], source=str(path))
        method = build_method(cfg)
        _load_state(method, state["model"], path)
        return method.backbone, cfg
    meta = json.loads(meta_path.read_text())
    cfg = Config()
    cfg.model.arch, cfg.model.cifar_stem = meta["arch"], meta["cifar_stem"]
    cfg.data.image_size = meta["image_size"]
    cfg.data.mean, cfg.data.std = tuple(meta["mean"]), tuple(meta["std"])
    # the recipe's name is method.name plus "_<mode>" unless SIM (Config.recipe): kept, so a re-export says it
    name, _, mode = meta["recipe"].rpartition("_")
    cfg.method.name, cfg.method.mode = (
        (name, mode) if name and mode in MODES and mode != "sim" else (meta["recipe"], "sim")
    )
    cfg.train.precision = meta.get("precision", cfg.train.precision)  # written since the export has said it
    backbone, _ = build_backbone(cfg.model.arch, cfg.model.cifar_stem)
    _load_state(backbone, _load_tensors(path), path)
    return backbone, cfg


def _load_tensors(path: Path) -> dict:
    """An exported state_dict: a safetensors file by its suffix, otherwise a torch file."""
    if path.suffix != SAFETENSORS_SUFFIX:
        return torch_load(path)
    try:
        return safetensors_torch().load_file(str(path))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own error types vary between versions: one line
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def _load_state(module: nn.Module, state: dict, path: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # torch lists every key: one line instead
        raise CheckpointError(
            f"{path}: its tensors do not fit the model it names ({str(e).splitlines()[0].rstrip(':.')})"
        ) from None


def check_export(args) -> None:
    """export's flags, before anything is loaded; sets args.format from the --output name when not given."""
    if not args.output:
        raise ConfigError("export needs --output PATH")
    named = "safetensors" if Path(args.output).suffix == SAFETENSORS_SUFFIX else "torch"
    args.format = args.format or named
    if args.format != named:
        raise ConfigError(
            f"--output {args.output} with --format {args.format}: a safetensors export is named "
            f"*{SAFETENSORS_SUFFIX} and only it (load_backbone tells the formats by the name)"
        )
    if args.format == "safetensors":
        safetensors_torch()
    if Path(args.output).exists() and not args.overwrite:
        raise ConfigError(f"--output {args.output}: exists; pass --overwrite to replace it")


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        help="export: torch (torch.save) or safetensors (needs the safetensors package; --output named "
        "*.safetensors); default: safetensors for a *.safetensors --output, torch otherwise",
    )
    parser.add_argument("--k", type=int, default=200, help="k-NN neighbours (default: 200)")
    parser.add_argument("--t", type=float, default=0.07, help="k-NN vote temperature (default: 0.07)")
    parser.add_argument(
        "--epochs", type=int, default=100, help="linear probe epochs over cached features (default: 100)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per feature batch (default: 256)")
    parser.add_argument("--workers", type=int, default=4, help="loader workers (default: 4)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        for name, low in (("k", 1), ("epochs", 1), ("batch_size", 1), ("workers", 0)):
            if getattr(args, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} = {getattr(args, name)} must be >= {low}")
        if not args.t > 0:
            raise ConfigError(f"--t = {args.t} must be > 0")
        kinds = []
        if args.task == "export":
            check_export(args)
        else:  # before loading anything
            if not (args.train and args.val):
                raise ConfigError(f"{args.task} needs --train and --val")
            kinds = [loaders.kind_for_path(p) for p in (args.train, args.val)]  # exists, and which loader reads it
        backbone, cfg = load_backbone(Path(args.checkpoint), log=lambda m: print(m, file=sys.stderr))
        if args.task == "export":
            meta = Path(args.output).with_suffix(".json")  # the same for every export of this backbone
            if meta.exists() and meta.read_bytes() != export_meta(cfg) and not args.overwrite:
                raise ConfigError(f"{meta}: exists and describes another backbone; pass --overwrite to replace it")
            print(export_backbone(backbone, cfg, Path(args.output), args.format))
            return 0
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        backbone = backbone.to(device).to(memory_format=torch.channels_last)
        cfg.data.batch_size, cfg.data.workers = args.batch_size, args.workers
        sets = []
        for flag, path, kind in zip(("--train", "--val"), (args.train, args.val), kinds):
            loader = loaders.build_eval_loader(cfg, path, 0, 1, device, kind)
            if not is_labeled(loader):  # before minutes of feature extraction
                raise ConfigError(
                    f"{flag} {path}: unlabeled dataset; {args.task} needs labelled --train and --val "
                    f"(the backbone itself may come from unlabeled pretraining)"
                )
            sets.append(loader)
        if device.type == "cpu":  # after every check, so that a refusal stays one line
            set_cpu_threads(1, log=lambda m: print(m, file=sys.stderr))
        precision = precision_for(cfg.train.precision, device)  # as the checkpoint was trained
        tr_f, tr_y = extract_features(backbone, sets[0], cfg.data.mean, cfg.data.std, precision)
        te_f, te_y = extract_features(backbone, sets[1], cfg.data.mean, cfg.data.std, precision)
        if args.task == "knn":
            result = knn_classify(tr_f, tr_y, te_f, te_y, args.k, args.t)
        else:
            result = linear_probe(tr_f, tr_y, te_f, te_y, epochs=args.epochs)
        result = {k: round(v, 2) for k, v in result.items()}  # percentages: more digits are noise
        result.update(train_images=tr_f.shape[0], val_images=te_f.shape[0])
        print(json.dumps(result))
    except (ConfigError, CheckpointError, DiskFullError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
