"""The Triton kernels compiled for sm_90 (Hopper) without a GPU: PTX instruction counts, access widths, and the
registers and spills that ptxas allocates.

`ptx_report()` compiles each kernel with `triton.compile` for `GPUTarget("cuda", 90, 32)`, with the launch
arguments of the recipes' batches (224² and 32²; the blur also at 512²) in the loaders' layout, and assembles
the PTX with the ptxas that Triton bundles (`ptxas -v`: registers and spill bytes, no GPU needed).
`compile_ptx` needs the kernels decorated without the interpreter (TRITON_INTERPRET unset).

Instructions per output pixel (`path_instructions`): the PTX instructions one thread executes on the path of a
sample that takes every branch (jitters, turns grey, solarizes), times the threads of a program, divided by the
output pixels a program writes. Loops are found in the control-flow graph (an edge back to a block that
dominates its source): a loop's blocks that run on every iteration count once per iteration, its conditional
blocks as many times as the caller says (the blur's row loop: every iteration, an upper bound; the jitter's
loop over four slots: once, as each op runs in one slot). A kernel without loops counts each instruction once.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import networkx as nx
import torch

__all__ = ["compile_ptx", "ptx_report", "ptx_stats", "ptxas_usage", "ptxas_path", "path_instructions"]

SIDES = (224, 32)  # the recipes' resolutions (configs/_base: imagenet, cifar)
BLUR_SIDES = (512,)  # the largest blur the budgets cover (51 taps)
_LABEL = re.compile(r"^(\$L__\w+):")
_BRANCH = re.compile(r"^(@!?%p\d+\s+)?(?:bra(?:\.uni)?\s+(\$L__\w+)|ret|exit);")


def _type_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return (
            "*"
            + {
                torch.uint8: "u8",
                torch.bfloat16: "bf16",
                torch.float16: "fp16",
                torch.float32: "fp32",
                torch.int32: "i32",
                torch.int64: "i64",
            }[value.dtype]
        )
    return "fp32" if isinstance(value, float) else "i32"


def compile_ptx(kernel, args: dict, constexprs: dict, num_warps: int, arch: int = 90, num_stages: int = 3) -> str:
    """PTX of ``kernel`` for sm_<arch> with Triton's usual specialisation of these example ``args`` (pointers
    and integers divisible by 16 are declared so, integers equal to 1 become constants)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError(
            "compile_ptx: the kernels were decorated under TRITON_INTERPRET=1; compile in a process without it"
        )
    fn = kernel
    signature, consts, attrs = {}, dict(constexprs), {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, int) and not isinstance(value, bool) and value == 1:
            signature[name], consts[name] = "constexpr", 1
            continue
        signature[name] = _type_of(value)
        aligned = (
            value.data_ptr() % 16 == 0
            if isinstance(value, torch.Tensor)
            else (isinstance(value, int) and value % 16 == 0)
        )
        if aligned and not isinstance(value, float):
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]


def ptxas_path() -> Path | None:
    """The ptxas that Triton runs (its bundled one, or TRITON_PTXAS_PATH), or None when there is none."""
    import triton

    try:
        path = Path(triton.knobs.nvidia.ptxas.path)
    except (AttributeError, RuntimeError):  # no knobs in this Triton: its bundled binary
        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.is_file() else None


def ptxas_usage(ptx: str) -> dict:
    """Registers per thread and spill bytes of the PTX's kernel, from ``ptxas -v`` for the PTX's own target
    (``sm_90a``, as Triton writes it). RuntimeError when ptxas is missing or fails."""
    ptxas = ptxas_path()
    if ptxas is None:
        raise RuntimeError("ptxas not found (Triton's bundled one, or TRITON_PTXAS_PATH)")
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [str(ptxas), "-v", f"--gpu-name={target}", str(src), "-o", str(Path(tmp) / "kernel.cubin")]
        run = subprocess.run(cmd, capture_output=True, text=True)
    log = run.stdout + run.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if run.returncode != 0 or regs is None or spills is None:
        raise RuntimeError(f"ptxas failed (rc={run.returncode}): {log.strip()[-500:]}")
    return dict(registers=int(regs.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)))


def _usage(ptx: str) -> dict:
    """`ptxas_usage`, or None for each number without ptxas."""
    return ptxas_usage(ptx) if ptxas_path() else dict(registers=None, spill_stores=None, spill_loads=None)


