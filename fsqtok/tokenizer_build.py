"""From a corpus to a saved tokenizer: train the codec on the candidates, select the
vocabulary among the exact ones for compression on the training texts, save.

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


def train_tokenizer(config, workdir: str, vocab_size: int, out_dir: str, *,
                    texts=None, pieces=None) -> tuple[Tokenizer, dict[str, Any]]:
  """Trains (or resumes) the codec of ``config`` in ``workdir``, saves the tokenizer.

  ``vocab_size`` counts every id: specials, the 256 byte tokens and the learned strings.
  ``texts`` / ``pieces``: the corpus split and its candidates, if the caller has them.
  """
  learned = vocab_size - len(DEFAULT_SPECIALS) - 256
  if learned < 0:
    raise ValueError(f"vocab_size={vocab_size} is smaller than the {len(DEFAULT_SPECIALS)} "
                     f"special and 256 byte tokens every vocabulary has.")
  texts = texts or recon.load_texts(config)
  pieces = pieces or recon.load_pieces(config, texts)
  recon.train_recon(config, workdir, pieces)
  model, params = recon.load_trained_codec(config, workdir)
  mesh = sharding_lib.data_mesh(config.train.num_devices)
  table, analysis = vocab_lib.build_code_vocabulary(
      model, params, pieces[0], texts[0], learned, batch_size=config.train.eval_batch_size,
      mesh=mesh, max_piece_bytes=config.model.max_len, progress=config.train.progress_bar)
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
