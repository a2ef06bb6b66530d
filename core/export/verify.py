"""Load-back verification: run an export through the real consumer that is installed and through
Quantscope's own reading of it, and compare logits and perplexity on a short text.

Consumers:

* compressed-tensors and bitsandbytes folders — `transformers.AutoModelForCausalLM.from_pretrained`
  on CPU (compressed-tensors decompresses; bitsandbytes computes with its CPU kernels).
* GPTQ and AWQ folders — transformers needs `gptqmodel` for these, which has no CPU wheel on PyPI;
  when it is not importable the folder is dequantized by `core.export.reference`, an independent
  reader written from the published layouts (it shares no code with the writers).
* GGUF files — transformers' `gguf_file` loading (which dequantizes with gguf-py) against
  Quantscope's own GGUF reader, or against the `reference` folder the file was made from. First,
  the GGUF's own tokenization (llama.cpp through `llama_cpp` when importable, otherwise
  llama.cpp's pre-tokenizer rules on the file's vocab and merges) must give the same ids as the
  source model's tokenizer on TOKENIZER_CHECK_TEXT: transformers' GGUF loader cannot see a wrong
  `tokenizer.ggml.pre`, llama.cpp tokenizes by it.

A mismatch beyond the tolerance raises `VerifyError`; it is never only a warning.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from core.events import CancelToken, Log, Sink, StageStarted, check_cancel, null_sink

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 128

# Relative tolerance on the max logit difference (relative to the largest |logit| of the
# Quantscope model). Weight-only layouts are dequantized by the loader exactly as Quantscope does,
# so only float rounding differs. Dynamic per-token W8A8 is looser because transformers'
# compressed-tensors emulation divides the token absmax by 127.5 (its int8 range 255 / 2) where
# Quantscope and vLLM's kernels use 127, moving every activation grid by 0.4 %.
TOLERANCE = {"default": 1e-3, "w8a8-dynamic": 5e-2, "bitsandbytes": 2e-2, "gguf": 1e-3}
PPL_TOLERANCE = {"default": 1e-3, "w8a8-dynamic": 5e-2, "bitsandbytes": 2e-2, "gguf": 1e-3}


# Contractions in both cases, code with operators and indentation, digit runs, non-ASCII scripts and
# emoji: the places where pre-tokenizers differ.
TOKENIZER_CHECK_TEXT = (
    "I've been told he's there, they'll say we'd won't. DON'T you think? 'Quoted' it's theirs'\n"
    "def area(r: float) -> float:\n    return 3.14159 * r ** 2  # 2024-12-04, x += 1; y = a+b != c\n"
    "if (n >= 1_000_000) { printf(\"%d\\n\", n); } else {x=[1,22,333,4444];}\n"
    "Prices: 1234567 units at $89.99 (12.5%) on 3/4/2025.\n"
    "naïve café, Größe über, 東京で働きたい, привет мир, ελληνικά, emoji 🚀🦙 — ok…\n"
    "    indented\n\n\ttabbed   spaces  \n"
)


class VerifyError(ValueError):
    """The export does not compute the same function as Quantscope's model."""


@dataclass(frozen=True)
class VerifyReport:
    loader: str
    max_logit_diff: float
    rel_logit_diff: float
    ppl_loader: float
    ppl_quantscope: float
    tokens: int
    tolerance: float
    ok: bool
    # What tokenized the GGUF for the tokenizer check (None: not a GGUF, or no source tokenizer given).
    tokenizer_check: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics)[:3])


def _perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:])
    return float(math.exp(loss.item()))


def _tokens(tokenizer: Any, text: str, n: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :n]
    if ids.shape[1] < 2:
        raise ValueError("the verification text gives fewer than 2 tokens; pass a longer text")
    return ids


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def check_gguf_tokenization(path: Path, source: str | Path, text: str = TOKENIZER_CHECK_TEXT) -> str:
    """Raise VerifyError unless GGUF `path` tokenizes `text` (as llama.cpp will) into the ids the
    tokenizer of model folder `source` gives; returns what tokenized the GGUF."""
    from core.export.gguf_tokenizer import gguf_token_ids

    tokenizer = _load_tokenizer(Path(source))
    want = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    got, how = gguf_token_ids(path, text)
    if got == want:
        return how
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    same = sum(1 for a, b in zip(got, want) if a == b)

    def show(ids: list[int]) -> str:
        return repr(tokenizer.convert_ids_to_tokens(ids[first:first + 4]))

    raise VerifyError(
        f"{path}: llama.cpp will tokenize text differently from the model's tokenizer ({how}): first difference "
        f"at token {first}, GGUF {show(got)} vs model {show(want)} ({same} of {len(want)} tokens agree); "
        "the file's tokenizer.ggml.pre does not match the model, export it again"
    )


def _load_tokenizer(path: Path) -> Any:
    from core.loader import load_tokenizer

    return load_tokenizer(path)


# --- Quantscope's own model ------------------------------------------------------------------------


