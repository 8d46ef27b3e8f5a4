"""Makes tests/data/tiny_bert: a random 2-layer BERT saved by Hugging Face transformers,
its tokenizer, and the hidden states PyTorch computes for two sentences (the reference
the JAX forward of fsqtok.studies.reference_encoder is tested against).

Not part of the project's environment (it needs PyTorch and transformers; made with
torch 2.13.0 CPU and transformers 5.25.0 in a separate venv):

  python tests/data/tiny_bert/make_fixture.py tests/data/tiny_bert
"""
import json, sys, numpy as np, torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel
out = sys.argv[1]
words = ("they pulled the canoe up on bank he sat of river cashed a check at that holds "
         "mortgage plant needs water daily closed built power it was trick no word here").split()
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words)), "##s", "##ed", ","]
v = {w: i for i, w in enumerate(vocab)}
tok = Tokenizer(models.WordPiece(v, unk_token="[UNK]"))
tok.normalizer = normalizers.BertNormalizer(lowercase=True)
tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
tok.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]", special_tokens=[("[CLS]", v["[CLS]"]), ("[SEP]", v["[SEP]"])])
tok.enable_padding(length=24)  # as some checkpoints ship it: the loader must undo it
tok.save(f"{out}/tokenizer.json")
torch.manual_seed(0)
cfg = BertConfig(vocab_size=len(vocab), hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=16, max_position_embeddings=32, initializer_range=0.5,
                 hidden_act="gelu")
model = BertModel(cfg, add_pooling_layer=False).eval()
model.save_pretrained(out, safe_serialization=True)
tok.no_padding()
sents = ["he sat on the banks of the river", "that bank holds the mortgage"]
enc = [tok.encode(s).ids for s in sents]
width = max(map(len, enc))
ids = np.zeros((2, width), np.int64); mask = np.zeros((2, width), np.int64)
for r, x in enumerate(enc):
  ids[r, :len(x)], mask[r, :len(x)] = x, 1
with torch.no_grad():
  h = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
np.savez(f"{out}/expected.npz", ids=ids.astype(np.int32), mask=mask.astype(bool),
         last_hidden=h.numpy())
print(ids, h.shape)
