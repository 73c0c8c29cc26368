"""One adapter per backend, so that each numerics test is written once.

An adapter drives a backend through its public API only: it finds the quantizer class for a case with
`get_trainable_quantizer_class`, builds it from a quantization config, calls `initialize_quantization(shape,
name, layer)` on a bare Keras layer / torch module, calls the quantizer with training True or False, reads the
gradients of the input and of the trainable quantization variables (`get_trainable_variables(QPARAMS)`; DQA's
attention logits, `get_trainable_variables(WEIGHTS)`, as "attention"), and converts with `convert2inferable()`.
A DQA quantizer is put at a step of its schedule through its `step` counter and given the case's logits through
`attention_logits`. Tensors go in and come out as numpy arrays. Each adapter also builds the
framework's own fused fake-quant op directly from a case's parameters: the independent oracle of that backend.

Frameworks are imported on first use, so the suite collects (and skips the missing backend) without one.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from typing import Any

import numpy as np

from tests.numerics.cases import MIN_THRESHOLD, POT, Case, dqa_logits
from trainable_infra import (
    TrainableQuantizerActivationConfig,
    TrainableQuantizerWeightsConfig,
    VariableGroup,
    get_trainable_quantizer_class,
)
from trainable_infra.common import numerics as nm

PARAM_KEYS = ("range_min", "range_max", "threshold", "attention")
DTYPES = ("float32", "float64", "float16", "bfloat16")


def make_config(case: Case, params: dict[str, np.ndarray]):
    """The quantization config of `case` with `params` (a single float per-tensor, a 1-D array per-channel)."""
    values: dict[str, Any] = {k: (v if case.axis is not None else float(v[0])) for k, v in params.items()}
    if case.is_weights:
        per_channel = case.axis is not None
        return TrainableQuantizerWeightsConfig(
            case.method, case.n_bits, values, True, case.axis if per_channel else 0, per_channel, MIN_THRESHOLD
        )
    if not case.is_uniform:
        values["is_signed"] = case.signed
    return TrainableQuantizerActivationConfig(case.method, case.n_bits, values, True, MIN_THRESHOLD)


def canonical_name(key: str) -> str:
    """The parameter a registered variable name refers to ("threshold", "range_min", "range_max" or DQA's
    "attention")."""
    for name in PARAM_KEYS:
        if key == name or key.endswith(f"_{name}"):
            return name
    return key


def oracle_grid(case: Case, params: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel, straight from DESIGN.md §4: (Δ, zero point, (low, high) of the clipping range), float32.

    Symmetric: Δ = t/2^(n-s), zero point 0, range [Δ·q_min, Δ·q_max]. Uniform: the range widened to include
    zero, Δ = (b - a)/(2^n - 1) and z = round(-a/Δ) in float32 (the fused ops nudge the range themselves).
    """
    if case.is_uniform:
        low = np.minimum(params["range_min"], 0).astype(np.float32)
        high = np.maximum(params["range_max"], 0).astype(np.float32)
        delta = (high - low) / np.float32(2**case.n_bits - 1)
        return delta, np.rint(-low / delta).astype(np.int32), np.stack([low, high])
    t = nm.effective_threshold(params["threshold"], MIN_THRESHOLD, case.method is POT)
    delta = t / 2 ** (case.n_bits - int(case.signed))
    q_min, q_max = case.int_range
    return delta.astype(np.float32), np.zeros(len(t), np.int32), np.stack([delta * q_min, delta * q_max]).astype(
        np.float32)


def _float_array(x: np.ndarray) -> np.ndarray:
    """x as given when it is float64 (so that a float64 test keeps its extra precision), else as float32."""
    x = np.asarray(x)
    return x if x.dtype == np.float64 else x.astype(np.float32)


@dataclasses.dataclass
class Built:
    """A quantizer initialized for a case, with the layer/module that holds its variables."""

    case: Case
    quantizer: Any
    layer: Any


