"""What one training step asks of the device outside the networks' compiled graphs, counted without a GPU.

    python -m bsim_fast.tools.step_counts [--methods byol simclr] [--modes sim bsim wbsim] [--json PATH]

The trainer's own step (`step.TrainStep`) on the CUDA code path, run on the CPU: the Triton kernels under
Triton's interpreter (TRITON_INTERPRET=1 BSIM_FAST_TRITON=1, set here before any kernel is imported), the
views in bf16 under bf16 autocast, the optimiser as `build_optimizer` makes it for a CUDA device (fused SGD /
AdamW, and what a multi-tensor option resolves to there), the method compiled by `compile_networks` with a
backend whose graphs, forward and backward, are left out of the count (`counting.uncounted`): on a GPU they
are the networks' own kernels. Counted (`counting.count_launches`): every other aten op that launches a kernel
and every Triton launch, plus make_views' one host-to-device copy of partner, boxes and λ (on the CPU nothing
moves). Host work is not device work and is left out: drawing and checking partner and boxes.

Per step (one micro-batch, after two warm-up steps: compilation, momentum buffers): ``launches`` and their
names, and ``view_bytes`` / E, the traffic of the views outside the networks: every byte the CutMix kernel
loads and stores (exact under the interpreter) plus every aten op outside the graphs that reads a view the
step made (a copy such as a concatenation); and ``view_readers``, the operations of the compiled forward graphs
that read the views' batch through re-views only: a network's first convolution alone when no copy is made in
the graph either. E = N·S·S·3, the bytes of one uint8 view batch, so bf16 views are 2 E each; the counts do not
depend on N and S (tiny sizes are enough), the bytes scale with N·S² and are reported per E.
`tests/test_step_counts.py` fails above the budgets (`BUDGETS`).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Before any kernel module is imported: @triton.jit reads the flag when it decorates a kernel.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("BSIM_FAST_TRITON", "1")

import contextlib  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402

from bsim_fast import cli  # noqa: E402
from bsim_fast.tools.counting import count_launches, storage_key, uncounted  # noqa: E402

__all__ = ["BUDGETS", "count_step"]

# issue 23: launches per step outside the networks' graphs; the views' traffic per step in E (WBSIM's bound)
BUDGETS = {"launches": 40, "view_bytes_e": 20.0}


class _CudaPathPrecision:
    """`precision_for("bf16", "cuda")` as the CPU can run it: bf16 views and bf16 autocast (CPU autocast)."""

    amp_dtype = view_dtype = torch.bfloat16
    autocast, grad_scaler = True, False

    def autocast_context(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)


# operations that re-view a tensor (no copy) on the way from the views' batch to a network's first layer
_VIEWING = {"slice", "view", "_unsafe_view", "alias", "as_strided", "select", "unsqueeze", "expand", "detach"}


def _view_readers(gm, views_shape: tuple) -> set[str]:
    """The operations of a compiled forward graph that read the views' batch (the input of its shape), through
    re-views: a network's first convolution when the views reach it with no copy."""
    readers, frontier = set(), [n for n in gm.graph.nodes if n.op == "placeholder"]
    frontier = [n for n in frontier if tuple(getattr(n.meta.get("val"), "shape", ())) == views_shape]
    while frontier:
        for user in frontier.pop().users:
            name = getattr(user.target, "__name__", str(user.target)).split(".")[0]
            if user.op == "output":  # kept for the backward (the first convolution's weight gradient)
                continue
            if name in _VIEWING:
                frontier.append(user)
            else:
                readers.add(name)
    return readers


