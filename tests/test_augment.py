"""augment.py against per-image torchvision references (CPU tensors)."""

from dataclasses import replace

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from bsim_fast import augment
from bsim_fast.augment import photometric, policy_for
from bsim_fast.config import Config
from bsim_fast.kernels import photometric as U  # the columns of the per-sample uniforms, U_*


def view_policy(**changes):
    """View 1 of the default recipe (BYOL's t'), with `changes`."""
    return replace(policy_for(Config())[0], **changes)


N, H, W = 6, 20, 24


@pytest.fixture(scope="module")
def batch_u8():
    g = torch.Generator().manual_seed(0)
    # smooth-ish images with saturated and gray regions, so hue and solarize see every case
    x = torch.randint(0, 256, (N, H, W, 3), generator=g, dtype=torch.uint8)
    x[:, :4] = 128
    x[:, 4:6, :, 0] = 255
    return x


def as_float(x_u8):  # [N,H,W,3] uint8 -> [N,3,H,W] float 0..255
    return x_u8.permute(0, 3, 1, 2).float()


def reference(fn, x_u8, params):
    """Apply a torchvision float op image by image on 0..1, back to 0..255."""
    x = as_float(x_u8) / 255.0
    return torch.stack([fn(img, float(p)) for img, p in zip(x, params)]) * 255.0