def _body(ptx: str) -> list[str]:
    """The lines of the kernel's body: from its entry's opening brace to the closing one."""
    lines = ptx[ptx.index(".visible .entry") :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "{")
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("}"))
    return [line.strip() for line in lines[start + 1 : end]]


def _instruction(line: str) -> str | None:
    if not line or line.startswith(("//", ".", "{", "}", ")", "(")) or _LABEL.match(line):
        return None
    return line


def ptx_stats(ptx: str) -> dict:
    """Instruction count of the kernel body and the global-memory access widths (bytes per thread)."""
    ops = [re.sub(r"^@!?%p\d+\s+", "", i).split()[0].rstrip(";") for i in map(_instruction, _body(ptx)) if i]
    widths = Counter()
    for op in ops:
        m = re.match(r"(ld|st)\.global(?:\.[a-z:]+)*?(?:\.v(\d))?\.[bfsu](\d+)$", op)
        if m:
            widths[f"{m.group(1)}{int(m.group(2) or 1) * int(m.group(3)) // 8}B"] += 1
        elif op.startswith("cp.async") and ".global" in op:  # a load that pipelining routes through shared memory
            widths["cp.async"] += 1
    return dict(
        instructions=len(ops),
        global_access_bytes=dict(sorted(widths.items())),
        mma=sum(op.startswith(("mma", "wgmma")) for op in ops),
        cvt_rn_bf16=any(op.startswith("cvt.rn.bf16") for op in ops),
    )


def _control_flow(ptx: str) -> tuple[nx.DiGraph, dict[int, int]]:
    """Basic blocks (numbered in program order, 0 the entry) as a graph, and each block's instruction count.
    A block starts at a label, or after a branch, a return or an exit; a predicated one may fall through."""
    graph, sizes, labels, jumps = nx.DiGraph(), {}, {}, []
    block, falls = None, False
    for line in _body(ptx):
        label = _LABEL.match(line)
        ins = _instruction(line)
        if block is None or (label and sizes[block]):
            if block is not None and falls:
                graph.add_edge(block, len(sizes))
            block, falls = len(sizes), True
            sizes[block] = 0
            graph.add_node(block)
        if label:
            labels[label.group(1)] = block
        if ins is None:
            continue
        sizes[block] += 1
        branch = _BRANCH.match(ins)
        if branch:
            if branch.group(2):
                jumps.append((block, branch.group(2)))
            if not branch.group(1):  # unconditional: no fall-through
                falls = False
            if falls:
                graph.add_edge(block, block + 1)
            block = None
    graph.add_edges_from((source, labels[target]) for source, target in jumps)
    graph.remove_nodes_from([b for b in list(graph) if b >= len(sizes)])  # a fall-through past the end
    return graph, sizes


def path_instructions(ptx: str, loops: list[tuple[int, int]]) -> float:
    """Instructions one thread executes on the path that takes every branch, with ``loops[d]`` = (runs of the
    blocks that run on every iteration, runs of the conditional ones) for the loops at nesting depth d + 1.
    ValueError when the PTX's loops nest deeper than ``loops`` says."""
    graph, sizes = _control_flow(ptx)
    graph = graph.subgraph(nx.descendants(graph, 0) | {0})
    idom = nx.immediate_dominators(graph, 0)

    def dominators(block):
        chain = {block}
        while block != 0:
            block = idom[block]
            chain.add(block)
        return chain

    found = {}  # loop header -> (body, latches)
    for source, header in graph.edges:
        if header in dominators(source):  # a back edge: its loop is what reaches the source without the header
            body = {header} if source == header else nx.ancestors(graph.subgraph(set(graph) - {header}), source)
            body |= {source, header}
            old_body, old_latches = found.get(header, (set(), set()))
            found[header] = (old_body | body, old_latches | {source})
    weight = dict.fromkeys(graph, 1.0)
    for header, (body, latches) in found.items():
        depth = sum(header in other for other, _ in found.values())
        if depth > len(loops):
            raise ValueError(f"a loop at depth {depth}, runs given for {len(loops)}")
        every, conditional = loops[depth - 1]
        for block in body:
            weight[block] *= every if all(block in dominators(latch) for latch in latches) else conditional
    return sum(weight[block] * sizes[block] for block in graph)


