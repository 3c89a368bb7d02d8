"""What a piece of code asks of the device, counted without one: launches and bytes.

A TorchDispatchMode sees every aten op (allocations and views launch nothing, every other op counts as a
launch), a hook on Triton's launcher counts kernel launches, and under the interpreter (TRITON_INTERPRET=1)
every load and store of a kernel is recorded, so ``bytes`` is the number of device bytes each launch reads
plus writes (``unique_bytes``: each distinct byte once per launch, what DRAM must move at best; a re-read that
hits L2, such as the blur's halo, counts once).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_launches", "interpreting", "uncounted"]

_UNCOUNTED = [0]  # > 0 inside `uncounted()`


@contextlib.contextmanager
def uncounted():
    """What runs inside is left out of the count: host work, or a compiled graph that a count excludes."""
    _UNCOUNTED[0] += 1
    try:
        yield
    finally:
        _UNCOUNTED[0] -= 1


# aten ops that allocate or re-view memory: no kernel launch, no traffic
_NO_KERNEL = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "view",
    "_unsafe_view",
    "as_strided",
    "alias",
    "detach",
    "t",
    "permute",
    "select",
    "slice",
    "unsqueeze",
    "squeeze",
    "expand",
    "reshape",
    "unbind",
    "split",
    "lift_fresh",
    "set_",
    "is_pinned",
    "view_as",
    "resolve_conj",
    "resolve_neg",
    "_reshape_alias",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "dim",
    "is_same_size",
    # a Python number as a 0-dim host tensor, an argument of the next kernel (torch.where(c, x, 1.0))
    "scalar_tensor",
    # the profiler's markers around optimizer.step and zero_grad: host bookkeeping
    "_record_function_enter_new",
    "_record_function_exit",
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# ---- counting --------------------------------------------------------------------------------------------


def storage_key(t: torch.Tensor) -> tuple:
    """Which memory a tensor lives in (its storage), so views of one buffer share a key."""
    return (t.device, t.untyped_storage().data_ptr())


class _AtenOps(TorchDispatchMode):
    def __init__(self, paused: Callable[[], bool], on_launch: Callable | None = None):
        super().__init__()
        self.paused = paused
        self.on_launch = on_launch
        self.ops: list[tuple] = []

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # torch.compile'd code runs (and is counted, unless `uncounted`) instead of falling back to eager
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.paused() and not _UNCOUNTED[0] and name not in _NO_KERNEL:
            storages, inputs = {}, set()
            for t in torch.utils._pytree.tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    storages[storage_key(t)] = t.numel() * t.element_size()
                    inputs.add(storage_key(t))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    storages[storage_key(t)] = t.numel() * t.element_size()
            self.ops.append((name, sum(storages.values())))
            if self.on_launch:
                self.on_launch(name, sum(storages.values()), inputs, out)
        return out


class _KernelTraffic:
    """Patches Triton's launchers (and, under the interpreter, its loads and stores) while active."""

    def __init__(self, on_launch: Callable | None = None):
        self.launches: list[dict] = []
        self.inside = False
        self.on_launch = on_launch

    def _unique_bytes(self, chunks) -> int:
        if not chunks:
            return 0
        return int(
            np.unique(np.concatenate([(a[:, None] + np.arange(es, dtype=np.uint64)).ravel() for a, es in chunks])).size
        )

    @contextlib.contextmanager
    def active(self):
        from triton.runtime import interpreter, jit

        saved = []
        record = {"reads": [], "writes": []}

        def patch(owner, name, wrapper):
            saved.append((owner, name, owner.__dict__.get(name, None), name in owner.__dict__))
            setattr(owner, name, wrapper)

        def counted(original):
            def run(fn_self, *args, **kwargs):
                if kwargs.get("warmup") or _UNCOUNTED[0]:
                    return original(fn_self, *args, **kwargs)
                record["reads"], record["writes"] = [], []
                self.inside = True
                try:
                    return original(fn_self, *args, **kwargs)
                finally:
                    self.inside = False
                    accessed = sum(a.size * es for a, es in record["reads"] + record["writes"])
                    self.launches.append(
                        dict(
                            name=getattr(fn_self, "__name__", "?"),
                            bytes=accessed,
                            unique_bytes=self._unique_bytes(record["reads"]) + self._unique_bytes(record["writes"]),
                        )
                    )
                    if self.on_launch:
                        self.on_launch(self.launches[-1]["name"], accessed, None, None)

            return run

        patch(jit.JITFunction, "run", counted(jit.JITFunction.run))
        patch(interpreter.InterpretedFunction, "run", counted(interpreter.InterpretedFunction.run))
        builder = interpreter.interpreter_builder
        load, store = builder.create_masked_load, builder.create_masked_store

        def element_size(ptrs) -> int:
            return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)

        def masked_load(ptrs, mask, *rest):
            addrs = np.asarray(ptrs.data).ravel()[np.asarray(mask.data, dtype=bool).ravel()]
            record["reads"].append((addrs.astype(np.uint64), element_size(ptrs)))
            return load(ptrs, mask, *rest)

        def masked_store(ptrs, value, mask, *rest):
            addrs = np.asarray(ptrs.data).ravel()[np.asarray(mask.data, dtype=bool).ravel()]
            record["writes"].append((addrs.astype(np.uint64), element_size(ptrs)))
            return store(ptrs, value, mask, *rest)

        builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
        try:
            yield self
        finally:
            builder.create_masked_load, builder.create_masked_store = load, store
            for owner, name, value, had in reversed(saved):
                if had:
                    setattr(owner, name, value)
                else:
                    delattr(owner, name)


def count_launches(fn: Callable[[], object], on_launch: Callable | None = None) -> dict[str, object]:
    """Run ``fn`` once and count what it asks of the device: ``launches`` (Triton kernels + aten ops that
    launch a kernel) and their names; under the interpreter also ``bytes``, every byte the kernels load and
    store (what DRAM moves if no re-read hits a cache: an upper bound), and ``unique_bytes``, each distinct
    byte once per launch (a lower bound). Aten ops count the bytes of the tensors they touch in both.
    Work inside `uncounted()` is left out. ``on_launch(name, bytes, input_storages, output)`` sees each counted
    launch as it happens (a Triton kernel's storages and output are None)."""
    traffic = _KernelTraffic(on_launch)
    aten = _AtenOps(lambda: traffic.inside, on_launch)
    with traffic.active(), aten:
        fn()
    aten_bytes = sum(b for _, b in aten.ops)
    return dict(
        launches=len(traffic.launches) + len(aten.ops),
        triton=[k["name"] for k in traffic.launches],
        aten=[name for name, _ in aten.ops],
        bytes=sum(k["bytes"] for k in traffic.launches) + aten_bytes,
        unique_bytes=sum(k["unique_bytes"] for k in traffic.launches) + aten_bytes,
        bytes_exact=interpreting(),
        per_launch=traffic.launches,
    )