def _uncounted_backend(views_shape: tuple, readers: set):
    """aot_eager whose compiled forward and backward run uncounted (on a GPU: the networks' own kernels); the
    forward graphs' readers of the views' batch go to `readers`."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def forward_compiler(gm, example_inputs):
        readers.update(_view_readers(gm, views_shape))
        return compiler(gm, example_inputs)

    def compiler(gm, example_inputs):
        run = make_boxed_func(gm.forward)

        def uncounted_run(args):
            with uncounted():
                return run(args)

        uncounted_run._boxed_call = True
        return uncounted_run

    return aot_autograd(fw_compiler=forward_compiler, bw_compiler=compiler)


def _leave_compiled_out(method) -> None:
    """Each compiled function of the method runs uncounted, its guards and runtime wrappers (the write-back of
    BatchNorm's running statistics) included: on a GPU they are part of the graph's kernels."""
    for name in ("objective", *getattr(method, "networks", ())):
        compiled = getattr(method, name, None)
        if getattr(compiled, "_torchdynamo_orig_callable", None) is None:
            continue

        def run(*args, _compiled=compiled, **kwargs):
            with uncounted():
                return _compiled(*args, **kwargs)

        setattr(method, name, run)


@contextlib.contextmanager
def _host_work_uncounted(copies: list):
    """make_views' host work (drawing and checking partner and boxes) uncounted; a `to_device` call that moves
    what was drawn on the host is one host-to-device copy, counted in `copies` (on the CPU nothing moves)."""
    from bsim_fast import mix

    saved = {name: getattr(mix, name) for name in ("draw_mixing", "check_cutmix_inputs", "to_device")}
    drawn = set()

    def host(fn):
        def run(*args, **kwargs):
            with uncounted():
                return fn(*args, **kwargs)

        return run

    def draw_mixing(*args, **kwargs):
        out = host(saved["draw_mixing"])(*args, **kwargs)
        drawn.update(storage_key(t) for t in out)
        return out

    def to_device(tensors, device):
        if any(storage_key(t) in drawn for t in tensors):
            copies.append(len(tensors))
            drawn.difference_update(storage_key(t) for t in tensors)
        return host(saved["to_device"])(tensors, device)

    mix.draw_mixing, mix.check_cutmix_inputs = draw_mixing, host(saved["check_cutmix_inputs"])
    mix.to_device = to_device
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(mix, name, fn)


def _config(method: str, mode: str, n: int, size: int, nan_policy: str):
    from bsim_fast.config import load_config
    from bsim_fast.recipes import recipe_path

    recipe = f"small/{method}" if mode == "sim" else f"small/{method}_{mode}"
    overrides = [
        "model.arch=resnet18",
        "model.proj_hidden=32",
        "model.proj_dim=16",
        "model.pred_hidden=16",
        "model.queue_size=64",
        f"data.image_size={size}",
        f"data.batch_size={n}",
        "train.compile=off",  # compiled below, with the backend that leaves the graphs out
        "train.precision=bf16",
        f"train.nan_policy={nan_policy}",
    ]
    return load_config(recipe_path(recipe), overrides)


def count_step(method: str, mode: str, n: int = 4, size: int = 16, nan_policy: str = "stop") -> dict:
    """Launches and views' bytes of one steady-state training step (see the module docstring)."""
    from bsim_fast import step as step_module
    from bsim_fast.methods import compile_networks
    from bsim_fast.optim import build_optimizer

    cfg = _config(method, mode, n, size, nan_policy)
    torch.manual_seed(0)
    torch._dynamo.reset()
    step = step_module.TrainStep(cfg, "cpu", 100, log=None)
    step.precision = _CudaPathPrecision()
    step.optimizer = build_optimizer(step.method, cfg, torch.device("cuda"))
    for group in step.optimizer.param_groups:  # what a multi-tensor option left to the device resolves to on CUDA
        if "foreach" in group and group["foreach"] is None and not group.get("fused"):
            group["foreach"] = True
    readers = set()
    views_rows = (2 if mode == "sim" else 4) * n
    compile_networks(step.method, backend=_uncounted_backend((views_rows, 3, size, size), readers))
    _leave_compiled_out(step.method)
    g = torch.Generator().manual_seed(0)
    a_u8, b_u8 = (torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g) for _ in range(2))
    copies, views, kept, phase, view_bytes = [], set(), [], [""], [0]
    real_make_views = step_module.make_views

    def make_views(*args, **kwargs):
        phase[0] = "views"
        try:
            made = real_make_views(*args, **kwargs)
        finally:
            phase[0] = ""
        kept.append(made)  # alive until the count ends, so no later tensor reuses (and is taken for) their memory
        views.update(storage_key(t) for t in made.values() if isinstance(t, torch.Tensor) and t.dim() == 4)
        return made

    def on_launch(name, nbytes, inputs, out):
        if phase[0] == "views" or (inputs and inputs & views):
            view_bytes[0] += nbytes

    step_module.make_views = make_views
    try:
        with _host_work_uncounted(copies):
            for _ in range(2):
                step(a_u8, b_u8)
            copies.clear()
            view_bytes[0] = 0
            counts = count_launches(lambda: step(a_u8, b_u8), on_launch=on_launch)
    finally:
        step_module.make_views = real_make_views
    e = n * size * size * 3
    return dict(
        method=method,
        mode=mode,
        n=n,
        size=size,
        nan_policy=nan_policy,
        launches=counts["launches"] + len(copies),
        h2d_copies=len(copies),
        triton=counts["triton"],
        aten=counts["aten"],
        view_bytes_e=view_bytes[0] / e,
        view_readers=sorted(readers),
        bytes_exact=counts["bytes_exact"],
        budget=dict(BUDGETS),
    )


def table(rows: list[dict]) -> str:
    lines = [f"{'method':<8}{'mode':<7}{'nan_policy':<12}{'launches':>9}{'views (E)':>11}  aten ops outside the graphs"]
    for r in rows:
        names: dict[str, int] = {}
        for name in r["aten"]:
            names[name] = names.get(name, 0) + 1
        ops = ", ".join(f"{k}×{v}" if v > 1 else k for k, v in names.items())
        lines.append(
            f"{r['method']:<8}{r['mode']:<7}{r['nan_policy']:<12}{r['launches']:>9}{r['view_bytes_e']:>11.2f}  {ops}"
        )
    return "\n".join(lines)


def _main(argv=None) -> int:
    parser = cli.ArgumentParser(description="Launches and views' bytes of one training step outside the networks.")
    parser.add_argument(
        "--methods", nargs="+", default=["byol", "simclr"], choices=["byol", "simclr", "moco", "simsiam"]
    )
    parser.add_argument("--modes", nargs="+", default=["sim", "bsim", "wbsim"], choices=["sim", "bsim", "wbsim"])
    parser.add_argument("--nan-policy", nargs="+", default=["stop"], choices=["stop", "skip"])
    parser.add_argument("--size", type=int, default=16, help="view side (counts do not depend on it)")
    parser.add_argument("--n", type=int, default=4, help="images per batch (counts do not depend on it)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [
        count_step(method, mode, args.n, args.size, policy)
        for method in args.methods
        for mode in args.modes
        for policy in args.nan_policy
    ]
    for r in rows:
        print("ROW " + json.dumps(r), flush=True)
    if args.json:
        from bsim_fast.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps({"rows": rows}, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
