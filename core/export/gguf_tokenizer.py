"""Which llama.cpp pre-tokenizer a model's BPE tokenizer needs, and how llama.cpp tokenizes with a
GGUF's own vocabulary.

llama.cpp does not run tokenizer.json: it splits text with the regexes of the pre-tokenizer named
in `tokenizer.ggml.pre` and then applies the GGUF's merges. A wrong name tokenizes contractions,
digits and punctuation differently from the model's own tokenizer and costs perplexity silently.

`identify_pre_tokenizer` names it as llama.cpp's `convert_hf_to_gguf.py` does (the sha256 of
`str(token ids)` for its fixed check text, looked up among known tokenizers), and falls back to the
structure of tokenizer.json's pre_tokenizer for vocabularies the fingerprints do not know (a
fine-tune that added tokens, a tokenizer trained from scratch with a standard pre-tokenizer).
Anything else is refused: guessing would write a file llama.cpp misreads.

`gguf_token_ids` tokenizes text the way llama.cpp will read a GGUF: with `llama_cpp` when it is
importable, otherwise with llama.cpp's regexes for the file's pre-tokenizer and the file's own
tokens and merges (run by the `tokenizers` library's BPE).
"""
from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any

# llama.cpp's check text (convert_hf_to_gguf.py, get_vocab_base_pre): whitespace runs, emoji, digit
# runs, Khmer, Chinese, Cyrillic, quote and punctuation runs, contractions in mixed case.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 "
    "?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? "
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp's regexes per pre-tokenizer name (llama-vocab.cpp, llm_tokenizer_bpe), applied one
# after the other, each to the pieces the previous one left. Only names listed here are written.
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "gpt-2": (_GPT2,),
    "mpt": (_GPT2,),
    "olmo": (_GPT2,),
    "jais": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),
    "starcoder": (r"\p{N}", _GPT2),
    "refact": (r"\p{N}", _GPT2),
    "command-r": (r"\p{N}", _GPT2),
    "codeshell": (r"\p{N}", _GPT2),
    "exaone": (r"\p{N}", _GPT2),
    "llama-bpe": (_LLAMA3,),
    "dbrx": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "stablelm2": (_QWEN2,),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    # What llama.cpp falls back to for an unnamed pre-tokenizer (and what Quantscope wrote before it
    # identified them): kept to check such files, never written.
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
}

# llama.cpp treats a word that is already a whole token as that token, skipping the merges.
IGNORE_MERGES = frozenset({"llama-bpe"})

# sha256(str(tokenizer.encode(CHECK_TEXT))) → name, from llama.cpp's convert_hf_to_gguf.py (generated
# there by convert_hf_to_gguf_update.py from the reference tokenizers named in the comments).
FINGERPRINTS: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",  # falcon-7b
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "mpt",  # mpt-7b, OLMo-1.7-7B
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # starcoder2-3b
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",  # stablelm-2-zephyr-1_6b
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",  # Refact-1_6-base
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",  # c4ai-command-r-v01
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",  # dbrx-base
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B-Instruct
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",  # jais-13b
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",  # CodeShell-7B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M (and SmolLM2)
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",  # EXAONE-3.0-7.8B-Instruct
}


def fingerprint(tokenizer: Any) -> str:
    """llama.cpp's tokenizer fingerprint: sha256 of `str(ids)` for CHECK_TEXT, encoded as its
    converter does (`tokenizer.encode`, special tokens as the tokenizer adds them)."""
    return sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def _byte_level(step: dict, *, use_regex: bool) -> bool:
    return (step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == use_regex
            and not step.get("add_prefix_space", False))


def _split_pattern(step: dict) -> str | None:
    if step.get("type") != "Split" or str(step.get("behavior", "")).lower() != "isolated" or step.get("invert"):
        return None
    pattern = step.get("pattern") or {}
    return pattern.get("Regex") if isinstance(pattern, dict) else None


