"""The benchmark scripts run end to end on tiny settings (numbers are not checked here:
benchmarks measure, tests only keep the scripts working)."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, mlp_codec, tiny_recon_config, xla_flags
from fsqtok.train import recon

pytestmark = pytest.mark.slow


def _run(script, *args):
  env = {**os.environ, "XLA_FLAGS": xla_flags()}
  proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", script), *args],
                        capture_output=True, text=True, cwd=REPO, env=env, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_bench_codec_prints_a_table():
  out = _run("bench_codec.py", "--configs=tiny,source", "--batch_size=16", "--steps=2",
             "--infer_batch_size=64")
  assert "| tiny |" in out and "| source |" in out and "1.00x" in out


def test_bench_loop_overhead_prints_a_table():
  out = _run("bench_loop_overhead.py", "--configs=noop,tiny", "--steps=5", "--log_every=5",
             "--docs=20")
  assert "| noop | 1024 |" in out and "| codec recon:tiny | 32 |" in out


def test_bench_lm_loaders_prints_a_table(tmp_path):
  out = _run("bench_lm_loaders.py", "--docs=100", "--batches=3", "--batch_size=4",
             "--seq_len=16", "--threads=0,2", f"--json_out={tmp_path / 'loaders.json'}")
  assert "| epochs |" in out and "| grain, store, 2 threads |" in out
  saved = json.loads((tmp_path / "loaders.json").read_text())
  assert set(saved["seconds_per_batch"]) == {"epochs", "grain, store, 0 threads",
                                              "grain, store, 2 threads"}


def test_bench_fuser_cost_prints_a_table_with_generation_rows(tmp_path):
  out = _run("bench_fuser_cost.py", "--sizes=small", "--vocab_size=600", "--batch_size=2",
             "--seq_len=16", "--repeats=1", "--gen_tokens=8", "--embeddings=per_id",
             f"--out={tmp_path / 'cost.json'}")
  assert "| generation | fuser per_id, all tokens |" in out
  rows = json.loads((tmp_path / "cost.json").read_text())["sizes"]["small"]["rows"]
  assert {k.split(" | ")[1] for k in rows} == {"static table", "fuser per_id, all tokens"}
  gen = rows["generation | fuser per_id, all tokens"]
  assert gen["tokens"] == 2 * (8 - 2) and gen["memory_ratio"] == rows[
      "decode | fuser per_id, all tokens"]["memory_ratio"]
  assert rows["generation | static table"]["time_ratio"] == 1.0
  assert rows["forward | static table"]["min_time_ratio"] == 1.0
  assert all(r["min_seconds_per_token"] <= r["seconds_per_token"]
             for k, r in rows.items() if not k.startswith("generation"))


def test_bench_corpus_shares_reads_each_hosts_segments_alone(doc_files):
  out = _run("bench_corpus_shares.py", f"--file={doc_files / 'doc000.txt'}", "--copies=40",
             "--segment_bytes=512", "--max_hosts=3")
  rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in out.splitlines()
          if line.startswith("| share") or line.startswith("| whole")}
  chars = {name: int(r[1].replace(",", "")) for name, r in rows.items()}
  read = {name: int(r[2].split(" ")[0].replace(",", "")) for name, r in rows.items()}
  assert len(rows) == 1 + 2 + 3
  for n in (2, 3):  # the shares hold the whole, each reading about its own part
    assert sum(chars[f"share {i} of {n}"] for i in range(n)) == chars["whole (1 host)"]
    assert all(read[f"share {i} of {n}"] < 0.75 * read["whole (1 host)"] for i in range(n))


def test_compile_full_compiles_sharded_steps_for_a_pod(tmp_path):
  out = _run("compile_full.py", "--config_arg=tiny", "--devices", "4", "--phases=joint",
             "--shardings=fsdp_tp2", "--run_steps=2", f"--json_out={tmp_path / 'rows.json'}")
  assert "| joint | fsdp_tp2 | 2 x 2 |" in out
  rows = json.loads((tmp_path / "rows.json").read_text())
  assert [r["fits_16gb"] for r in rows] == [True]
  assert all(r["xla_flops_per_device"] > 0 and r["memory_bytes_per_device"] > 0 for r in rows)
  # --run_steps ran the compiled step on random arrays: a finite loss and a throughput;
  # no MFU on a CPU (its peak is unknown).
  (row,) = rows
  assert np.isfinite(row["measured_loss"]) and row["measured_per_second"] > 0
  assert row["unit"] == "tokens" and row["mfu"] is None and "| n/a |" in out


def test_compile_full_reads_its_flags_in_both_forms_and_refuses_unknown_shardings():
  spec = importlib.util.spec_from_file_location(
      "compile_full", os.path.join(REPO, "experiments", "compile_full.py"))
  compile_full = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(compile_full)
  for argv in (["x", "--devices=16"], ["x", "--devices", "16", "--phases=lm"]):
    assert compile_full.flag_value(argv, "devices", "8") == "16"
  assert compile_full.flag_value(["x", "--devices"], "devices", "8") == "8"
  for name, (fsdp, tp) in {"replicated": (False, 1), "fsdp": (True, 1), "tp4": (False, 4),
                           "fsdp_tp2": (True, 2)}.items():
    config = compile_full.sharding_of(name)
    assert (config.fsdp, config.model_parallel) == (fsdp, tp), name
  for name in ("fsdp_typo", "tp0", "tp", "fsdptp2", "replicated2"):
    with pytest.raises(ValueError, match="Unknown sharding"):
      compile_full.sharding_of(name)


def _tiny_codec_args(doc_files, tmp_path):
  """Trains a tiny codec on the scripts' default split; their flags for it."""
  config = tiny_recon_config(f"files:{doc_files}/*.txt", str(tmp_path / "tfds"))
  config.data.val_fraction, config.data.block_chars = 0.05, 2048  # the scripts' split
  config.train.num_steps = 20
  recon.train_recon(config, str(tmp_path / "codec"))
  return [f"--corpora=files:{doc_files}/*.txt", f"--fsqtok_workdirs={tmp_path / 'codec'}",
          "--fsqtok_config=tiny", f"--tfds_data_dir={tmp_path / 'tfds'}", "--vocab_size=600"]


