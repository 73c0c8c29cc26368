"""Keras 3 backend of trainable-infra (TensorFlow backend of Keras)."""

try:
    import keras
    import tensorflow  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "trainable_infra.keras_backend needs TensorFlow and Keras 3: pip install 'trainable-infra[keras]'"
    ) from exc

if int(keras.__version__.split(".")[0]) < 3:  # pragma: no cover
    raise ImportError(
        f"trainable_infra.keras_backend needs Keras 3, found Keras {keras.__version__}: "
        "pip install 'trainable-infra[keras]'"
    )

__all__: list[str] = []
