"""The phase-1 codec: char-CNN encoder -> FSQ -> deconvolutional decoder.

A piece (1..L bytes) becomes one FSQ code; the decoder predicts, per position, one of
256 bytes or the END symbol that says where the piece stops.
"""
from __future__ import annotations

import math
from typing import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from fsqtok.codec.fsq import FSQ

END = 256  # the decoder's extra symbol: "the piece stops here"
NUM_SYMBOLS = 257


def length_mask(lengths_B: jax.Array, max_len: int) -> jax.Array:
  return jnp.arange(max_len)[None, :] < lengths_B[:, None]


class Encoder(nn.Module):
  """Bytes [B, L] + lengths [B] -> unbounded latents [B, num_dims]."""

  num_dims: int
  embed_dim: int = 64
  channels: Sequence[int] = (128, 256, 256)
  strides: Sequence[int] = (1, 2, 2)
  kernel_size: int = 3
  pooling: str = "mean"  # "mean" (masked average) or "flatten" (keeps positions)
  mlp_dim: int = 0
  position_embedding: bool = True

  @nn.compact
  def __call__(self, bytes_BxL: jax.Array, lengths_B: jax.Array) -> jax.Array:
    chex.assert_rank(bytes_BxL, 2)
    _, max_len = bytes_BxL.shape
    mask_BxL = length_mask(lengths_B, max_len)
    x_BxLxE = nn.Embed(256, self.embed_dim, name="byte_embed")(bytes_BxL.astype(jnp.int32))
    if self.position_embedding:
      x_BxLxE = x_BxLxE + self.param("pos_embed", nn.initializers.normal(0.02),
                                     (max_len, self.embed_dim))
    x = x_BxLxE * mask_BxL[..., None]
    mask = mask_BxL
    for i, (ch, stride) in enumerate(zip(self.channels, self.strides)):
      x = nn.gelu(nn.Conv(ch, (self.kernel_size,), strides=(stride,), padding="SAME",
                          name=f"conv{i}")(x))
      # A downsampled position is valid if any position of its stride window is.
      mask = mask.reshape(mask.shape[0], -1, stride).any(-1)
      x = x * mask[..., None]
    if self.pooling == "mean":
      pooled = x.sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1)
    elif self.pooling == "flatten":
      pooled = x.reshape(x.shape[0], -1)
    else:
      raise ValueError(f"Unknown encoder pooling {self.pooling!r}: 'mean' or 'flatten'.")
    if self.mlp_dim:
      pooled = nn.gelu(nn.Dense(self.mlp_dim, name="mlp")(pooled))
    return nn.Dense(self.num_dims, name="to_latent")(pooled)


def fourier_features(codes_BxD: jax.Array, octaves: int) -> jax.Array:
  """The code and ``sin, cos(pi 2^k code)`` for k < ``octaves``: ``[B, D (1 + 2 octaves)]``.

  An MLP on the raw 8-number code must carve the grid into one region per string with
  smooth functions of few inputs, which it learns slowly; periodic features (Tancik et
  al. 2020) give the decoder more to separate grid points by, so it learns many strings
  by heart sooner (for the codec alone one octave was best on a 32k vocabulary, higher
  frequencies jolt the encoder; when the decoder then learns the assigned codes, three are
  best: docs/codec.md). Smooth in the code: the straight-through gradient still reaches the
  encoder, and it helps (stopping it through these features lost a quarter of the gain)."""
  if not octaves:
    return codes_BxD
  freqs = jnp.pi * 2.0 ** jnp.arange(octaves, dtype=codes_BxD.dtype)
  angles = (codes_BxD[..., None] * freqs).reshape(*codes_BxD.shape[:-1], -1)
  return jnp.concatenate([codes_BxD, jnp.sin(angles), jnp.cos(angles)], axis=-1)


class Decoder(nn.Module):
  """Codes [B, num_dims] -> logits [B, L, 257] (256 bytes + END)."""

  max_len: int = 16
  channels: Sequence[int] = (256, 128, 64)
  strides: Sequence[int] = (2, 2, 1)
  kernel_size: int = 3
  mlp_dim: int = 0
  stem_channels: int = 64  # per-position width of the stem when there is no deconv
  fourier_octaves: int = 0  # see `fourier_features`; 0 = the code as it is

  @nn.compact
  def __call__(self, codes_BxD: jax.Array) -> jax.Array:
    start_len = self.max_len // math.prod(self.strides)
    width = self.channels[0] if self.channels else self.stem_channels
    x = fourier_features(codes_BxD, self.fourier_octaves)
    if self.mlp_dim:
      x = nn.gelu(nn.Dense(self.mlp_dim, name="mlp")(x))
    x = nn.gelu(nn.Dense(start_len * width, name="stem")(x))
    x = x.reshape(x.shape[0], start_len, width)
    for i, (ch, stride) in enumerate(zip(self.channels, self.strides)):
      x = nn.gelu(nn.ConvTranspose(ch, (self.kernel_size,), strides=(stride,),
                                   padding="SAME", name=f"deconv{i}")(x))
    return nn.Dense(NUM_SYMBOLS, name="to_logits")(x)


