"""PyTorch backend of trainable-infra."""

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("trainable_infra.pytorch_backend needs PyTorch: pip install 'trainable-infra[torch]'") from exc

__all__: list[str] = []