class Adapter:
    """What the tests need from a backend. Subclasses implement the framework calls."""

    name: str
    module: str  # the framework package whose absence skips this backend
    rounding: nm.Rounding
    ulps: int  # rule 2's budget away from ties, in float32 ulps (DESIGN.md §4)
    base_class_path: tuple[str, str]

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def ulps_for(self, case: Case) -> int:
        """Rule 2's budget for `case` away from ties, in float32 ulps of the output."""
        return self.ulps

    def quantizer_class(self, case: Case) -> type:
        """The backend's quantizer class for the case, found by the resolver."""
        module_name, class_name = self.base_class_path
        base = getattr(importlib.import_module(module_name), class_name)
        return get_trainable_quantizer_class(case.quantization_target, case.training, case.method, base)

    def build(self, case: Case, params: dict[str, np.ndarray], shape: tuple[int, ...] | None = None,
              dqa_step: int | None = None) -> Built:
        """The case's quantizer with `params`, initialized for a tensor of `shape` (default: the case's).

        A DQA quantizer gets the case's attention logits and is put at `dqa_step` (default: the end of its
        schedule, where it trains as the b-bit quantizer).
        """
        quantizer = self.quantizer_class(case)(make_config(case, params))
        layer = self.new_layer()
        quantizer.initialize_quantization(self.init_shape(case, case.shape if shape is None else shape), "q", layer)
        built = Built(case, quantizer, self.place(layer))
        if case.is_dqa:
            step = quantizer.temperature_schedule.t_end if dqa_step is None else dqa_step
            self.set_dqa_state(built, step, dqa_logits(case))
        return built

    def trainable(self, built: Built, group: VariableGroup = VariableGroup.QPARAMS) -> dict[str, Any]:
        """The trainable variables of `group` (default: the quantization parameters) by parameter name."""
        variables = built.quantizer.get_trainable_variables(group)
        named = {}
        for key, entry in built.quantizer.quantizer_parameters.items():
            if any(entry.variable is v for v in variables):
                named[canonical_name(key)] = entry.variable
        return named

    def trained(self, built: Built) -> dict[str, Any]:
        """Every variable whose gradient `gradients` reports: the trainable quantization parameters and DQA's
        attention logits."""
        return {**self.trainable(built), **self.trainable(built, VariableGroup.WEIGHTS)}

    def forward(self, built: Built, x: np.ndarray, training: bool) -> np.ndarray:
        """Q(x) for a float32 array x, as a float32 array."""
        return self.run(built, x, training)[0].astype(np.float32)

    # --- implemented per framework ------------------------------------------------------------------------

    def new_layer(self) -> Any:
        raise NotImplementedError

    def set_dqa_state(self, built: Built, step: int, logits: np.ndarray) -> None:
        """Put a DQA quantizer at `step` of its schedule with attention logits `logits`."""
        raise NotImplementedError

    def place(self, layer: Any) -> Any:
        return layer

    def init_shape(self, case: Case, shape: tuple[int, ...]) -> Any:
        """What `initialize_quantization` is given for a tensor of `shape`."""
        raise NotImplementedError

    def run(self, built: Built, x: np.ndarray, training: bool, dtype: str = "float32") -> tuple[np.ndarray, str]:
        """Q(x) with x (float32, or float64) cast to `dtype` by the framework: (the output as float64 values, its
        dtype name)."""
        raise NotImplementedError

    def cast(self, x: np.ndarray, dtype: str) -> np.ndarray:
        """x after the framework's cast to `dtype`, as float64 values."""
        raise NotImplementedError

    def gradients(self, built: Built, x: np.ndarray, dy: np.ndarray, dtype: str = "float32") -> dict[str, np.ndarray]:
        """Gradients of sum(dy·Q(x)) in training mode: "input" (shape of x) and each trained variable (1-D)."""
        raise NotImplementedError

    def inferable(self, built: Built, x: np.ndarray) -> np.ndarray:
        """The output of `convert2inferable()` on a float32 array x."""
        return self.run_inferable(built, x)[0].astype(np.float32)

    def run_inferable(self, built: Built, x: np.ndarray, dtype: str = "float32") -> tuple[np.ndarray, str]:
        """`convert2inferable()` applied to x cast to `dtype`: (the output as float64 values, its dtype name)."""
        raise NotImplementedError

    def oracle(self, case: Case, params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        """The framework's own fused fake-quant op, built directly from the parameters."""
        raise NotImplementedError


class KerasAdapter(Adapter):
    name = "keras"
    module = "tensorflow"
    rounding = "half_up"  # TensorFlow's fake_quant_with_min_max_vars
    ulps = 2
    base_class_path = ("trainable_infra.keras_backend", "BaseKerasTrainableQuantizer")

    def ulps_for(self, case: Case) -> int:
        # The op's own error is at most 2 ulps. Uniform grids get 2 more: mct-quantizers' Keras quantizers (and
        # so, for rule 1, the trainable ones) feed the op a zero-adjusted range computed in float64 and rounded
        # to float32, from which the op derives its step and zero point again (README.md, "Exceptions").
        return 4 if case.is_uniform else self.ulps

    def new_layer(self) -> Any:
        import keras

        return keras.layers.Layer()

    def set_dqa_state(self, built: Built, step: int, logits: np.ndarray) -> None:
        built.quantizer.step.assign(step)
        built.quantizer.attention_logits.assign(np.asarray(logits, np.float32))

    def init_shape(self, case: Case, shape: tuple[int, ...]) -> Any:
        return shape if case.is_weights else (None, *shape[1:])

    def _tensor(self, x: np.ndarray, dtype: str):
        import tensorflow as tf

        return tf.cast(tf.constant(_float_array(x)), dtype)

    def cast(self, x: np.ndarray, dtype: str) -> np.ndarray:
        import tensorflow as tf

        return tf.cast(self._tensor(x, dtype), tf.float64).numpy()

    def run(self, built: Built, x: np.ndarray, training: bool, dtype: str = "float32") -> tuple[np.ndarray, str]:
        import tensorflow as tf

        y = built.quantizer(self._tensor(x, dtype), training)
        return tf.cast(y, tf.float64).numpy(), y.dtype.name

    def gradients(self, built: Built, x: np.ndarray, dy: np.ndarray, dtype: str = "float32") -> dict[str, np.ndarray]:
        import tensorflow as tf

        xt = self._tensor(x, dtype)
        named = self.trained(built)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = built.quantizer(xt, True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.constant(dy, tf.float32))
        grads = tape.gradient(loss, [xt, *named.values()])
        out = {"input": tf.cast(grads[0], tf.float64).numpy()}
        for name, grad in zip(named, grads[1:], strict=True):
            out[name] = None if grad is None else np.asarray(grad, np.float64).reshape(-1)
        return out

    def run_inferable(self, built: Built, x: np.ndarray, dtype: str = "float32") -> tuple[np.ndarray, str]:
        import tensorflow as tf

        y = built.quantizer.convert2inferable()(self._tensor(x, dtype))
        return tf.cast(y, tf.float64).numpy(), y.dtype.name

    def oracle(self, case: Case, params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        _, _, (low, high) = oracle_grid(case, params)
        x = tf.constant(np.asarray(x, np.float32))
        if case.axis is None:
            return tf.quantization.fake_quant_with_min_max_vars(x, low[0], high[0], num_bits=case.n_bits).numpy()
        # The per-channel op quantizes along the last axis: move the channel axis there and back.
        axis = case.axis % x.shape.rank
        perm = [i for i in range(x.shape.rank) if i != axis] + [axis]
        y = tf.quantization.fake_quant_with_min_max_vars_per_channel(
            tf.transpose(x, perm), low, high, num_bits=case.n_bits
        )
        return tf.transpose(y, np.argsort(perm)).numpy()


class TorchAdapter(Adapter):
    module = "torch"
    rounding = "half_even"  # torch's fake-quant kernels
    base_class_path = ("trainable_infra.pytorch_backend", "BasePytorchTrainableQuantizer")

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.name = "pytorch" if device == "cpu" else f"pytorch-{device}"
        # The CPU path composes the fused kernel's IEEE ops (exact); the CUDA kernel may round by 1 ulp.
        self.ulps = 0 if device == "cpu" else 1

    def available(self) -> bool:
        if not super().available():
            return False
        if self.device == "cpu":
            return True
        import torch

        return torch.cuda.is_available()

    def new_layer(self) -> Any:
        import torch

        return torch.nn.Module()

    def set_dqa_state(self, built: Built, step: int, logits: np.ndarray) -> None:
        import torch

        with torch.no_grad():
            built.quantizer.step.fill_(step)
            built.quantizer.attention_logits.copy_(torch.tensor(logits, dtype=torch.float32))

    def place(self, layer: Any) -> Any:
        return layer.to(self.device)

    def init_shape(self, case: Case, shape: tuple[int, ...]) -> Any:
        return shape if case.is_weights else None

    def _tensor(self, x: np.ndarray, dtype: str):
        import torch

        return torch.from_numpy(np.ascontiguousarray(_float_array(x))).to(self.device, getattr(torch, dtype))

    def cast(self, x: np.ndarray, dtype: str) -> np.ndarray:
        import torch

        return self._tensor(x, dtype).to("cpu", torch.float64).numpy()

    def run(self, built: Built, x: np.ndarray, training: bool, dtype: str = "float32") -> tuple[np.ndarray, str]:
        import torch

        xt = self._tensor(x, dtype)
        if training:
            xt.requires_grad_()
        y = built.quantizer(xt, training)
        return y.detach().to("cpu", torch.float64).numpy(), str(y.dtype).removeprefix("torch.")

    def gradients(self, built: Built, x: np.ndarray, dy: np.ndarray, dtype: str = "float32") -> dict[str, np.ndarray]:
        import torch

        xt = self._tensor(x, dtype).requires_grad_()
        named = self.trained(built)
        y = built.quantizer(xt, True)
        grads = torch.autograd.grad(
            y, [xt, *named.values()], grad_outputs=self._tensor(dy, str(y.dtype).removeprefix("torch.")),
            allow_unused=True,
        )
        out = {"input": grads[0].to("cpu", torch.float64).numpy()}
        for name, grad in zip(named, grads[1:], strict=True):
            out[name] = None if grad is None else grad.to("cpu", torch.float64).numpy().reshape(-1)
        return out

    def run_inferable(self, built: Built, x: np.ndarray, dtype: str = "float32") -> tuple[np.ndarray, str]:
        import torch

        y = built.quantizer.convert2inferable()(self._tensor(x, dtype))
        return y.detach().to("cpu", torch.float64).numpy(), str(y.dtype).removeprefix("torch.")

    def oracle(self, case: Case, params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        import torch

        delta, zero_point, _ = oracle_grid(case, params)
        q_min, q_max = case.int_range
        scale = torch.from_numpy(delta).to(self.device)
        zero = torch.from_numpy(zero_point).to(self.device)
        xt = self._tensor(x, "float32")
        if case.axis is None:
            y = torch.fake_quantize_per_tensor_affine(xt, scale, zero, q_min, q_max)
        else:
            y = torch.fake_quantize_per_channel_affine(xt, scale, zero, case.axis % xt.ndim, q_min, q_max)
        return y.cpu().numpy()


ADAPTERS: dict[str, Adapter] = {a.name: a for a in (KerasAdapter(), TorchAdapter("cpu"), TorchAdapter("cuda"))}


def backend_names(include_missing: bool = True) -> list[str]:
    """The backends to test: keras and pytorch always (skipped when missing), pytorch-cuda where a GPU is."""
    names = ["keras", "pytorch"]
    if ADAPTERS["pytorch-cuda"].available():
        names.append("pytorch-cuda")
    return names if include_missing else [n for n in names if ADAPTERS[n].available()]