class Codec(nn.Module):
  """Encoder, FSQ and decoder; ``__call__`` returns (logits, codes)."""

  levels: Sequence[int] = (8, 8, 8, 8, 8, 5, 5, 5)
  max_len: int = 16
  embed_dim: int = 64
  enc_channels: Sequence[int] = (128, 256, 256)
  enc_strides: Sequence[int] = (1, 2, 2)
  dec_channels: Sequence[int] = (256, 128, 64)
  dec_strides: Sequence[int] = (2, 2, 1)
  kernel_size: int = 3
  pooling: str = "mean"
  enc_mlp_dim: int = 0
  dec_mlp_dim: int = 0
  position_embedding: bool = True
  dec_fourier_octaves: int = 0

  @property
  def fsq(self) -> FSQ:
    return FSQ.from_levels(self.levels)

  def setup(self):
    for side in ("enc", "dec"):  # one stride per convolution
      channels, strides = getattr(self, f"{side}_channels"), getattr(self, f"{side}_strides")
      if len(channels) != len(strides):
        raise ValueError(f"model.{side}_channels={tuple(channels)} and model.{side}_strides="
                         f"{tuple(strides)} must have one entry per layer (the same length).")
    for name, strides in (("enc_strides", self.enc_strides), ("dec_strides", self.dec_strides)):
      if self.max_len % math.prod(strides):
        raise ValueError(f"model.max_len={self.max_len} must be divisible by the product "
                         f"of model.{name}={tuple(strides)}.")
    self.encoder = Encoder(
        num_dims=len(self.levels), embed_dim=self.embed_dim, channels=self.enc_channels,
        strides=self.enc_strides, kernel_size=self.kernel_size, pooling=self.pooling,
        mlp_dim=self.enc_mlp_dim, position_embedding=self.position_embedding)
    self.decoder = Decoder(max_len=self.max_len, channels=self.dec_channels,
                           strides=self.dec_strides, kernel_size=self.kernel_size,
                           mlp_dim=self.dec_mlp_dim, stem_channels=self.embed_dim,
                           fourier_octaves=self.dec_fourier_octaves)

  def encode(self, bytes_BxL: jax.Array, lengths_B: jax.Array) -> jax.Array:
    """Quantized codes [B, num_dims] on the FSQ grid, values in [-1, 1]."""
    return self.fsq.quantize(self.encoder(bytes_BxL, lengths_B))

  def decode(self, codes_BxD: jax.Array) -> jax.Array:
    return self.decoder(codes_BxD)

  def __call__(self, bytes_BxL: jax.Array, lengths_B: jax.Array):
    codes_BxD = self.encode(bytes_BxL, lengths_B)
    return self.decode(codes_BxD), codes_BxD


def codec_from_config(model_config) -> Codec:
  """Builds the codec from a ``config.model`` ConfigDict (every size comes from it)."""
  c = model_config
  return Codec(levels=tuple(c.levels), max_len=c.max_len, embed_dim=c.embed_dim,
               enc_channels=tuple(c.enc_channels), enc_strides=tuple(c.enc_strides),
               dec_channels=tuple(c.dec_channels), dec_strides=tuple(c.dec_strides),
               kernel_size=c.kernel_size, pooling=c.pooling, enc_mlp_dim=c.enc_mlp_dim,
               dec_mlp_dim=c.dec_mlp_dim, position_embedding=c.position_embedding,
               # absent from the configs of codecs saved before it existed
               dec_fourier_octaves=c.get("dec_fourier_octaves", 0))


def targets_and_weights(bytes_BxL: jax.Array, lengths_B: jax.Array):
  """Targets: the bytes, then END right after the last byte; weights: those positions."""
  _, max_len = bytes_BxL.shape
  pos = jnp.arange(max_len)[None, :]
  targets = jnp.where(pos < lengths_B[:, None], bytes_BxL.astype(jnp.int32), END)
  weights = (pos <= lengths_B[:, None]).astype(jnp.float32)
  return targets, weights


def greedy_decode(logits_BxLxS: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Argmax bytes and the decoded length (first END, or L if none)."""
  pred = jnp.argmax(logits_BxLxS, axis=-1)
  is_end = pred == END
  max_len = pred.shape[1]
  lengths = jnp.where(is_end.any(1), jnp.argmax(is_end, axis=1), max_len)
  bytes_out = jnp.where(jnp.arange(max_len)[None] < lengths[:, None], pred, 0)
  return bytes_out.astype(jnp.uint8), lengths.astype(jnp.int32)