def quantscope_model(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model as Quantscope evaluates it (`core.loader.load_model`): plain tensors as stored,
    every quantized linear a `QuantLinear` built from the weight Quantscope's reader rebuilds
    (W8A8 fake-quantizes activations, LLM.int8 runs its decomposition)."""
    from core.loader import load_model

    model, _ = load_model(path, dtype, with_tokenizer=False)
    return model


# --- consumers ------------------------------------------------------------------------------------


def _folder_layout(path: Path) -> str:
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise ValueError(f"{path} has no quantization_config in config.json; it is not an export to verify")
    return str(qc.get("quant_method", "?"))


def _consumer_model(path: Path, layout: str) -> tuple[torch.nn.Module, str]:
    from transformers import AutoModelForCausalLM

    if layout in ("gptq", "awq"):
        try:
            import gptqmodel  # noqa: F401  (transformers' GPTQ/AWQ backend)
        except ImportError:
            from core.export.reference import reference_model

            return reference_model(path), f"independent {layout.upper()} reference dequantizer (gptqmodel not installed)"
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, device_map="cpu",
                                                 local_files_only=True, trust_remote_code=False)
    return model.eval(), f"transformers {_version('transformers')} + {_consumer_package(layout)}"


def _consumer_package(layout: str) -> str:
    package = {"compressed-tensors": "compressed-tensors", "bitsandbytes": "bitsandbytes",
               "gptq": "gptqmodel", "awq": "gptqmodel"}.get(layout, layout)
    return f"{package} {_version(package)}"


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def _tolerance_key(path: Path, layout: str) -> str:
    if layout == "bitsandbytes":
        return "bitsandbytes"
    if layout == "compressed-tensors":
        qc = json.loads((path / "config.json").read_text())["quantization_config"]
        for scheme in (qc.get("config_groups") or {}).values():
            inputs = scheme.get("input_activations") if isinstance(scheme, dict) else None
            if inputs and inputs.get("dynamic"):
                return "w8a8-dynamic"
    return "default"


def verify_export(
    path: str | Path,
    *,
    reference: str | Path | None = None,
    source: str | Path | None = None,
    text: str | None = None,
    tokens: int = DEFAULT_TOKENS,
    tolerance: float | None = None,
    sink: Sink = null_sink,
    cancel: CancelToken | None = None,
) -> VerifyReport:
    """Load export `path` (a folder, or a .gguf file) with its real consumer and compare it with
    Quantscope's model on the first `tokens` tokens of `text` (default: Python's docs).

    `reference`: the Quantscope model folder to compare against; by default Quantscope's own
    reading of the export itself (for GGUF: Quantscope's GGUF reader). Raises `VerifyError` when
    the relative max logit difference or the perplexity gap exceeds the tolerance.

    `source` (GGUF only): the model folder the file was written from; its tokenizer is the one the
    GGUF's own tokenization must reproduce (default: `reference`; with neither the check is skipped
    and the report's `tokenizer_check` is None).
    """
    from core.output import check_output

    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"export not found: {path}")
    for p in (path, reference):
        if p is not None:
            check_output(p)  # bytes changed since Quantscope wrote them (DamagedOutput names the file)
    text = text or default_text()
    sink(StageStarted("verify", message=f"loading {path.name} with its consumer"))
    tokenizer_check = None
    if path.is_file() or path.suffix == ".gguf":
        from core.export.gguf import gguf_consumer_and_quantscope
        from core.export.gguf_check import check_gguf

        check_gguf(path)
        tokenizer_source = source if source is not None else reference
        if tokenizer_source is not None:
            tokenizer_check = check_gguf_tokenization(path, tokenizer_source)
            sink(Log("info", f"verify {path.name}: tokenization agrees with {Path(tokenizer_source).name} "
                             f"({tokenizer_check})"))
        else:
            sink(Log("warning", f"verify {path.name}: no source model given, so the GGUF's own tokenization "
                                "was not compared with the model's tokenizer"))
        check_cancel(cancel)
        consumer, ours, tokenizer, loader = gguf_consumer_and_quantscope(path, reference)
        key = "gguf"
    else:
        layout = _folder_layout(path)
        consumer, loader = _consumer_model(path, layout)
        check_cancel(cancel)
        ours = quantscope_model(reference if reference is not None else path)
        tokenizer = _load_tokenizer(path)
        key = _tolerance_key(path, layout)
    check_cancel(cancel)
    ids = _tokens(tokenizer, text, tokens)
    a = _logits(consumer, ids)
    b = _logits(ours, ids)
    if a.shape != b.shape:
        raise VerifyError(f"{path}: the consumer's logits have shape {list(a.shape)}, Quantscope's {list(b.shape)}")
    diff = float((a - b).abs().max())
    scale = float(b.abs().max()) or 1.0
    ppl_a, ppl_b = _perplexity(a, ids), _perplexity(b, ids)
    tol = TOLERANCE[key] if tolerance is None else tolerance
    ppl_tol = PPL_TOLERANCE[key] if tolerance is None else tolerance
    ok = math.isfinite(diff) and diff / scale <= tol and abs(ppl_a - ppl_b) <= ppl_tol * ppl_b
    report = VerifyReport(loader=loader, max_logit_diff=diff, rel_logit_diff=diff / scale, ppl_loader=ppl_a,
                          ppl_quantscope=ppl_b, tokens=int(ids.shape[1]), tolerance=tol, ok=ok,
                          tokenizer_check=tokenizer_check)
    sink(Log("info", f"verify {path.name}: {loader}: max logit diff {diff:.3g} "
                     f"(rel {diff / scale:.2g}), ppl {ppl_a:.4f} vs {ppl_b:.4f}"))
    if not ok:
        raise VerifyError(
            f"{path} does not match Quantscope's model: max logit diff {diff:.4g} (relative {diff / scale:.3g}, "
            f"tolerance {tol:g}), perplexity {ppl_a:.4f} ({loader}) vs {ppl_b:.4f} (Quantscope)"
        )
    return report
