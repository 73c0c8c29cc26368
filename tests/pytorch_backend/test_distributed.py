"""Data-parallel QAT on torch's own engines: DDP, FSDP and FSDP2 over 2 CPU processes (gloo, loopback).

One launch of 2 spawned processes runs every scenario (tests/pytorch_backend/distributed_worker.py); the tests
here read what each rank saved and compare it with single-process training of the same model on the whole
global batch: DDP and FSDP average the gradients of each rank's mean loss, which for equal halves is the
gradient of the mean loss over the whole batch.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from tests.pytorch_backend import distributed_worker as worker
from trainable_infra import QATConfig, TrainingMethod
from trainable_infra.pytorch_backend import quantize_model

# Float32 sums reduced in another order (two half-batch gradients averaged instead of one full-batch gradient,
# one thread instead of several) differ in the last bits: measured here, at most 6.0e-8 on any value after the
# 4 steps (7.5e-9 on the thresholds), while LSQ moves every threshold by more than 1e-5, so an untrained
# threshold would fail.
ATOL = 1e-6
LAUNCH_TIMEOUT_S = 180
_ATTEMPTS = 3  # a new port when another process took the free one between finding and binding it

DDP_CASES = [f"ddp-{method}-{norm}" for method in worker.METHODS for norm in ("bn", "nobn")]
# BatchNorm's running statistics are buffers, not gradients: DDP broadcasts rank 0's at the start of each
# forward, then every rank updates them with the statistics of its own half (SyncBatchNorm, which would share
# them, runs only on GPUs). Everything else DDP keeps identical.
_PER_RANK_BUFFERS = ("running_mean", "running_var")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(out_dir: Path) -> None:
    """Run `worker.run` on 2 spawned processes; a worker's exception fails with its traceback, a hang times out."""
    for attempt in range(_ATTEMPTS):
        context = mp.start_processes(
            worker.run, args=(_free_port(), str(out_dir)), nprocs=worker.WORLD_SIZE, join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    pytest.fail(f"the distributed workers did not finish within {LAUNCH_TIMEOUT_S} s")
            return
        except mp.ProcessRaisedException as exc:
            if "EADDRINUSE" not in str(exc) or attempt == _ATTEMPTS - 1:
                raise
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    """What each rank saved, and the directory holding rank 0's checkpoint."""
    out_dir = tmp_path_factory.mktemp("distributed")
    _launch(out_dir)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(worker.WORLD_SIZE)], out_dir


def single_process(method: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(initial, trained) state of the BN-free model trained in this process on the whole global batch."""
    model = worker.qat_model(method, batch_norm=False)
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    worker.train(model, *worker.global_batch())
    return initial, model.state_dict()


def assert_matches(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert state.keys() == reference.keys()
    for name, expected in reference.items():
        torch.testing.assert_close(state[name], expected, rtol=0, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("case", DDP_CASES)
def test_ddp_keeps_parameters_and_quantizer_variables_identical_across_ranks(ranks, case):
    results, _ = ranks
    state, differing = results[0][case]["state"], results[0][case]["differing"]
    assert any(name.endswith("_threshold") for name in state), "no quantizer variable was compared"
    assert results[1][case]["differing"] == differing
    assert all(name.endswith(_PER_RANK_BUFFERS) for name in differing), differing
    if case.endswith("nobn"):
        assert differing == []


@pytest.mark.parametrize("method", worker.METHODS)
def test_ddp_matches_single_process_training_on_the_whole_batch(ranks, method):
    results, _ = ranks
    initial, reference = single_process(method)
    thresholds = [name for name in reference if name.endswith("_threshold")]
    # LSQ trains the thresholds (with gradient scales that depend on the weight and feature sizes, not on the
    # per-rank batch); STE keeps them.
    moved = [name for name in thresholds if (reference[name] - initial[name]).abs().min() > 10 * ATOL]
    assert moved == (thresholds if method == "LSQ" else [])
    for rank_results in results:
        assert_matches(rank_results[f"ddp-{method}-nobn"]["state"], reference)


@pytest.mark.parametrize("case", DDP_CASES)
def test_quantizers_create_no_parameter_in_the_first_forward(ranks, case):
    results, _ = ranks
    for rank_results in results:
        assert rank_results[case]["parameters_unchanged_by_first_forward"]
        assert any(name.endswith("_threshold") for name in rank_results[case]["parameter_names"])


def test_rank0_checkpoint_reloads_into_a_single_process_model(ranks):
    results, out_dir = ranks
    expected = results[0]["ddp-LSQ-bn"]["eval_outputs"]
    x = worker.global_batch()[0]
    model = worker.qat_model("LSQ", batch_norm=True).eval()
    with torch.no_grad():
        assert not torch.equal(model(x), expected), "the untrained model already gives the trained outputs"
        model.load_state_dict(torch.load(out_dir / worker.CHECKPOINT, weights_only=True))
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize(
    "case", [*(f"fsdp2-{m}" for m in worker.METHODS), "fsdp1-LSQ-use_orig_params=True",
             "fsdp1-LSQ-use_orig_params=False"],
)
def test_fsdp_gathers_identical_state_matching_single_process_training(ranks, case):
    results, _ = ranks
    _, reference = single_process(case.split("-")[1])
    for rank_results in results:
        assert rank_results[case]["differing"] == []
        assert_matches(rank_results[case]["state"], reference)


def test_quantizers_use_the_parameters_the_layer_holds_now():
    # FSDP puts other tensor objects on the layers, as do load_state_dict(assign=True) and functional_call.
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))
    x = torch.randn(4, 1, 5, 5)
    config = QATConfig(weight_training_method=TrainingMethod.LSQ, activation_training_method=TrainingMethod.LSQ)

    def build():
        return quantize_model(float_model, config, representative_data=[x], progress=False).eval()

    halved = {k: v / 2 if k.endswith("_threshold") else v for k, v in build().state_dict().items()}
    copied, assigned = build(), build()
    copied.load_state_dict(halved)
    assigned.load_state_dict(halved, assign=True)
    with torch.no_grad():
        expected = copied(x)
        assert not torch.equal(expected, build()(x))
        assert torch.equal(assigned(x), expected)
        assert torch.equal(torch.func.functional_call(build(), halved, (x,)), expected)
