"""torch.compile of a method: its networks and its loss compile once per mode, as one graph, and never again.

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
CASES = [("byol", mode) for mode in MODES] + [("simclr", mode) for mode in MODES]
CASES += [("moco", "wbsim"), ("simsiam", "bsim")]  # MoCo's queue, SimSiam's no-gradient target forward


@pytest.mark.parametrize("name,mode", CASES)
def test_compiled_step_is_one_graph_without_breaks_or_recompiles(name, mode):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    cfg = load_config(
        f"configs/small/{name}{'' if mode == 'sim' else '_' + mode}.yaml",
        ["model.proj_hidden=64", "model.proj_dim=32", "model.pred_hidden=64", "model.queue_size=64"],
    )
    method = build_method(cfg).to(memory_format=torch.channels_last)
    method.hold_updates = True  # as the training step: MoCo's enqueue after the backward
    optimizer = build_optimizer(method, cfg, torch.device("cpu"))
    compile_networks(method, backend=BACKEND)

    def step(seed):
        g = torch.Generator().manual_seed(seed)
        a_u8, b_u8 = (torch.randint(0, 256, (N, SIZE, SIZE, 3), dtype=torch.uint8, generator=g) for _ in range(2))
        made = mix.make_views(a_u8, b_u8, cfg, g, torch.float32, order=method.view_order())
        optimizer.zero_grad(set_to_none=True)
        loss = method(**{k: made[k] for k in ("views", "partner", "lam_a", "lam_b") if k in made})["loss"]
        loss.backward()
        method.apply_held_updates()
        optimizer.step()
        method.momentum_update(0.5)
        return loss.item()

    step(0)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1  # the online and target networks and the loss, together
    with torch._dynamo.config.patch(error_on_recompile=True):
        losses = [step(seed) for seed in (1, 2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
