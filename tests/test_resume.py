"""Training resumed from a checkpoint ends bit-identical to an uninterrupted run, in both backends (CPU)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from trainable_infra import QATConfig, QuantizationMethod, TrainingMethod
from trainable_infra.common.schedules import LinearAnnealing

LSQ_CONFIG = QATConfig(
    weight_training_method=TrainingMethod.LSQ,
    activation_training_method=TrainingMethod.LSQ,
    # The classifier gets uniform quantizers, so that learned ranges are checked as well as thresholds.
    overrides={"fc": {"weight_quantization_method": QuantizationMethod.UNIFORM,
                      "activation_quantization_method": QuantizationMethod.UNIFORM}},
    fold_batch_norm=False,  # BatchNorm kept, so that its statistics (and their freezing) resume too
)
STE_CONFIG = QATConfig(fold_batch_norm=False)


def _data(n: int = 96) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 8, 8, 1)).astype(np.float32), rng.integers(0, 5, size=n).astype(np.int64)


# --- PyTorch ------------------------------------------------------------------------------------------------


torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402 - after the import guard
from torch.nn import functional as F  # noqa: E402, N812

from trainable_infra.pytorch_backend import (  # noqa: E402
    freeze_bn_stats,
    freeze_quantizers,
    quantize_model,
)

TORCH_STEPS, TORCH_RESUME_AT, BATCH = 8, 3, 16
# Weight of an L2 penalty on the layer weights, annealed over the run: its position is part of the checkpoint.
PENALTY = LinearAnnealing(t_start=1, t_end=6, initial_value=1e-2, target_value=0.0)


class _TorchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(self.drop(torch.flatten(x, 1)))


def _torch_data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _data()
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)


def _torch_parts(config: QATConfig, seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """A QAT model, its optimizer and LR scheduler, built from a float model initialised with `seed`."""
    x, _ = _torch_data()
    torch.manual_seed(seed)
    model = quantize_model(_TorchNet(), config, [x[:32]], progress=False)
    if config.weight_training_method is TrainingMethod.LSQ:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=5e-2, momentum=0.9)
    return model, optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=TORCH_STEPS)


def _torch_train(parts: tuple, steps: range, penalty: LinearAnnealing, freeze_at: int | None = None) -> None:
    model, optimizer, scheduler = parts
    x, y = _torch_data()
    model.train()
    for step in steps:
        if freeze_at is not None and step == freeze_at:
            freeze_quantizers(model)
            freeze_bn_stats(model)
        # A fixed data order: batch `step` is always the same samples.
        start = (step * BATCH) % len(x)
        inputs, targets = x[start:start + BATCH], y[start:start + BATCH]
        optimizer.zero_grad()
        weights = [p for name, p in model.named_parameters() if name.endswith("module.weight")]
        loss = F.cross_entropy(model(inputs), targets) + penalty(step) * sum(w.square().sum() for w in weights)
        loss.backward()
        optimizer.step()
        scheduler.step()


def _assert_same_torch_state(expected: nn.Module, actual: nn.Module) -> None:
    expected_state, actual_state = expected.state_dict(), actual.state_dict()
    assert list(expected_state) == list(actual_state)
    for name, value in expected_state.items():
        assert torch.equal(value, actual_state[name]), name


@pytest.mark.parametrize("config", [LSQ_CONFIG, STE_CONFIG], ids=["lsq-adam", "ste-sgd-momentum"])
def test_torch_resumed_training_is_bit_identical(config, tmp_path):
    torch.manual_seed(7)
    uninterrupted = _torch_parts(config, seed=0)
    initial = {k: v.clone() for k, v in uninterrupted[0].state_dict().items()}
    _torch_train(uninterrupted, range(TORCH_STEPS), PENALTY)

    torch.manual_seed(7)
    first = _torch_parts(config, seed=0)
    _torch_train(first, range(TORCH_RESUME_AT), PENALTY)
    model, optimizer, scheduler = first
    torch.save({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "step": TORCH_RESUME_AT, "penalty": PENALTY.to_dict(), "rng": torch.get_rng_state(),
    }, tmp_path / "checkpoint.pt")
    del first, model, optimizer, scheduler

    # Everything rebuilt from scratch, from a differently initialised float model: the checkpoint alone decides.
    torch.manual_seed(99)
    resumed = _torch_parts(config, seed=1)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    resumed[0].load_state_dict(checkpoint["model"])
    resumed[1].load_state_dict(checkpoint["optimizer"])
    resumed[2].load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng"])  # dropout masks continue where they left off
    _torch_train(resumed, range(checkpoint["step"], TORCH_STEPS), LinearAnnealing.from_dict(checkpoint["penalty"]))

    _assert_same_torch_state(uninterrupted[0], resumed[0])
    assert uninterrupted[2].get_last_lr() == resumed[2].get_last_lr()
    final = uninterrupted[0].state_dict()
    assert not any(k.endswith("_frozen") for k in final)  # nothing was frozen: no switch in the state_dict
    assert not torch.equal(initial["bn1.running_mean"], final["bn1.running_mean"])
    if config is LSQ_CONFIG:
        learned = [k for k in final if k.endswith(("_threshold", "_range_min", "_range_max"))]
        assert any(k.endswith("_range_max") for k in learned)
        assert all(not torch.equal(initial[k], final[k]) for k in learned), "LSQ parameters did not train"


def test_torch_whole_model_pickle_resumes_bit_identical(tmp_path):
    """torch.save of the whole model and optimizer mid-training (pickled, not a state_dict), then torch.load:
    training goes on exactly as without the interruption (traced models re-trace their code on load; what the
    quantizers keep between calls is left out of the pickle and recomputed)."""
    torch.manual_seed(7)
    uninterrupted = _torch_parts(LSQ_CONFIG, seed=0)
    _torch_train(uninterrupted, range(TORCH_STEPS), PENALTY)

    torch.manual_seed(7)
    first = _torch_parts(LSQ_CONFIG, seed=0)
    _torch_train(first, range(TORCH_RESUME_AT), PENALTY)
    torch.save({"parts": first, "rng": torch.get_rng_state()}, tmp_path / "whole.pt")
    del first

    checkpoint = torch.load(tmp_path / "whole.pt", weights_only=False)
    torch.set_rng_state(checkpoint["rng"])
    resumed = checkpoint["parts"]
    _torch_train(resumed, range(TORCH_RESUME_AT, TORCH_STEPS), PENALTY)
    _assert_same_torch_state(uninterrupted[0], resumed[0])


def test_torch_resume_after_freezing_is_bit_identical(tmp_path):
    """Frozen quantizers and BatchNorm statistics stay frozen in a model rebuilt from the checkpoint.

    Regression: the switches were not part of state_dict(), so the rebuilt model trained its thresholds, ranges and
    BatchNorm statistics again.
    """
    freeze_at = 2
    torch.manual_seed(7)
    uninterrupted = _torch_parts(LSQ_CONFIG, seed=0)
    _torch_train(uninterrupted, range(TORCH_STEPS), PENALTY, freeze_at=freeze_at)

    torch.manual_seed(7)
    first = _torch_parts(LSQ_CONFIG, seed=0)
    _torch_train(first, range(TORCH_RESUME_AT), PENALTY, freeze_at=freeze_at)
    frozen = {k: v.clone() for k, v in first[0].state_dict().items() if k.endswith(("_threshold", "_range_max"))}
    torch.save({"model": first[0].state_dict(), "optimizer": first[1].state_dict(),
                "scheduler": first[2].state_dict(), "rng": torch.get_rng_state()}, tmp_path / "checkpoint.pt")

    resumed = _torch_parts(LSQ_CONFIG, seed=1)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"conv1.weight_frozen", "fc_activation_quantizer.activation_frozen", "bn1.stats_frozen"} <= set(
        checkpoint["model"])
    resumed[0].load_state_dict(checkpoint["model"])
    resumed[1].load_state_dict(checkpoint["optimizer"])
    resumed[2].load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng"])
    _torch_train(resumed, range(TORCH_RESUME_AT, TORCH_STEPS), PENALTY)

    _assert_same_torch_state(uninterrupted[0], resumed[0])
    final = resumed[0].state_dict()
    assert all(torch.equal(value, final[k]) for k, value in frozen.items())


# --- Keras --------------------------------------------------------------------------------------------------


keras = pytest.importorskip("keras")

from trainable_infra.keras_backend import (  # noqa: E402
    QuantizerFreezeCallback,
    keras_load_quantized_model,
)
from trainable_infra.keras_backend import freeze_quantizers as freeze_keras_quantizers  # noqa: E402
from trainable_infra.keras_backend import quantize_model as keras_quantize_model  # noqa: E402
from trainable_infra.keras_backend import unfreeze_quantizers as unfreeze_keras_quantizers  # noqa: E402

KERAS_EPOCHS, KERAS_RESUME_EPOCH = 3, 1


def _keras_float_model() -> keras.Model:
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(0.25, name="drop")(x)
    return keras.Model(inputs, keras.layers.Dense(5, name="fc")(x))


def _keras_model(config: QATConfig) -> keras.Model:
    x, _ = _data()
    keras.utils.set_random_seed(0)
    model = keras_quantize_model(_keras_float_model(), config, x[:32], progress=False)
    steps = KERAS_EPOCHS * len(x) // BATCH
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=steps)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _keras_fit(model: keras.Model, initial_epoch: int, epochs: int, callbacks: list | None = None) -> None:
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, epochs=epochs, initial_epoch=initial_epoch, shuffle=False, verbose=0,
              callbacks=callbacks)


def _dropout_state(model: keras.Model) -> keras.Variable:
    # Keras does not save the state of random seed generators in `.keras` files: the dropout masks of a resumed
    # fit continue where they left off only if this state is carried over by hand.
    return model.get_layer("drop").seed_generator.state


def _assert_same_keras_state(expected: keras.Model, actual: keras.Model) -> None:
    names = [v.name for v in expected.weights]
    assert names == [v.name for v in actual.weights]
    for name, a, b in zip(names, expected.weights, actual.weights, strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), name
    assert len(expected.optimizer.variables) == len(actual.optimizer.variables)
    for a, b in zip(expected.optimizer.variables, actual.optimizer.variables, strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), a.path


def test_keras_resumed_fit_is_bit_identical(tmp_path):
    uninterrupted = _keras_model(LSQ_CONFIG)
    initial = [v.numpy().copy() for v in uninterrupted.weights]
    keras.utils.set_random_seed(1)
    _keras_fit(uninterrupted, 0, KERAS_EPOCHS)

    first = _keras_model(LSQ_CONFIG)
    keras.utils.set_random_seed(1)
    _keras_fit(first, 0, KERAS_RESUME_EPOCH)
    first.save(tmp_path / "checkpoint.keras")
    for loader in (keras.models.load_model, keras_load_quantized_model):
        keras.utils.set_random_seed(123)
        resumed = loader(tmp_path / "checkpoint.keras")
        # The LR schedule's position is the optimizer's step count, restored from the file.
        assert int(resumed.optimizer.iterations.numpy()) == int(first.optimizer.iterations.numpy()) > 0
        _dropout_state(resumed).assign(_dropout_state(first))
        _keras_fit(resumed, KERAS_RESUME_EPOCH, KERAS_EPOCHS)
        _assert_same_keras_state(uninterrupted, resumed)

    learned = [i for i, v in enumerate(uninterrupted.weights) if v.name.endswith(("threshold", "range_max"))]
    assert any(uninterrupted.weights[i].name.endswith("range_max") for i in learned)
    assert all(not np.array_equal(initial[i], uninterrupted.weights[i].numpy()) for i in learned)


def test_keras_resume_after_freezing_is_bit_identical(tmp_path):
    """Quantizers frozen before the first step and unfrozen later, BatchNorm statistics frozen after it.

    Regressions: unfreezing what was frozen before the first step failed in `fit` ("Unknown variable": the
    optimizer had been built without it), and a model saved after `freeze_bn_stats` came back with its
    optimizer state reset, step count and LR schedule included (Keras skips a state built for other variables).
    """
    def switch(model: keras.Model):
        def on_epoch_begin(epoch: int, logs: dict | None = None) -> None:
            if epoch == 0:
                freeze_keras_quantizers(model)
            elif epoch == 1:
                unfreeze_keras_quantizers(model)
        return [keras.callbacks.LambdaCallback(on_epoch_begin=on_epoch_begin),
                QuantizerFreezeCallback(freeze_bn_stats_at=1)]

    uninterrupted = _keras_model(LSQ_CONFIG)
    initial = [v.numpy().copy() for v in uninterrupted.weights]
    keras.utils.set_random_seed(1)
    _keras_fit(uninterrupted, 0, KERAS_EPOCHS, switch(uninterrupted))

    first = _keras_model(LSQ_CONFIG)
    keras.utils.set_random_seed(1)
    _keras_fit(first, 0, 2, switch(first))
    first.save(tmp_path / "checkpoint.keras")
    resumed = keras_load_quantized_model(tmp_path / "checkpoint.keras")
    assert not resumed.get_layer("bn1").trainable
    assert int(resumed.optimizer.iterations.numpy()) == int(first.optimizer.iterations.numpy())
    _dropout_state(resumed).assign(_dropout_state(first))
    _keras_fit(resumed, 2, KERAS_EPOCHS, switch(resumed))

    _assert_same_keras_state(uninterrupted, resumed)
    moving_mean = next(i for i, v in enumerate(uninterrupted.weights) if v.path == "bn1/moving_mean")
    assert not np.array_equal(initial[moving_mean], uninterrupted.weights[moving_mean].numpy())


def test_keras_loader_says_when_the_saved_optimizer_state_cannot_be_restored(tmp_path):
    model = _keras_model(STE_CONFIG)
    model.save(tmp_path / "unbuilt.keras")  # before the first step the optimizer holds no state: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keras_load_quantized_model(tmp_path / "unbuilt.keras")

    model.optimizer.build(model.trainable_variables)
    model.get_layer("fc").trainable = False  # a layer frozen after the optimizer was built, not a BatchNorm
    model.save(tmp_path / "frozen-dense.keras")
    with pytest.warns(UserWarning, match="starts afresh"):
        keras_load_quantized_model(tmp_path / "frozen-dense.keras")
