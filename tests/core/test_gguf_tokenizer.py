"""GGUF tokenizer metadata that llama.cpp reads as intended: `tokenizer.ggml.pre` named as
llama.cpp's converter names it (or refused), the vocabulary, merges, special ids, BOS/EOS flags
and chat template carried over, and `--verify` comparing the GGUF's own tokenization (llama.cpp's
rules on the file's vocab) with the source model's tokenizer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from core.cli import main
from core.export.gguf import export_gguf
from core.export.gguf_check import open_gguf
from core.export.gguf_tokenizer import (
    CHECK_TEXT,
    gguf_vocab,
    rules_tokenizer,
    structural_pre_tokenizer,
)
from core.export.verify import TOKENIZER_CHECK_TEXT, VerifyError, check_gguf_tokenization

gguf = pytest.importorskip("gguf")

_TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                   "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                   "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                   "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")


def _fields(path: Path) -> dict:
    reader = open_gguf(path)
    return {k: f.contents() for k, f in reader.fields.items()}


def _vocab_only_copy(src: Path, out: Path, pre: str) -> Path:
    """A GGUF holding only `src`'s tokenizer, with `pre` as its pre-tokenizer name."""
    tokens, merges, _, types = gguf_vocab(open_gguf(src))
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def demo_gguf(smollm2_dir, tmp_path_factory):
    return export_gguf(smollm2_dir, tmp_path_factory.mktemp("demo-gguf") / "smol-Q8_0.gguf", "Q8_0")


def test_demo_export_writes_the_original_ggufs_tokenizer_metadata(demo_gguf):
    from core.demo import gguf_path

    ours, original = _fields(demo_gguf), _fields(gguf_path())
    assert original["tokenizer.ggml.pre"] == "smollm"
    for key in _TOKENIZER_KEYS:
        assert ours[key] == original[key], key
    assert ours["tokenizer.ggml.add_eos_token"] is False


def test_gguf_tokenization_agrees_with_the_source_tokenizer(demo_gguf, smollm2_dir):
    how = check_gguf_tokenization(demo_gguf, smollm2_dir)
    assert "smollm" in how or "llama.cpp" in how


def test_a_default_pre_tokenizer_is_caught_by_the_tokenization_check(demo_gguf, smollm2_dir, tmp_path):
    """What Quantscope wrote before: `default` splits " =", " +" and digit runs differently."""
    wrong = _vocab_only_copy(demo_gguf, tmp_path / "default.gguf", "default")
    with pytest.raises(VerifyError, match=r"tokenize text differently.*first difference at token \d+"):
        check_gguf_tokenization(wrong, smollm2_dir)
    right = _vocab_only_copy(demo_gguf, tmp_path / "smollm.gguf", "smollm")
    check_gguf_tokenization(right, smollm2_dir)


def test_smollm_rules_reproduce_the_model_tokenizer_line_by_line_on_python_docs(demo_gguf, smollm2_dir):
    """llama.cpp's smollm rules vs the HF tokenizer on Python's docs, per line: the original GGUF
    agrees on 99.4 % of the lines with llama.cpp itself; `default` on about half."""
    from pydoc_data.topics import topics

    from core.loader import load_tokenizer

    hf = load_tokenizer(smollm2_dir)
    tokens, merges, _, types = gguf_vocab(open_gguf(demo_gguf))
    lines = [ln for k in sorted(topics)[:20] for ln in topics[k].split("\n") if ln.strip()]
    want = [hf(ln, add_special_tokens=False)["input_ids"] for ln in lines]
    share = {}
    for pre in ("smollm", "default"):
        rules = rules_tokenizer(tokens, merges, pre, types)
        share[pre] = sum(rules.encode(ln, add_special_tokens=False).ids == w for ln, w in zip(lines, want)) / len(lines)
    assert share["smollm"] >= 0.98
    assert share["default"] <= 0.75


def _train(pre_tokenizer, normalizer=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.conftest import _training_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_training_text(), trainer=trainer)
    return tok


def _standard_pre_tokenizers():
    from tokenizers import Regex, normalizers, pre_tokenizers

    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    qwen2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return {
        "gpt-2": (pre_tokenizers.ByteLevel(add_prefix_space=False), None),
        "smollm": (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False)]), None),
        "llama-bpe": (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(llama3), behavior="isolated"), byte_level]),
                      None),
        "qwen2": (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(qwen2), behavior="isolated"), byte_level]),
                  normalizers.NFC()),
    }


@pytest.mark.parametrize("name", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_standard_pre_tokenizers_are_recognised_and_their_rules_match(name):
    """tokenizer.json structure → llama.cpp name, and llama.cpp's regexes for that name split the
    check texts exactly as the HF pre-tokenizer does (same ids from the same vocab and merges)."""
    pre, normalizer = _standard_pre_tokenizers()[name]
    tok = _train(pre, normalizer)
    doc = json.loads(tok.to_str())
    assert structural_pre_tokenizer(doc) == name
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    rules = rules_tokenizer(tokens, merges, name, [1] * len(tokens))
    for text in (TOKENIZER_CHECK_TEXT, CHECK_TEXT):
        assert rules.encode(text).ids == tok.encode(text).ids


def test_unrecognised_structures_are_not_guessed():
    assert structural_pre_tokenizer({"pre_tokenizer": {"type": "Whitespace"}}) is None
    assert structural_pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True}}) is None
    assert structural_pre_tokenizer({"normalizer": {"type": "Lowercase"},
                                     "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) is None


def test_tiny_byte_level_model_exports_as_gpt2(tiny_llama_dir, tmp_path):
    out = export_gguf(tiny_llama_dir, tmp_path / "t.gguf", "F16")
    f = _fields(out)
    assert f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert "gpt-2" in check_gguf_tokenization(out, tiny_llama_dir)


def test_unknown_pre_tokenizer_is_refused_with_exit_2_and_nothing_written(tiny_llama_dir, tmp_path, capsys):
    folder = tmp_path / "odd"
    shutil.copytree(tiny_llama_dir, folder)
    doc = json.loads((folder / "tokenizer.json").read_text())
    doc["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Punctuation", "behavior": "Isolated"}, {"type": "ByteLevel", "add_prefix_space": False,
                                                          "trim_offsets": True, "use_regex": True}]}
    (folder / "tokenizer.json").write_text(json.dumps(doc))
    out = tmp_path / "odd.gguf"
    code = main(["export", "--model", str(folder), "--format", "gguf", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert "llama.cpp would pre-tokenize" in err and str(folder / "tokenizer.json") in err
    assert not out.exists() and not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".odd*"))


def test_bos_added_by_the_post_processor_sets_add_bos(tiny_llama_dir, tmp_path):
    from tokenizers.processors import TemplateProcessing

    from core.loader import load_tokenizer

    folder = tmp_path / "bos"
    shutil.copytree(tiny_llama_dir, folder)
    tok = load_tokenizer(folder)
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.save_pretrained(folder)
    f = _fields(export_gguf(folder, tmp_path / "bos.gguf", "F16"))
    assert f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.ggml.bos_token_id"] == bos


def test_cli_verify_reports_the_tokenizer_check(tiny_llama_dir, tmp_path, capsys):
    pytest.importorskip("accelerate")
    out = tmp_path / "v.gguf"
    code = main(["export", "--model", str(tiny_llama_dir), "--format", "gguf", "--preset", "F16", "--out", str(out),
                 "--verify", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)["verify"]
    assert report["ok"] is True and "gpt-2" in report["tokenizer_check"]