def test_policy_for_reads_cfg_aug():
    cfg = Config()
    t1, t2 = policy_for(cfg)
    assert (t1.blur_p, t1.solarize_p, t2.blur_p, t2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    cfg.aug.blur_p, cfg.aug.solarize_p = (0.5, 0.5), (0.0, 0.0)
    t1, t2 = policy_for(cfg)
    assert t1 == t2 and t1.blur_p == 0.5 and t1.jitter_p == cfg.aug.jitter_p


@pytest.mark.parametrize(
    "ours, theirs, lo, hi",
    [
        (augment.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
        (augment.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
        (augment.adjust_saturation, TF.adjust_saturation, 0.0, 1.8),
        (augment.adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
)
def test_jitter_ops_match_torchvision(batch_u8, ours, theirs, lo, hi):
    params = torch.linspace(lo, hi, N)
    out = ours(as_float(batch_u8), params)
    torch.testing.assert_close(out, reference(theirs, batch_u8, params), atol=1e-3, rtol=1e-4)


def test_grayscale_matches_torchvision(batch_u8):
    ref = TF.rgb_to_grayscale(as_float(batch_u8) / 255.0, num_output_channels=1) * 255.0
    torch.testing.assert_close(augment.grayscale(as_float(batch_u8)), ref, atol=1e-3, rtol=1e-4)


def test_blur_matches_torchvision_per_sample_sigma(batch_u8):
    sigma = torch.linspace(0.1, 2.0, N)
    k = augment.blur_kernel_size(W)
    assert k % 2 == 1 and k == 3
    out = augment.gaussian_blur(as_float(batch_u8), sigma, 5)
    ref = reference(lambda img, s: TF.gaussian_blur(img, [5, 5], [s, s]), batch_u8, sigma)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-4)
    # apply=False is an exact identity
    keep = augment.gaussian_blur(as_float(batch_u8), sigma, 5, apply=torch.zeros(N, dtype=torch.bool))
    assert torch.equal(keep, as_float(batch_u8))


def test_blur_kernel_size_is_ten_percent_odd():
    assert [augment.blur_kernel_size(s) for s in (32, 96, 224)] == [3, 9, 23]


def test_solarize_matches_torchvision_uint8(batch_u8):
    apply = torch.tensor([True, False] * (N // 2))
    out = augment.solarize(as_float(batch_u8), apply)
    ref = torch.stack([TF.solarize(img, 128) if a else img for img, a in zip(batch_u8.permute(0, 3, 1, 2), apply)])
    assert torch.equal(out.to(torch.uint8), ref)


def reference_photometric(x_u8, policy, seed):
    """The whole view transform image by image with torchvision, replaying photometric's draws."""
    u = torch.rand(x_u8.shape[0], U.U_COLUMNS, generator=torch.Generator().manual_seed(seed))
    outs = []
    for img, row in zip(as_float(x_u8) / 255.0, u):
        r = row.unbind()  # the columns as 0-d tensors

        def factor(col, s, r=r):
            lo = max(0.0, 1.0 - s)
            return float(lo + (1.0 + s - lo) * r[col])

        if r[U.U_JITTER] < policy.jitter_p:
            ops = [
                lambda t: TF.adjust_brightness(t, factor(U.U_BRIGHTNESS, policy.brightness)),
                lambda t: TF.adjust_contrast(t, factor(U.U_CONTRAST, policy.contrast)),
                lambda t: TF.adjust_saturation(t, factor(U.U_SATURATION, policy.saturation)),
                lambda t, r=r: TF.adjust_hue(t, float((r[U.U_HUE] * 2 - 1) * policy.hue)),
            ]
            for op in torch.stack(r[U.U_ORDER : U.U_ORDER + 4]).argsort():
                img = ops[int(op)](img)
        if r[U.U_GRAY] < policy.gray_p:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if r[U.U_BLUR] < policy.blur_p:
            s = float(policy.blur_sigma[0] + (policy.blur_sigma[1] - policy.blur_sigma[0]) * r[U.U_SIGMA])
            k = augment.blur_kernel_size(min(img.shape[-2:]))
            img = TF.gaussian_blur(img, [k, k], [s, s])
        if r[U.U_SOLARIZE] < policy.solarize_p:
            img = torch.where(img * 255.0 >= 127.5, 1.0 - img, img)
        outs.append(img)
    return (torch.stack(outs) * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


@pytest.mark.parametrize(
    "policy",
    [
        view_policy(jitter_p=1.0, gray_p=0.3, blur_p=0.5, solarize_p=0.5),
        view_policy(
            jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, gray_p=0.2, blur_p=1.0, solarize_p=0.0
        ),
    ],
)
def test_photometric_matches_per_image_reference(policy):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (32, 40, 40, 3), generator=g, dtype=torch.uint8)
    out = photometric(x, policy, torch.Generator().manual_seed(7))
    ref = reference_photometric(x, policy, 7)
    assert out.dtype == torch.uint8 and out.shape == x.shape and out.is_contiguous()
    diff = (out.int() - ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # float-rounding ties only


def test_photometric_identity_deterministic_and_varied(batch_u8):
    off = view_policy(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    assert torch.equal(photometric(batch_u8, off, torch.Generator().manual_seed(0)), batch_u8)
    on = view_policy()
    a = photometric(batch_u8, on, torch.Generator().manual_seed(3))
    b = photometric(batch_u8, on, torch.Generator().manual_seed(3))
    c = photometric(batch_u8, on, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a strided input (a view of [N,2,H,W,3], as the loaders pass) is accepted
    pair = torch.stack([batch_u8, batch_u8], dim=1)
    assert torch.equal(photometric(pair[:, 1], on, torch.Generator().manual_seed(3)), a)


def test_photometric_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        photometric(torch.zeros(2, 8, 8, 3), view_policy(), torch.Generator())


def test_accelerator_path_matches_cpu_path(monkeypatch):
    """The GPU code path (whole batch + select, no host sync) equals the CPU one (per-op subsets)."""
    x = torch.randint(0, 256, (16, 24, 24, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    policy = view_policy(jitter_p=0.9, gray_p=0.2, blur_p=0.5, solarize_p=0.3)
    cpu = photometric(x, policy, torch.Generator().manual_seed(5))
    monkeypatch.setattr(augment, "_gather_subsets", lambda device: False)
    dense = photometric(x, policy, torch.Generator().manual_seed(5))
    assert (cpu.int() - dense.int()).abs().max() <= 1
