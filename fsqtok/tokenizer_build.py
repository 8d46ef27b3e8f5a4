"""From a corpus to a saved tokenizer: train the codec, select the vocabulary, save.

The saved directory holds ``tokenizer.json`` (all that encoding and decoding need), the
codec's parameters and model config (``codec.msgpack``, ``codec_config.json``: the code
vectors of the tokens) and the codebook analysis (``vocab_report.json``).
"""
from __future__ import annotations

import json
from typing import Any

from flax import serialization

from fsqtok import recon
from fsqtok import sharding as sharding_lib
from fsqtok import vocab as vocab_lib
from fsqtok.tokenizer import DEFAULT_SPECIALS, Tokenizer


def train_tokenizer(config, workdir: str, vocab_size: int, out_dir: str
                    ) -> tuple[Tokenizer, dict[str, Any]]:
  """Trains (or resumes) the codec of ``config`` in ``workdir``, saves the tokenizer.

  ``vocab_size`` counts every id: specials, the 256 byte tokens and the learned strings.
  """
  learned = vocab_size - len(DEFAULT_SPECIALS) - 256
  if learned < 0:
    raise ValueError(f"vocab_size={vocab_size} is smaller than the {len(DEFAULT_SPECIALS)} "
                     f"special and 256 byte tokens every vocabulary has.")
  pieces = recon.load_pieces(config)
  recon.train_recon(config, workdir, pieces)
  model, params = recon.load_trained_codec(config, workdir)
  train_pieces, _ = pieces
  mesh = sharding_lib.data_mesh(config.train.num_devices)
  table, analysis = vocab_lib.build_code_vocabulary(
      model, params, train_pieces, learned, batch_size=config.train.eval_batch_size, mesh=mesh)
  tok = Tokenizer([s.decode("utf-8") for s in table.strings], codes=table.codes_K.tolist(),
                  max_piece_bytes=config.model.max_len)
  analysis = {**analysis, "requested_vocab_size": vocab_size, "vocab_size": len(tok),
              "source": config.data.source}
  tok.save(out_dir, extra_files={
      "codec.msgpack": serialization.to_bytes(params),
      "codec_config.json": json.dumps(config.model.to_dict(), indent=2).encode(),
      "vocab_report.json": json.dumps(analysis).encode(),
  })
  return tok, analysis