def _photometric_rows(side: int, layout: str, kernels: tuple[str, ...]) -> list[dict]:
    """The photometric kernels of a batch of 4 views at side², with every op of the BYOL policies on."""
    from dataclasses import replace

    from bsim_fast.augment import blur_kernel_size, policy_for
    from bsim_fast.config import Config
    from bsim_fast.kernels import photometric as ph

    # BYOL's first view with the second one's solarize and half the samples blurring: every op and kernel runs
    policy = replace(policy_for(Config())[0], blur_p=0.5, solarize_p=0.2)
    n = 4
    if layout == "channel-last":  # a view of the loaders' [N, 2, H, W, 3] batch
        views = torch.zeros((n, 2, side, side, 3), dtype=torch.uint8)[:, 0]
    else:  # the GPU-resident loader's permuted NCHW
        views = torch.zeros((n, 3, side, side), dtype=torch.uint8).permute(0, 2, 3, 1)
    out = torch.empty((n, side, side, 3), dtype=torch.uint8)
    partial = torch.zeros((n, -(-side * side // ph.BLOCK_PIXELS)))
    u = torch.zeros((n, ph.U_COLUMNS))
    rows = []
    for name, kernel, grid, args, constexprs, options in ph.launch_plan(
        views, u, out, partial, policy, blur_kernel_size(side)
    ):
        if name not in kernels:
            continue
        ptx = compile_ptx(kernel, args, constexprs, **options)
        threads = 32 * options["num_warps"]
        if name == "photometric_blur":  # a program: one strip of an image, RB rows per iteration
            blocks = -(-side // constexprs["RB"]) + constexprs["WINDOW"] - 1
            per_pixel = path_instructions(ptx, [(blocks, blocks), (4, 1)]) * threads * grid[0] / (n * side * side)
        else:  # a program: BLOCK_PIXELS pixels; the contrast pass runs at most 3 slots
            slots = 3 if name == "photometric_contrast_mean" else 4
            per_pixel = path_instructions(ptx, [(slots, 1)]) * threads / ph.BLOCK_PIXELS
        geometry = {k: constexprs[k] for k in ("CW", "CO_EDGE", "CO", "RB", "WINDOW") if k in constexprs}
        usage = _usage(ptx)
        rows.append(
            dict(
                name=name,
                side=side,
                layout=layout,
                warps=options["num_warps"],
                **geometry,
                **ptx_stats(ptx),
                **usage,
                instructions_per_output_pixel=round(per_pixel, 1),
            )
        )
    return rows


def ptx_report(height: int = 224, width: int = 224, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Per kernel and configuration: PTX instructions (static; per input element for the CutMix kernel, per
    output pixel on a sample's path for the photometric ones), global access widths, mma count, and ptxas's
    registers and spill bytes for sm_90 (None without ptxas)."""
    from bsim_fast.kernels import cutmix

    n = 4
    x = torch.zeros((n, height, width, 3), dtype=torch.uint8)
    out = torch.empty((n, 3, height, width), dtype=dtype)
    vec = cutmix.vec_for(dtype)
    hw3 = height * width * 3
    tiles = -(-hw3 // cutmix.BLOCK)
    rows = []
    args = dict(
        x_ptr=x,
        plain_ptr=out,
        mixed_ptr=out,
        boxes_ptr=torch.zeros((n, 4), dtype=torch.int32),
        partner_ptr=torch.zeros(n, dtype=torch.int64),
        m0=0.5,
        m1=0.5,
        m2=0.5,
        s0=0.5,
        s1=0.5,
        s2=0.5,
        HW3=hw3,
        tiles_per_image=tiles,
    )
    for mix in (True, False):
        ptx = compile_ptx(
            cutmix._cutmix_normalize_kernel,
            args,
            dict(W3=width * 3, HAS_MIX=mix, INT_RNE=False, CHUNKS=cutmix.BLOCK // vec, VEC=vec),
            cutmix.NUM_WARPS,
        )
        stats = ptx_stats(ptx)
        per_thread = cutmix.BLOCK / (32 * cutmix.NUM_WARPS)
        usage = _usage(ptx)
        rows.append(
            dict(
                name="cutmix_normalize" if mix else "cutmix_normalize_sim",
                side=width,
                **stats,
                **usage,
                instructions_per_element=stats["instructions"] / per_thread,
            )
        )
    every = ("photometric_contrast_mean", "photometric_pointwise", "photometric_blur")
    for side in SIDES:
        rows += _photometric_rows(side, "channel-last", every)
    rows += _photometric_rows(32, "planar", every)  # the GPU-resident loader's views (CIFAR scale)
    for side in BLUR_SIDES:
        rows += _photometric_rows(side, "channel-last", ("photometric_blur",))
    return rows