def test_bench_tokenizer_prints_a_table(doc_files, tmp_path):
  names = ("fsqtok", "fsqtok-phrases", "fsqtok-filled", "fsqtok-gpt2", "fsqtok-blank",
           "hf-bpe-bytelevel", "sentencepiece-unigram", "raw-bytes")
  out = _run("bench_tokenizer.py", *_tiny_codec_args(doc_files, tmp_path), "--repeats=1",
             f"--tokenizers={','.join(names)}", "--phrase_fraction=0,0.05")
  for name in names:
    if name != "fsqtok-phrases":  # one row per --phrase_fraction instead
      assert f"| {name} |" in out
  # No phrases is fsqtok's default: the same tokens as its own row.
  row = lambda name: out[out.index(f"| {name} |"):].splitlines()[0].split(" | ")
  assert row("fsqtok-phrases@0")[1:4] == row("fsqtok")[1:4]
  assert "| fsqtok-phrases@0.05 |" in out
  assert "| raw-bytes | 256 | 1.000 | 100.0% |" in out


# `conftest.mlp_codec` on an experiment's command line
_MLP_CODEC_ARGS = ("--config.model.enc_channels=()", "--config.model.enc_strides=()",
                   "--config.model.dec_channels=()", "--config.model.dec_strides=()",
                   "--config.model.enc_mlp_dim=32", "--config.model.dec_mlp_dim=32")


def test_compare_tokenizers_lm_prints_a_table(doc_files, tmp_path):
  from configs import compare_lm  # pylint: disable=g-import-not-at-top
  config = mlp_codec(compare_lm.get_config("tiny"))
  config.data.source = f"files:{doc_files}/*.txt"
  config.data.tfds_data_dir = str(tmp_path / "tfds")
  recon.train_recon(config, str(tmp_path / "codec"))
  out = _run("compare_tokenizers_lm.py", "--config=configs/compare_lm.py:tiny",
             *_MLP_CODEC_ARGS, f"--config.corpora=docs=files:{doc_files}/*.txt",
             f"--config.codec_workdirs=docs={tmp_path / 'codec'}",
             f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
             "--config.variants=('fsqtok-factorized-vocab-flat50','fsqtok-codec',"
             "'hf-bpe-ranked-vocab-flat50')",
             "--config.budgets=('flops',)", f"--workdir={tmp_path / 'out'}")
  assert "| docs | 400 | flops | fsqtok-factorized-vocab-flat50 | 400 (" in out
  assert "| docs | 400 | flops | fsqtok-codec | 400 (" in out
  assert "| docs | 400 | flops | hf-bpe-ranked-vocab-flat50 | 400 (" in out
  rows = json.loads((tmp_path / "out" / "results.json").read_text())
  assert [r["head_flat_tokens"] for r in rows] == [50, 0, 50]
  assert all(np.isfinite(r["bits_per_byte"]) for r in rows)
  assert (tmp_path / "out" / "bpb_vs_bytes.png").exists()
  by_frequency = out[out.index("Held-out bits per token by how often"):].splitlines()
  assert sum(l.startswith("| docs | 400 | flops |") for l in by_frequency) == 3
  merged = _run("compare_tokenizers_lm.py", "--config=configs/compare_lm.py:tiny",
                f"--merge={tmp_path / 'out'}", f"--workdir={tmp_path / 'merged'}")
  assert merged.strip().splitlines()[-4:] == out.strip().splitlines()[-4:]
  assert (tmp_path / "merged" / "bpb_vs_bytes.png").exists()