# tokenizer.json's Split regexes of the standard BPE tokenizers (as their authors wrote them) → name.
_HF_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def structural_pre_tokenizer(doc: dict) -> str | None:
    """The llama.cpp name whose regexes split text exactly as tokenizer.json `doc` does, or None.

    Recognised: ByteLevel with its GPT-2 regex alone ("gpt-2"); individual Digits then that
    ByteLevel ("smollm", the StarCoder/SmolLM family); the Llama 3 and Qwen2 Split regexes followed
    by a regex-free ByteLevel ("llama-bpe", "qwen2"). No normalizer may change the text (Qwen2's
    NFC is accepted, as llama.cpp's converter does)."""
    normalizer = doc.get("normalizer")
    pre = doc.get("pre_tokenizer")
    if not isinstance(pre, dict):
        return None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        return None
    name: str | None = None
    if len(steps) == 1 and _byte_level(steps[0], use_regex=True):
        name = "gpt-2"
    elif (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
          and _byte_level(steps[1], use_regex=True)):
        name = "smollm"
    elif len(steps) == 2 and _byte_level(steps[1], use_regex=False):
        name = _HF_SPLITS.get(_split_pattern(steps[0]) or "")
    if name is None:
        return None
    if normalizer is None or (name == "qwen2" and normalizer.get("type") == "NFC"):
        return name
    return None


def identify_pre_tokenizer(folder: Path, tokenizer: Any) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for the tokenizer in `folder` (loaded as `tokenizer`).
    Raises ValueError naming the fingerprint and what is recognised when it is neither a known
    fingerprint nor a known pre-tokenizer structure."""
    digest = fingerprint(tokenizer)
    name = FINGERPRINTS.get(digest)
    if name is not None:
        return name
    path = folder / "tokenizer.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    name = structural_pre_tokenizer(doc)
    if name is not None:
        return name
    pre = json.dumps(doc.get("pre_tokenizer"))
    raise ValueError(
        f"{path}: llama.cpp would pre-tokenize this tokenizer differently from the model (fingerprint "
        f"{digest[:16]}… is not one llama.cpp knows, and its pre_tokenizer {pre[:160]} matches none of "
        "Quantscope's known structures: GPT-2 ByteLevel, Digits + ByteLevel (smollm), Llama 3 or Qwen2 "
        "Split); convert it with llama.cpp's convert_hf_to_gguf.py, which can be updated for new tokenizers"
    )


# --- llama.cpp's tokenization of a GGUF -----------------------------------------------------------


def gguf_vocab(reader: Any) -> tuple[list[str], list[str], str, list[int]]:
    """(tokens, merges, pre-tokenizer name, token types) stored in an open GGUFReader."""

    def get(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    model = get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"tokenizer model {model!r}; only byte-level BPE ('gpt2') GGUF vocabularies are checked")
    return list(get("tokenizer.ggml.tokens") or []), list(get("tokenizer.ggml.merges") or []), \
        str(get("tokenizer.ggml.pre") or "default"), list(get("tokenizer.ggml.token_type") or [])


def rules_tokenizer(tokens: list[str], merges: list[str], pre: str, token_types: list[int]) -> Any:
    """A `tokenizers.Tokenizer` that splits with llama.cpp's regexes for `pre`, maps bytes to the
    GPT-2 alphabet and merges with the GGUF's own merges: llama.cpp's BPE pipeline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    regexes = PRE_TOKENIZER_REGEXES.get(pre)
    if regexes is None:
        raise ValueError(f"pre-tokenizer {pre!r} has no llama.cpp rules in Quantscope "
                         f"(known: {', '.join(sorted(PRE_TOKENIZER_REGEXES))}); install llama-cpp-python to check it")
    vocab = {t: i for i, t in enumerate(tokens) if not (i < len(token_types) and token_types[i] == 5)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in IGNORE_MERGES)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def gguf_token_ids(path: Path, text: str) -> tuple[list[int], str]:
    """(ids llama.cpp gives `text` with the GGUF at `path`, no BOS/EOS added; what produced them)."""
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    if llama_cpp is not None:
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        return [int(i) for i in ids], f"llama.cpp (llama-cpp-python {getattr(llama_cpp, '__version__', '?')})"
    from core.export.gguf_check import open_gguf

    tokens, merges, pre, types = gguf_vocab(open_gguf(path))
    tok = rules_tokenizer(tokens, merges, pre, types)
    return tok.encode(text, add_special_tokens=False).ids, f"llama.cpp's {pre!r} pre-tokenizer rules on the GGUF's vocab"
