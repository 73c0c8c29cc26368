"""Initial parameters: weights from values, activations from observed batches."""

import numpy as np
import pytest

from trainable_infra import QATConfig, QuantizationConfigError, QuantizationMethod
from trainable_infra.common import numerics as nm
from trainable_infra.common.calibration import (
    DEFAULT_ACTIVATION_THRESHOLD,
    ActivationObserver,
    default_activation_params,
    weight_quant_params,
)

SYM, POT, UNI = QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO, QuantizationMethod.UNIFORM
W = np.array([[0.5, -2.0, 1.0], [0.25, 0.1, -0.3]], dtype=np.float32)


def test_weight_max_abs_per_channel_and_per_tensor():
    np.testing.assert_allclose(weight_quant_params(W, SYM, 8, 0)["threshold"], [2.0, 0.3], rtol=1e-6)
    np.testing.assert_array_equal(weight_quant_params(W, SYM, 8, None)["threshold"], 2.0)


def test_weight_uniform_min_max():
    params = weight_quant_params(W, UNI, 8, 0)
    np.testing.assert_allclose(params["range_min"], [-2.0, -0.3])
    np.testing.assert_allclose(params["range_max"], [1.0, 0.25])


@pytest.mark.parametrize("method", [SYM, POT, UNI])
def test_weight_mse_init_is_no_worse_than_max_abs(method):
    w = np.random.default_rng(0).standard_t(3, size=(8, 64)).astype(np.float32)

    def error(params):
        if method is UNI:
            q = nm.fake_quant_uniform(w, params["range_min"], params["range_max"], 3, channel_axis=0)
        else:
            q = nm.fake_quant_symmetric(w, params["threshold"], 3, power_of_two=method is POT, channel_axis=0)
        return ((q - w) ** 2).mean()

    assert error(weight_quant_params(w, method, 3, 0, init="mse")) <= error(weight_quant_params(w, method, 3, 0))


def test_weight_params_reject_unknown_init_and_method():
    with pytest.raises(QuantizationConfigError, match="weight_init must be one of"):
        weight_quant_params(W, SYM, 8, 0, init="percentile")
    with pytest.raises(QuantizationConfigError, match="SYMMETRIC, POWER_OF_TWO or UNIFORM"):
        weight_quant_params(W, QuantizationMethod.LUT_POT_QUANTIZER, 8, 0)


def test_observer_tracks_extremes_and_sign():
    observer = ActivationObserver()
    observer.update(np.array([0.5, 2.0]))
    assert not observer.signed
    observer.update(np.array([[-3.0, np.nan, np.inf]]))
    assert observer.signed
    assert observer.quant_params(SYM, 8) == {"threshold": 3.0, "is_signed": True}
    assert observer.quant_params(UNI, 8) == {"range_min": -3.0, "range_max": 2.0}


def test_observer_mse_clips_outliers():
    rng = np.random.default_rng(0)
    observer = ActivationObserver("mse", max_samples=4096)
    for _ in range(4):
        observer.update(np.abs(rng.standard_t(2, size=5000)))
    minmax = max(observer.maximum, 0)
    params = observer.quant_params(SYM, 4)
    assert params["is_signed"] is False
    assert 0 < params["threshold"] < minmax


def test_observer_without_values_and_bad_calibration():
    with pytest.raises(QuantizationConfigError, match="no finite activation values were observed"):
        ActivationObserver().quant_params(SYM, 8)
    with pytest.raises(QuantizationConfigError, match="activation_calibration must be one of"):
        ActivationObserver("percentile")


def test_default_activation_params():
    assert default_activation_params(SYM, False) == {"threshold": DEFAULT_ACTIVATION_THRESHOLD, "is_signed": False}
    assert default_activation_params(UNI, True) == {"range_min": -8.0, "range_max": 8.0}


def test_qat_config_init_and_calibration_choices():
    config = QATConfig(weight_init="mse", activation_calibration="mse")
    assert QATConfig.from_dict(config.to_dict()) == config
    with pytest.raises(QuantizationConfigError, match="weight_init must be one of"):
        QATConfig(weight_init="best")
    with pytest.raises(QuantizationConfigError, match="activation_calibration must be one of"):
        QATConfig(activation_calibration=None)