def test_compare_tokenizers_lm_data_stats_and_a_bad_variant(doc_files, tmp_path):
  """``--data_stats_only`` (every tokenizer's data, no LM; fsqtok's vocabulary needs no
  codec), and a variant name that cannot be."""
  # (a subprocess: loading the script here would define its absl flags in this process)
  bad = subprocess.run([sys.executable, os.path.join(REPO, "experiments",
                                                     "compare_tokenizers_lm.py"),
                        "--config=configs/compare_lm.py:tiny", "--config.variants=('hf-bpe-flat9',)",
                        f"--workdir={tmp_path / 'bad'}"], capture_output=True, text=True,
                       cwd=REPO, check=False)
  assert bad.returncode != 0 and "follows a factorized variant" in bad.stderr
  stats = _run("compare_tokenizers_lm.py", "--config=configs/compare_lm.py:tiny",
               f"--config.corpora=docs=files:{doc_files}/*.txt",
               f"--config.data.tfds_data_dir={tmp_path / 'tfds'}", "--data_stats_only",
               f"--workdir={tmp_path / 'out'}")
  rows = [l for l in stats.splitlines() if l.startswith("| docs | 400 |")]
  assert [r.split(" | ")[2] for r in rows] == [
      "hf-bpe", "sp-unigram", "raw-bytes", "fsqtok", "fsqtok-fewest", "fsqtok-gpt2"]
  # raw bytes: every token is one byte (all but the [EOS] targets)
  assert float(rows[2].split(" | ")[5].rstrip("%")) > 99.0
  # the same work directory with other tokenizer settings: refused, not reused
  again = subprocess.run([sys.executable, os.path.join(REPO, "experiments",
                                                       "compare_tokenizers_lm.py"),
                          "--config=configs/compare_lm.py:tiny",
                          f"--config.corpora=docs=files:{doc_files}/*.txt",
                          f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
                          "--config.tokenizer.unused=fill", "--data_stats_only",
                          f"--workdir={tmp_path / 'out'}"], capture_output=True, text=True,
                         cwd=REPO, check=False)
  assert again.returncode != 0 and "was made with other settings (tokenizer differ)" in \
      again.stderr


def test_granularity_ablation_prints_a_table(doc_files, tmp_path):
  out = _run("granularity_ablation.py", *_tiny_codec_args(doc_files, tmp_path))
  for row in ("pieces", "pieces + parts", "pieces + spans", "all (default)"):
    assert f"| {row} |" in out


def test_make_scale_corpora_repeats_and_replaces_words(doc_files, tmp_path):
  docs = "".join(p.read_text(encoding="utf-8") for p in sorted(doc_files.glob("*.txt")))
  (tmp_path / "docs.txt").write_text(docs[:20_000], encoding="utf-8")
  (tmp_path / "books.txt").write_text(docs[20_000:30_000], encoding="utf-8")
  _run("make_scale_corpora.py", f"--dir={tmp_path}", "--sizes_mb=0.05", "--distinct_mb=0.04")
  source = (docs[:30_000]).encode("utf-8")
  repeated = (tmp_path / "scale0.05.txt").read_bytes()
  assert repeated.startswith(source + source[:1000]) and repeated.endswith(b"\n")
  assert len(repeated) <= 50_000
  distinct = (tmp_path / "distinct0.04.txt").read_text(encoding="utf-8").split("\n")[0].split(" ")
  original = docs.split("\n")[0].split(" ")
  assert len(distinct) == len(original) and distinct[0] == original[0]
  assert all(w.isalpha() and w.islower() for w in distinct[2::3])


