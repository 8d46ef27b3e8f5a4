"""The codec: strings of bytes <-> FSQ codes.

* `fsq` -- Finite Scalar Quantization, the straight-through quantizer.
* `model` -- the auto-encoder: char-CNN encoder -> FSQ -> decoder (`Codec`).
* `evaluate` -- reconstruction accuracy, exact matches, code use and collisions.
* `memorize` -- the decoder learning a vocabulary's assigned codes by heart.

Its training phase is `fsqtok.train.recon`.
"""
