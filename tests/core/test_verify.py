"""verify_export: loads an export with its real consumer, compares with Quantscope's model, and
raises on a mismatch; export → load → perplexity is unchanged."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.config import FourBitConfig, RTNConfig
from core.export.convert import relayout, rtn_quantizer, write_quantized
from core.export.verify import VerifyError, verify_export


def _rtn_folder(src, out, fmt, sym=True):
    cfg = RTNConfig(bits=4, group_size=32, sym=sym)
    return write_quantized(src, out, fmt, rtn_quantizer(cfg), method_config=cfg)


def test_compressed_tensors_export_verifies_with_transformers(tiny_llama_dir, tmp_path):
    out = _rtn_folder(tiny_llama_dir, tmp_path / "ct", "compressed-tensors")
    report = verify_export(out, tokens=64)
    assert report.ok and report.tokens == 64
    assert report.loader.startswith("transformers") and "compressed-tensors" in report.loader
    assert report.rel_logit_diff <= 1e-5
    assert report.ppl_loader == pytest.approx(report.ppl_quantscope, rel=1e-6)


def test_corrupted_export_is_an_error_not_a_warning(tiny_llama_dir, tmp_path):
    out = _rtn_folder(tiny_llama_dir, tmp_path / "ct", "compressed-tensors")
    # swap two scales on disk: the consumer reads the corrupted file, and so does Quantscope —
    # compare against the intact folder instead, as a user verifying a copied export would
    intact = tmp_path / "intact"
    import shutil

    shutil.copytree(out, intact)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    tensors = load_file(str(shard))
    key = next(k for k in tensors if k.endswith("q_proj.weight_scale"))
    tensors[key] = tensors[key] * 3
    save_file(tensors, str(shard), metadata={"format": "pt"})
    from core.output import MANIFEST_FILE, DamagedOutput

    with pytest.raises(DamagedOutput, match=f"{shard.name} is damaged"):  # its checksum, before any loading
        verify_export(out, reference=intact, tokens=48)
    (out / MANIFEST_FILE).unlink()  # without the checksums, the logits catch it
    with pytest.raises(VerifyError, match="does not match Quantscope's model"):
        verify_export(out, reference=intact, tokens=48)


@pytest.fixture(scope="module")
def fp16_llama_dir(tiny_model_factory):
    """float16 source: scales are float16 in every layout, so re-layouts are lossless."""
    return tiny_model_factory(dtype=torch.float16)


def test_gptq_relayout_of_a_compressed_tensors_folder_computes_the_same(fp16_llama_dir, tmp_path):
    ct = _rtn_folder(fp16_llama_dir, tmp_path / "ct", "compressed-tensors")
    gptq = relayout(ct, tmp_path / "gptq", "gptq")
    assert json.loads((gptq / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    report = verify_export(gptq, reference=ct, tokens=48)
    assert report.ok and report.rel_logit_diff <= 1e-5


def test_export_then_eval_gives_the_same_perplexity(fp16_llama_dir, tmp_path):
    from core.evaluate import evaluate

    gptq = _rtn_folder(fp16_llama_dir, tmp_path / "gptq", "gptq", sym=False)
    awq = relayout(gptq, tmp_path / "awq", "awq")
    ct_sym = _rtn_folder(fp16_llama_dir, tmp_path / "ct", "compressed-tensors")
    gptq_from_ct = relayout(ct_sym, tmp_path / "gptq2", "gptq")
    kw = dict(seq_len=32, windows=2)
    assert evaluate(awq, **kw)["perplexity"] == pytest.approx(evaluate(gptq, **kw)["perplexity"], rel=1e-6)
    assert evaluate(gptq_from_ct, **kw)["perplexity"] == pytest.approx(evaluate(ct_sym, **kw)["perplexity"], rel=1e-6)


def test_bitsandbytes_nf4_export_verifies_with_transformers(tiny_llama_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    bnb = pytest.importorskip("core.export.bnb")
    from core.fourbit import quantize_4bit

    del bnb

    def quantize(name, w):
        return quantize_4bit(w.float(), "nf4", 64) if ".layers." in name else None

    out = write_quantized(tiny_llama_dir, tmp_path / "bnb", "bitsandbytes", quantize, method_config=FourBitConfig())
    try:
        report = verify_export(out, tokens=48)
    except (RuntimeError, ImportError) as exc:  # bitsandbytes without a CPU backend here
        pytest.skip(f"bitsandbytes cannot run on this CPU: {exc}")
    assert report.ok and "bitsandbytes" in report.loader


@pytest.mark.slow
@pytest.mark.realmodel
def test_smollm2_int4_compressed_tensors_loads_in_transformers_and_matches(smollm2_dir, tmp_path):
    out = _rtn_folder(smollm2_dir, tmp_path / "ct", "compressed-tensors")
    report = verify_export(out, tokens=96)
    assert report.ok and report.rel_logit_diff <= 1e-3
    source = verify_export(out, reference=smollm2_dir, tokens=96, tolerance=10.0)
    # 4-bit groups of 32 cost some perplexity on a 135M model, but the model still works
    assert source.ppl_quantscope < report.ppl_loader < 1.5 * source.ppl_quantscope


@pytest.mark.slow
@pytest.mark.realmodel
def test_smollm2_gguf_q8_0_loads_in_transformers_and_keeps_perplexity(smollm2_dir, tmp_path):
    pytest.importorskip("accelerate")
    from core.export.gguf import export_gguf

    out = export_gguf(smollm2_dir, tmp_path / "smol-Q8_0.gguf", "Q8_0")
    assert verify_export(out, tokens=96).ok
    vs_source = verify_export(out, reference=smollm2_dir, tokens=96, tolerance=10.0)
    assert vs_source.ppl_loader == pytest.approx(vs_source.ppl_quantscope, rel=0.03)
