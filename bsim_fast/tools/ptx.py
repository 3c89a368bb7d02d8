"""The Triton kernels compiled for sm_90 (Hopper) without a GPU: PTX instruction counts and access widths.

`ptx_report()` compiles each kernel with `triton.compile` for `GPUTarget("cuda", 90, 32)` with the shapes of a
224² batch; `compile_ptx` needs the kernels decorated without the interpreter (TRITON_INTERPRET unset).
"""

from __future__ import annotations

import re
from collections import Counter

import torch

__all__ = ["compile_ptx", "ptx_report", "ptx_stats"]


# the scalars of an example policy (BYOL's jitter ranges, blur and solarize for part of the samples): the PTX is
# compiled for their types, which every policy shares
POLICY_FLOATS = dict(
    jitter_p=0.8,
    b_lo=0.6,
    b_span=0.8,
    c_lo=0.6,
    c_span=0.8,
    s_lo=0.8,
    s_span=0.4,
    hue=0.1,
    gray_p=0.2,
    blur_p=0.5,
    solarize_p=0.2,
    sigma_lo=0.1,
    sigma_span=1.9,
)


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


def compile_ptx(kernel, args: dict, constexprs: dict, num_warps: int, arch: int = 90) -> str:
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
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}).asm["ptx"]


def ptx_stats(ptx: str) -> dict:
    """Instruction count of the kernel body and the global-memory access widths (bytes per thread)."""
    body = ptx[ptx.index(".visible .entry") :]
    ops = []
    for line in body.splitlines():
        line = re.sub(r"^@!?%p\d+\s+", "", line.strip())
        if not line or line.startswith(("//", ".", "$", "{", "}", ")", "(")) or line.endswith(":"):
            continue
        ops.append(line.split()[0].rstrip(";"))
    widths = Counter()
    for op in ops:
        m = re.match(r"(ld|st)\.global(?:\.[a-z:]+)*?(?:\.v(\d))?\.[bfsu](\d+)$", op)
        if m:
            widths[f"{m.group(1)}{int(m.group(2) or 1) * int(m.group(3)) // 8}B"] += 1
    return dict(
        instructions=len(ops),
        global_access_bytes=dict(sorted(widths.items())),
        mma=sum(op.startswith(("mma", "wgmma")) for op in ops),
        cvt_rn_bf16=any(op.startswith("cvt.rn.bf16") for op in ops),
    )


def ptx_report(height: int = 224, width: int = 224, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Per kernel: PTX instructions (static), per input byte for the CutMix kernel, access widths, mma count."""
    n = 4
    x = torch.zeros((n, height, width, 3), dtype=torch.uint8)
    return _cutmix_rows(x, dtype) + _photometric_rows(x)


def _cutmix_rows(x: torch.Tensor, dtype: torch.dtype) -> list[dict]:
    from bsim_fast.kernels import cutmix

    n, height, width, _ = x.shape
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
        rows.append(
            dict(
                name="cutmix_normalize" if mix else "cutmix_normalize_sim",
                **stats,
                instructions_per_element=stats["instructions"] / per_thread,
            )
        )
    return rows


def _photometric_rows(x: torch.Tensor) -> list[dict]:
    from bsim_fast.kernels import photometric as ph

    n, height, width, _ = x.shape
    rows = []
    u = torch.zeros((n, 13))
    hw = height * width
    ptiles = -(-hw // ph.BLOCK_PIXELS)
    strides = dict(sN=hw * 6, sH=width * 3, sW=3, sC=1)  # a view of the loader's [N, 2, H, W, 3]
    flags = dict(HAS_B=True, HAS_C=True, HAS_S=True, HAS_H=True)
    k = 2 * (int(0.1 * min(height, width)) // 2) + 1
    t = ph.blur_tile(k, max(height, width))
    kernels = [
        (
            "photometric_contrast_mean",
            ph._contrast_mean_kernel,
            ph.NUM_WARPS,
            dict(W=width, BLOCK=ph.BLOCK_PIXELS, HAS_B=True, HAS_S=True, HAS_H=True),
        ),
        (
            "photometric_pointwise",
            ph._pointwise_kernel,
            ph.NUM_WARPS,
            dict(
                W=width,
                BLOCK=ph.BLOCK_PIXELS,
                TILES_P2=1 << (ptiles - 1).bit_length(),
                HAS_GRAY=True,
                HAS_BLUR=True,
                HAS_SOLARIZE=True,
                **flags,
            ),
        ),
        (
            "photometric_blur",
            ph._blur_kernel,
            ph.BLUR_WARPS[t],
            dict(
                H=height,
                W=width,
                KSIZE=k,
                KSIZE_P2=1 << (k - 1).bit_length(),
                T=t,
                TILES_P2=1 << (ptiles - 1).bit_length(),
                HAS_GRAY=True,
                HAS_SOLARIZE=True,
                **flags,
            ),
        ),
    ]
    common = dict(
        x_ptr=x,
        u_ptr=u,
        partial_ptr=torch.zeros((n, ptiles)),
        out_ptr=x,
        HW=hw,
        TILES=ptiles,
        TILES_X=6,
        BLUR_TILES=36,
        **strides,
        **POLICY_FLOATS,
    )
    for name, kernel, warps, consts in kernels:
        stats = ptx_stats(compile_ptx(kernel, common, consts, warps))
        rows.append(dict(name=name, **stats))
    return rows
