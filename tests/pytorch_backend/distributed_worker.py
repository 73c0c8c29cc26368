"""What each process of the distributed PyTorch tests runs, and the models and data both sides share.

`run` is started once per rank by `torch.multiprocessing` (spawn) from test_distributed.py. It trains QAT
models under DistributedDataParallel, FSDP (`FullyShardedDataParallel`) and FSDP2 (`fully_shard`) on its half
of a fixed global batch and saves, per scenario, the full state dict and the names of the tensors that are not
bit-identical on every rank; the test process compares them with single-process training.

Only torch is imported at the top: a worker keeps TensorFlow out before it imports trainable_infra, because
mct-quantizers imports TensorFlow whenever it is installed (seconds per process) and no worker needs it.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

WORLD_SIZE = 2
GLOBAL_BATCH = 16  # 8 samples per rank
STEPS = 4
LEARNING_RATE = 0.5
MOMENTUM = 0.9
METHODS = ("STE", "LSQ")
CHECKPOINT = "checkpoint.pt"
# How long a collective may wait for the other rank before it fails instead of hanging.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed global batch: (16, 1, 8, 8) inputs and 10-class labels, the same in every process."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=generator)
    return x, torch.randint(0, 10, (GLOBAL_BATCH,), generator=generator)


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s contiguous half of the global batch."""
    x, y = global_batch()
    return x.chunk(WORLD_SIZE)[rank], y.chunk(WORLD_SIZE)[rank]


def qat_model(method: str, batch_norm: bool) -> nn.Module:
    """conv (+BN) + ReLU + linear, quantized W4A8 with `method` ("STE" or "LSQ") and calibrated on the batch."""
    # Imported here, not at the top: see the module docstring.
    from trainable_infra import QATConfig, TrainingMethod
    from trainable_infra.pytorch_backend import quantize_model

    torch.manual_seed(0)
    norm = [nn.BatchNorm2d(8)] if batch_norm else []
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), *norm, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    training = TrainingMethod[method]
    config = QATConfig(weight_training_method=training, activation_training_method=training, weight_n_bits=4)
    return quantize_model(model, config, representative_data=[global_batch()[0]], progress=False)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """`STEPS` SGD steps on the mean cross-entropy of (x, y)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    model.train()
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a plain, DDP or FSDP model, with the plain model's keys."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def differing_across_ranks(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors in `state` that are not bit-identical on every rank (a collective call)."""
    differing = []
    for name, tensor in state.items():
        gathered = [torch.empty_like(tensor) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, tensor.contiguous())
        if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
            differing.append(name)
    return differing


def _result(model: nn.Module) -> dict:
    state = full_state(model)
    return {"state": state, "differing": differing_across_ranks(state)}


def _ddp(rank: int, method: str, batch_norm: bool, out_dir: Path) -> dict:
    model = qat_model(method, batch_norm)
    before = {name: id(p) for name, p in model.named_parameters()}
    seen: dict[str, dict[str, int]] = {}

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen.setdefault("after", {name: id(p) for name, p in module.named_parameters()})

    hook = model.register_forward_hook(record)
    ddp = nn.parallel.DistributedDataParallel(model)
    train(ddp, *rank_batch(rank))
    hook.remove()
    result = _result(ddp)
    # The same names bound to the same objects: nothing was created (or replaced) by the first forward.
    result["parameters_unchanged_by_first_forward"] = seen["after"] == before
    result["parameter_names"] = sorted(before)
    if rank == 0 and method == "LSQ" and batch_norm:
        torch.save(ddp.module.state_dict(), out_dir / CHECKPOINT)
        with torch.no_grad():
            result["eval_outputs"] = ddp.module.eval()(global_batch()[0])
    return result


def _fsdp2(rank: int, method: str) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = qat_model(method, batch_norm=False)
    fully_shard(model)
    train(model, *rank_batch(rank))
    return _result(model)


def _fsdp1(rank: int, use_orig_params: bool) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel

    # On a machine without an accelerator FSDP needs to be told the device.
    model = FullyShardedDataParallel(
        qat_model("LSQ", batch_norm=False), device_id=torch.device("cpu"), use_orig_params=use_orig_params
    )
    train(model, *rank_batch(rank))
    return _result(model)


def run(rank: int, port: int, out_dir: str) -> None:
    """Run every scenario as rank `rank` and save the results to `<out_dir>/rank<rank>.pt`."""
    sys.modules["tensorflow"] = None  # see the module docstring
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=COLLECTIVE_TIMEOUT)
    try:
        out = Path(out_dir)
        results = {}
        for method in METHODS:
            for batch_norm in (True, False):
                results[f"ddp-{method}-{'bn' if batch_norm else 'nobn'}"] = _ddp(rank, method, batch_norm, out)
            results[f"fsdp2-{method}"] = _fsdp2(rank, method)
        for use_orig_params in (True, False):
            results[f"fsdp1-LSQ-use_orig_params={use_orig_params}"] = _fsdp1(rank, use_orig_params)
        torch.save(results, out / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
