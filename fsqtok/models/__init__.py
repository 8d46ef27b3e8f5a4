"""The networks on top of the tokens (Flax linen modules and their pure helpers).

* `lm` -- `TransformerLM`, the decoder-only language model, and its key/value cache.
* `embeddings` -- the LM's token embeddings and output heads, looked up by name.
* `bespoke` -- embeddings with a width per frequency bucket.
* `fuser` -- the contextual fuser (a token's vector from its bytes and neighbours).
* `generate` -- sampling (temperature, top-k, top-p, EOS).
* `classifier` -- sequence classification and verbalizers on the LM.
* `soft_prompt` -- prompt tuning of a frozen LM.
* `masking` -- BERT-style masking for masked-LM losses.
"""
