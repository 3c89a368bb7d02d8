"""The one training step: the step the benchmark and the speedrun time (through `tools.harness.images_s`) is the
step `train()` trains with."""

import copy
import dataclasses

import pytest
import torch
from helpers import TINY, tiny_folder

from bsim_fast.checkpoint import list_checkpoints, load_checkpoint
from bsim_fast.config import load_config
from bsim_fast.loaders import build_train_loader
from bsim_fast.precision import precision_for
from bsim_fast.resume import load_into
from bsim_fast.seeds import set_rng_state
from bsim_fast.step import TrainStep
from bsim_fast.tools import harness
from bsim_fast.train import train


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("data") / "train", "train", per_class=6)  # 24 images


@pytest.mark.parametrize(
    "extra",
    [[], ["method.name=moco", "method.mode=wbsim", "train.accum_steps=2", "train.nan_policy=skip"]],
    ids=["byol_bsim", "moco_wbsim_accum2"],
)
def test_exposed_step_equals_the_trainers_step_bitwise(folder, tmp_path, extra):
    """From the checkpoint of step 1 of a `train()` run, the exposed step on the batches the loop read next
    gives bitwise the parameters, optimiser state and loss scaler of the loop's step 2."""
    cfg = load_config(
        "configs/small/byol_bsim.yaml",
        TINY
        + [
            f"data.train={folder}",
            "data.val=",
            "train.epochs=2",
            "train.max_steps=2",
            "train.ckpt_every_steps=1",
            "train.keep_checkpoints=3",
            f"train.out_dir={tmp_path}",
            *extra,
        ],
    )
    train(cfg, resume="none")
    first_path, second_path = list_checkpoints(tmp_path)
    second = load_checkpoint(second_path)
    assert (load_checkpoint(first_path)["step"], second["step"]) == (1, 2)

    loader = build_train_loader(cfg, 0, 1, "cpu")

    def resumed() -> TrainStep:
        """A step resumed from step 1's checkpoint, read afresh (a loaded optimiser state may share its tensors
        with the checkpoint's, which the step then updates in place)."""
        first = load_checkpoint(first_path)
        step = TrainStep(cfg, "cpu", len(loader) // cfg.train.accum_steps)
        load_into(step, first, tmp_path)
        set_rng_state(first["rng"][0])
        return step

    def next_views(step: TrainStep):
        """The batches the loop read for its step 2: where the checkpoint of step 1 left the epoch."""
        batches = loader.epoch(step.state.epoch, start_batch=step.state.batches_read)
        return ((a_u8, b_u8) for (a_u8, b_u8, _), _ in zip(batches, range(cfg.train.accum_steps)))

    step = resumed()
    stepped = [step(a_u8, b_u8) for a_u8, b_u8 in next_views(step)]
    assert stepped == [False] * (cfg.train.accum_steps - 1) + [True] and step.state.step == 2
    # the same step as the benchmark's model-only and end-to-end rows and the speedrun's calibration time it:
    # through the tools' one timing loop (harness.images_s)
    timed = resumed()
    harness.images_s(next_views(timed), "cpu", warmup=0, count=cfg.train.accum_steps, step=timed)
    assert timed.state.step == 2

    for ours in (step, timed):
        assert ours.method.state_dict().keys() == second["model"].keys()
        for k, v in ours.method.state_dict().items():
            assert torch.equal(v, second["model"][k]), k
        mine, theirs = ours.optimizer.state_dict()["state"], second["optimizer"]["state"]
        assert mine.keys() == theirs.keys()
        for i in mine:
            assert all(torch.equal(mine[i][k], theirs[i][k]) for k in mine[i]), i
        assert ours.scaler.state_dict() == second["scaler"]


def test_precision_is_decided_once():
    """The dtypes `train.precision` means on each device (PyTorch's AMP rules: autocast on CUDA only here,
    loss scaling for fp16 alone, whose 5-bit exponent underflows small gradients)."""
    cases = {
        ("bf16", "cuda"): (torch.bfloat16, True, torch.bfloat16, False),
        ("fp16", "cuda"): (torch.float16, True, torch.float16, True),
        ("fp32", "cuda"): (torch.float32, False, torch.float32, False),
        ("bf16", "cpu"): (torch.bfloat16, False, torch.float32, False),
        ("fp16", "cpu"): (torch.float16, False, torch.float32, False),
    }
    for (name, device), (amp, autocast, view, scaler) in cases.items():
        p = precision_for(name, device)
        assert (p.amp_dtype, p.autocast, p.view_dtype, p.grad_scaler) == (amp, autocast, view, scaler), (name, device)


def test_skipped_step_leaves_no_trace_and_saves_only_what_a_forward_changes(folder, monkeypatch):
    """train.nan_policy=skip, MoCo-WBSIM (BatchNorm statistics of the online and key networks, the queue and
    its pointer, momentum buffers): a micro-batch with a non-finite loss changes no tensor of the method or
    the optimiser and leaves the step counters; what the step saves before a forward is BatchNorm's running
    statistics and counts alone (the queue is not copied: its update waits for the backward)."""
    from bsim_fast import step as step_module

    cfg = load_config(
        "configs/small/moco_wbsim.yaml",
        TINY + [f"data.train={folder}", "data.val=", "train.nan_policy=skip", "method.symmetric=false"],
    )
    lines = []
    step = TrainStep(cfg, "cpu", 10, log=lines.append)
    g = torch.Generator().manual_seed(0)
    a_u8, b_u8 = (torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8, generator=g) for _ in range(2))
    assert step(a_u8, b_u8)  # a finite step first: momentum buffers and a queue pointer that has moved
    batchnorm = [m for m in step.method.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(step.forward_state.live) == 3 * len(batchnorm)
    assert all(b.numel() < step.method.queue.numel() for b in step.forward_state.live)
    model = {k: v.clone() for k, v in step.method.state_dict().items()}
    optim = copy.deepcopy(step.optimizer.state_dict())
    sums, state = step.sums.clone(), dataclasses.replace(step.state)
    real = step_module.make_views

    def poisoned(*args, **kwargs):
        views = real(*args, **kwargs)
        views["mixed_b"].fill_(float("nan"))  # a slice of views["views"]
        return views

    monkeypatch.setattr(step_module, "make_views", poisoned)
    assert not step(a_u8, b_u8) and "step skipped" in lines[-1]
    for k, v in step.method.state_dict().items():
        assert torch.equal(v, model[k]), k
    after = step.optimizer.state_dict()
    assert all(
        torch.equal(after["state"][i]["momentum_buffer"], optim["state"][i]["momentum_buffer"]) for i in optim["state"]
    )
    assert all(p.grad is None for p in step.method.parameters())
    assert torch.equal(step.sums, sums) and step.state == state
    monkeypatch.setattr(step_module, "make_views", real)
    assert step(a_u8, b_u8) and step.method.queue_ptr.item() == (2 * 8) % cfg.model.queue_size  # b's keys, twice
