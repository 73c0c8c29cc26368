"""Float transformer blocks written here (no downloads) for the attention tests: a ViT block and a Swin-style
windowed attention block, on 8x8 one-channel images."""

from __future__ import annotations

import keras
import numpy as np
from keras import layers


@keras.saving.register_keras_serializable(package="trainable_infra_tests")
class RelativePositionBias(keras.layers.Layer):
    """Adds Swin's learned relative position bias to window attention scores (batch, windows, heads, T, T): one
    value per head and relative offset (dy, dx) between two positions of a window, read from a table."""

    def __init__(self, window: int, heads: int, **kwargs):
        super().__init__(**kwargs)
        self.window = window
        self.heads = heads
        coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
        relative = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, T, T), offsets made >= 0
        self._index = (relative[0] * (2 * window - 1) + relative[1]).reshape(-1).astype("int32")

    def build(self, input_shape):
        self.table = self.add_weight(
            name="table", shape=((2 * self.window - 1) ** 2, self.heads),
            initializer=keras.initializers.TruncatedNormal(stddev=0.2),
        )

    def call(self, scores):
        tokens = self.window * self.window
        bias = keras.ops.take(self.table, self._index, axis=0)  # (T*T, heads)
        bias = keras.ops.transpose(keras.ops.reshape(bias, (tokens, tokens, self.heads)), (2, 0, 1))
        return scores + bias

    def get_config(self):
        return {**super().get_config(), "window": self.window, "heads": self.heads}


def tiny_vit(classes: int = 10, seed: int = 0, dim: int = 16, heads: int = 2, patch: int = 2) -> keras.Model:
    """ViT: a patch-embedding Conv2D, one pre-norm encoder block (LayerNormalization, MultiHeadAttention, GELU MLP,
    residual Adds), a final LayerNormalization, mean-pooled tokens and a dense class head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1), name="x")
    x = layers.Conv2D(dim, patch, strides=patch, name="patch_embed")(inputs)
    tokens = (8 // patch) ** 2
    x = layers.Reshape((tokens, dim), name="tokens")(x)
    y = layers.LayerNormalization(name="norm1")(x)
    y = layers.MultiHeadAttention(num_heads=heads, key_dim=dim // heads, name="attn")(y, y)
    x = layers.Add(name="add1")([x, y])
    y = layers.LayerNormalization(name="norm2")(x)
    y = layers.Dense(2 * dim, activation="gelu", name="mlp_fc1")(y)
    y = layers.Dense(dim, name="mlp_fc2")(y)
    x = layers.Add(name="add2")([x, y])
    x = layers.LayerNormalization(name="norm")(x)
    x = layers.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(classes, name="head")(x), name="tiny_vit")


def _split_heads(x, windows: int, tokens: int, heads: int, name: str):
    # (windows, tokens, heads * d) -> (windows, heads, tokens, d)
    x = layers.Reshape((windows, tokens, heads, -1), name=f"{name}_heads")(x)
    return layers.Permute((1, 3, 2, 4), name=f"{name}_heads_first")(x)


def tiny_swin(classes: int = 10, seed: int = 0, dim: int = 16, heads: int = 2, window: int = 2) -> keras.Model:
    """Swin: a patch-embedding Conv2D to a 4x4 grid, one windowed attention block (window partition by Reshape /
    Permute, explicit Dense q, k, v, scores by `keras.ops.einsum` plus a relative position bias, softmax, `@` with
    the values, output projection, window merge), residual Adds, a GELU MLP, pooled dense class head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1), name="x")
    x = layers.Conv2D(dim, 2, strides=2, name="patch_embed")(inputs)  # (4, 4, dim)
    size = 4
    grid, windows, tokens = size // window, (size // window) ** 2, window * window
    y = layers.LayerNormalization(name="norm1")(x)
    # Window partition: (H, W, C) -> (H/w, w, W/w, w, C) -> (H/w, W/w, w, w, C) -> (windows, tokens, C).
    y = layers.Reshape((grid, window, grid, window, dim), name="partition_split")(y)
    y = layers.Permute((1, 3, 2, 4, 5), name="partition_order")(y)
    y = layers.Reshape((windows, tokens, dim), name="partition")(y)
    q = _split_heads(layers.Dense(dim, name="q")(y), windows, tokens, heads, "q")
    k = _split_heads(layers.Dense(dim, name="k")(y), windows, tokens, heads, "k")
    v = _split_heads(layers.Dense(dim, name="v")(y), windows, tokens, heads, "v")
    q = layers.Rescaling((dim // heads) ** -0.5, name="q_scale")(q)
    scores = keras.ops.einsum("bnhqd,bnhkd->bnhqk", q, k)
    scores = RelativePositionBias(window, heads, name="relative_position_bias")(scores)
    probabilities = layers.Softmax(axis=-1, name="attn_softmax")(scores)
    context = probabilities @ v  # (windows, heads, tokens, d)
    context = layers.Permute((1, 3, 2, 4), name="context_tokens_first")(context)
    context = layers.Reshape((windows, tokens, dim), name="context")(context)
    y = layers.Dense(dim, name="proj")(context)
    # Window merge: the inverse of the partition.
    y = layers.Reshape((grid, grid, window, window, dim), name="merge_split")(y)
    y = layers.Permute((1, 3, 2, 4, 5), name="merge_order")(y)
    y = layers.Reshape((size, size, dim), name="merge")(y)
    x = layers.Add(name="add1")([x, y])
    y = layers.LayerNormalization(name="norm2")(x)
    y = layers.Dense(2 * dim, activation="gelu", name="mlp_fc1")(y)
    y = layers.Dense(dim, name="mlp_fc2")(y)
    x = layers.Add(name="add2")([x, y])
    x = layers.LayerNormalization(name="norm")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(classes, name="head")(x), name="tiny_swin")
