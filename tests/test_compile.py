"""torch.compile of a method: each network compiles once per mode, whole, and never again.

The counter test runs on the CPU with the "aot_eager" backend: graph breaks and recompiles are decided by
dynamo's tracing and guards, which every backend shares, and "aot_eager" also traces the backward (AOT
autograd) as inductor would, without inductor's C++ code generation, which takes minutes on a CI CPU.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from bsim_fast import mix
from bsim_fast.config import MODES, load_config
from bsim_fast.methods import build_method, compile_networks
from bsim_fast.optim import build_optimizer

N, SIZE = 4, 32
BACKEND = "aot_eager"


def views(seed):
    g = torch.Generator().manual_seed(seed)
    a_u8, b_u8 = (torch.randint(0, 256, (N, SIZE, SIZE, 3), dtype=torch.uint8, generator=g) for _ in range(2))
    partner = mix.derangement(N, generator=g)
    (boxes_a, lam_a), (boxes_b, lam_b) = (mix.sample_boxes(N, SIZE, SIZE, 1.0, generator=g) for _ in range(2))
    mean, std = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)
    plain_a, mixed_a = mix.cutmix_normalize(a_u8, partner, boxes_a, mean, std, torch.float32)
    plain_b, mixed_b = mix.cutmix_normalize(b_u8, partner, boxes_b, mean, std, torch.float32)
    return dict(
        plain_a=plain_a, plain_b=plain_b, mixed_a=mixed_a, mixed_b=mixed_b, partner=partner, lam_a=lam_a, lam_b=lam_b
    )


@pytest.mark.parametrize("mode", MODES)
def test_compiled_byol_step_has_no_graph_breaks_and_no_recompiles(mode):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    cfg = load_config(
        "configs/small/byol.yaml",
        [f"method.mode={mode}", "model.proj_hidden=64", "model.proj_dim=32", "model.pred_hidden=64"],
    )
    method = build_method(cfg).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(method, cfg, torch.device("cpu"))
    compile_networks(method, backend=BACKEND)

    def step(seed):
        batch = views(seed)
        if mode == "sim":
            batch = {k: batch[k] for k in ("plain_a", "plain_b")}
        optimizer.zero_grad(set_to_none=True)
        loss = method(**batch)["loss"]
        loss.backward()
        optimizer.step()
        method.momentum_update(0.5)
        return loss.item()

    step(0)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 2  # the online network and the target network
    with torch._dynamo.config.patch(error_on_recompile=True):
        losses = [step(seed) for seed in (1, 2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 2