def test_bench_tokenizer_scale_prints_a_table(doc_files, tmp_path):
  source = tmp_path / "corpus.txt"
  source.write_text("".join(p.read_text(encoding="utf-8")
                            for p in sorted(doc_files.glob("*.txt"))[:80]), encoding="utf-8")
  out = _run("bench_tokenizer_scale.py", f"--sources={source}", "--sizes_mb=0.3,0.6",
             "--tokenizers=fsqtok,fsqtok-sampled,hf-bpe,sp-unigram", "--vocab_size=600",
             "--sample_mb=0.2", "--held_out_mb=0.05", "--sp_max_mb=0.4",
             f"--json_out={tmp_path / 'rows.json'}")
  for name in ("fsqtok", "fsqtok-sampled", "hf-bpe", "sp-unigram"):
    assert f"| {name} |" in out
  assert "| sp-unigram (sample of 0.4 MB) |" in out  # 0.6 MB > --sp_max_mb: its own sample
  assert out.count("| True |") == 8


def test_codec_exactness_variants_keep_each_fields_type():
  # in a fresh interpreter: the script defines absl flags that other tests' scripts share
  code = """
import pytest
from conftest import tiny_recon_config
from experiments import codec_exactness
config = tiny_recon_config("files:x", "")
codec_exactness.apply_overrides(config, "optim.learning_rate=1,train.num_steps=7,data.source=builtin")
assert config.optim.learning_rate == 1.0 and isinstance(config.optim.learning_rate, float)
assert config.train.num_steps == 7 and config.data.source == "builtin"
for variant in ("train.num_steps=0.5", "train.num_steps=True", "optim.learning_rate=True"):
  with pytest.raises(ValueError, match="give a value of that type"):
    codec_exactness.apply_overrides(tiny_recon_config("files:x", ""), variant)
print("ok")
"""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, check=False)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_codec_exactness_prints_a_row_per_variant(doc_files, tmp_path):
  out = _run("codec_exactness.py", "--config=tiny", f"--corpus=files:{doc_files}/*.txt",
             f"--tfds_data_dir={tmp_path / 'tfds'}", "--vocab_size=400", "--steps=10",
             "--variants=base;optim.learning_rate=1e-2", f"--workdir={tmp_path / 'runs'}",
             "--decoder_steps=20", "--decoder_rounds=2",
             f"--json_out={tmp_path / 'rows.json'}")
  assert "| base | 131 | 10 |" in out and "| optim.learning_rate=1e-2 | 131 | 10 |" in out
  import json  # pylint: disable=g-import-not-at-top
  rows = json.loads((tmp_path / "rows.json").read_text())
  assert [r["variant"] for r in rows] == ["base", "optim.learning_rate=1e-2"]
  assert all(0 <= r["exact_strings"] <= 1 for r in rows)
  assert all(0 <= r["assigned_exact_strings"] <= 1 and 0 <= r["decoder_exact_strings"] <= 1
             and r["decoder_steps"] == 20 for r in rows)
  assert all(1 <= len(r["decoder_rounds"]) <= 3
             and r["decoder_rounds_exact_strings"] >= r["decoder_exact_strings"] for r in rows)
  # the same work directory, another variant first: a run of its own, not base's again
  out = _run("codec_exactness.py", "--config=tiny", f"--corpus=files:{doc_files}/*.txt",
             f"--tfds_data_dir={tmp_path / 'tfds'}", "--vocab_size=400", "--steps=10",
             "--variants=optim.learning_rate=3e-2", f"--workdir={tmp_path / 'runs'}")
  assert "| optim.learning_rate=3e-2 | 131 | 10 |" in out
  assert len(list((tmp_path / "runs").glob("variant*"))) == 3


def test_make_corpora_slices_a_corpus_at_paragraphs_from_its_middle(tmp_path):
  """``write_slice``: the characters asked, from the first paragraph after the middle to
  the end of the paragraph there; a substring of the corpus, written whole."""
  spec = importlib.util.spec_from_file_location(
      "make_corpora", os.path.join(REPO, "experiments", "make_corpora.py"))
  make_corpora = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_corpora)
  text = "\n\n".join(f"paragraph {i}: " + "word " * (i % 7) for i in range(400)) + "\n"
  (tmp_path / "c.txt").write_text(text, encoding="utf-8")
  path = make_corpora.write_slice(str(tmp_path / "c.txt"), chars=1000)
  assert path == str(tmp_path / "c_1mb.txt")
  assert sorted(os.listdir(tmp_path)) == ["c.txt", "c_1mb.txt"]  # no temporary file left
  piece = (tmp_path / "c_1mb.txt").read_text(encoding="utf-8")
  start = text.index(piece)
  assert start > len(text) // 2 and text[start - 2:start] == "\n\n"
  assert piece.startswith("paragraph ") and piece.endswith("\n") and not piece.endswith("\n\n")
  assert text[start + len(piece)] == "\n" and 1000 < len(piece) < 1100
