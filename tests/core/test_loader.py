"""QuantLinear arithmetic (weight-only, W8A8, LLM.int8 decomposition) and loading folders back."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from core.config import Granularity
from core.primitives import quantize_to_intweight
from core.qlinear import QuantLinear, exact_int_matmul, llm_int8_matmul, replace_linears
from core.qtensors import ActQuant, Fp8Weight, Int8RowWeight


def _int8_row(w: torch.Tensor, threshold: float) -> Int8RowWeight:
    scb = w.abs().amax(dim=1)
    codes = torch.round(w / (scb[:, None] / 127)).clamp(-127, 127).to(torch.int8)
    return Int8RowWeight(codes=codes, scb=scb, threshold=threshold, dtype=torch.float32)


@pytest.fixture()
def w() -> torch.Tensor:
    return torch.randn(24, 40, generator=torch.Generator().manual_seed(0))


@pytest.fixture()
def x() -> torch.Tensor:
    return torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(1))


def test_quantlinear_int4_groups_equals_float_linear_with_the_dequantized_weight(w, x) -> None:
    q = quantize_to_intweight(w, 4, False, Granularity.GROUP, 8, dtype=torch.float32)
    bias = torch.randn(24)
    layer = QuantLinear(q, bias)
    expected = nn.functional.linear(x, q.dequantize(), bias)
    assert torch.equal(layer(x), expected)
    assert layer(x).shape == (3, 5, 24)
    # 4-bit groups of 8 are close to, but not equal to, the float layer.
    err = (layer(x) - nn.functional.linear(x, w, bias)).norm() / nn.functional.linear(x, w, bias).norm()
    assert 1e-3 < float(err) < 0.2


def test_quantlinear_fp8_uses_the_dequantized_weight(w, x) -> None:
    scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    q = Fp8Weight(weight=(w / scale).to(torch.float8_e4m3fn), scale=scale, dtype=torch.float32)
    assert torch.equal(QuantLinear(q)(x), x @ q.dequantize().T)


def test_w8a8_dynamic_fake_quantizes_activations_per_token(w, x) -> None:
    q = quantize_to_intweight(w, 8, True, Granularity.CHANNEL, dtype=torch.float32)
    q.act = ActQuant(bits=8, scheme="dynamic")
    y = QuantLinear(q)(x)
    s = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.clamp(torch.round(x / s), -128, 127) * s
    assert torch.equal(y, xq @ q.dequantize().T)
    assert not torch.equal(y, x @ q.dequantize().T)


def test_w8a8_static_uses_the_calibrated_scale(w, x) -> None:
    q = quantize_to_intweight(w, 8, True, Granularity.CHANNEL, dtype=torch.float32)
    q.act = ActQuant(bits=8, scheme="static", scale=torch.tensor(0.01))
    xq = torch.clamp(torch.round(x / 0.01), -128, 127) * 0.01
    assert torch.allclose(QuantLinear(q)(x), xq @ q.dequantize().T, atol=1e-6)


def test_llm_int8_with_every_column_an_outlier_equals_the_float_matmul(w, x) -> None:
    q = _int8_row(w, threshold=1e-9)
    layer = QuantLinear(q)
    y = layer(x)
    assert layer.outlier_columns == 40
    assert torch.allclose(y, x @ q.dequantize().T, atol=1e-5)


def test_llm_int8_without_outliers_is_exact_int8_rowwise_math(w, x) -> None:
    q = _int8_row(w, threshold=float("inf"))
    layer = QuantLinear(q)
    y = layer(x)
    flat = x.reshape(-1, 40)
    sx = flat.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(flat / sx).clamp(-127, 127).to(torch.int64)
    acc = xq @ q.codes.to(torch.int64).T
    expected = (acc.double() * sx.double() * (q.scb.double() / 127)).float().reshape(3, 5, 24)
    assert layer.outlier_columns == 0
    assert torch.equal(y, expected)


def test_llm_int8_mixed_decomposition_splits_outlier_columns(w) -> None:
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    x[2, 7] = 9.0
    x[4, 31] = -12.0
    q = _int8_row(w, threshold=6.0)
    y, n = llm_int8_matmul(x, q.codes, q.scb, q.dequantize(), 6.0)
    assert n == 2
    cols = torch.tensor([7, 31])
    rest = x.clone()
    rest[:, cols] = 0
    sx = rest.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(rest / sx).clamp(-127, 127).to(torch.int64)
    int_part = (xq @ q.codes.to(torch.int64).T).double() * sx.double() * (q.scb.double() / 127)
    expected = int_part.float() + x[:, cols] @ q.dequantize()[:, cols].T
    assert torch.allclose(y, expected, atol=1e-6)
    # The decomposition beats plain int8 on outlier-heavy activations.
    plain, _ = llm_int8_matmul(x, q.codes, q.scb, q.dequantize(), float("inf"))
    ref = x @ w.T
    assert (y - ref).norm() < (plain - ref).norm()


def test_exact_int_matmul_is_exact_beyond_float32_integer_range() -> None:
    a = torch.full((2, 3000), 127.0)
    b = torch.full((3, 3000), -127.0)
    assert torch.equal(exact_int_matmul(a, b), torch.full((2, 3), -127.0 * 127 * 3000, dtype=torch.float64))


def test_replace_linears_swaps_named_layers_and_keeps_bias(w, x) -> None:
    model = nn.Sequential()
    model.add_module("up", nn.Linear(40, 24))
    model.add_module("act", nn.ReLU())
    model.add_module("down", nn.Linear(24, 8, bias=False))
    q = quantize_to_intweight(w, 8, True, Granularity.CHANNEL, dtype=torch.float32)
    bias = model.up.bias.detach().clone()
    assert replace_linears(model, {"up": q}) == ["up"]
    assert isinstance(model.up, QuantLinear) and isinstance(model.down, nn.Linear)
    assert torch.equal(model.up(x), nn.functional.linear(x, q.dequantize(), bias))
    with pytest.raises(ValueError, match="shape"):
        replace_linears(model, {"down": q})
    with pytest.raises(ValueError, match="not a linear layer"):
        replace_linears(model, {"act": q})


# --- loading folders ------------------------------------------------------------------------------


def test_load_model_of_a_plain_folder_reproduces_transformers_logits(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from core.loader import load_model

    model, tok = load_model(tiny_llama_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = tok("def add(a, b):\n    return a + b", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


@pytest.fixture(scope="module")
def rtn_int4_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from core.config import QuantJob, RTNConfig
    from core.engine import run_quantization

    out = tmp_path_factory.mktemp("rtn") / "q"
    run_quantization(QuantJob(model=tiny_llama_dir, out=out, method=RTNConfig(bits=4, group_size=32)))
    return out


def test_load_model_of_an_rtn_output_rebuilds_every_quantized_linear_bit_exactly(
    tiny_llama_dir: Path, rtn_int4_dir: Path
) -> None:
    from core.loader import load_model, quantized_layers
    from core.model_io import open_model

    model, tok = load_model(rtn_int4_dir)
    layers = quantized_layers(model)
    assert len(layers) == 2 * 7 and set(layers.values()) == {"int"}
    src = open_model(tiny_llama_dir)
    name = "model.layers.1.mlp.down_proj"
    w = src.load_tensors([f"{name}.weight"])[f"{name}.weight"]
    expected = quantize_to_intweight(w, 4, True, Granularity.GROUP, 32, dtype=torch.float32).dequantize()
    assert torch.equal(model.get_submodule(name).weight, expected)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    assert tok is not None


def test_quantized_output_computes_like_transformers_compressed_tensors_load(rtn_int4_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from core.loader import load_model

    model, tok = load_model(rtn_int4_dir)
    ref = AutoModelForCausalLM.from_pretrained(rtn_int4_dir, dtype=torch.float32).eval()
    ids = tok("class A:\n    pass\n", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-4)


def test_load_model_without_tokenizer_files_says_what_to_copy(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from core.loader import load_model

    folder = tmp_path / "m"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / f, folder / f)
    model, tok = load_model(folder, with_tokenizer=False)
    assert tok is None and model is not None
    with pytest.raises(ValueError, match="tokenizer"):
        load_model(folder)


def test_load_model_refuses_a_quantized_folder_with_missing_tensors(rtn_int4_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from core.loader import load_model

    folder = tmp_path / "broken"
    shutil.copytree(rtn_int4_dir, folder)
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        tensors = load_file(str(f))
        if "model.norm.weight" in tensors:
            del tensors["model.norm.weight"]
            save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_model(folder)


@pytest.mark.parametrize(
    ("case", "kind"),
    [("nf4", "4bit"), ("llm_int8", "int8_row"), ("smoothquant_static", "int"), ("rtn_asym_gptq", "int")],
)
def test_every_layout_loads_back_as_quantlinears_close_to_the_source(
    case: str, kind: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from core.config import CalibConfig, FourBitConfig, LLMInt8Config, QuantJob, RTNConfig, SmoothQuantConfig
    from core.engine import run_quantization
    from core.loader import load_model, quantized_layers
    from core.metrics import kl_divergence

    method = {
        "nf4": FourBitConfig(),
        "llm_int8": LLMInt8Config(threshold=2.5),
        "smoothquant_static": SmoothQuantConfig(act_scheme="static"),
        "rtn_asym_gptq": RTNConfig(bits=4, group_size=32, sym=False),
    }[case]
    calib = CalibConfig(samples=4, seq_len=32) if case in ("llm_int8", "smoothquant_static") else None
    out = tmp_path / case
    run_quantization(QuantJob(model=tiny_llama_dir, out=out, method=method, calib=calib))
    model, tok = load_model(out)
    layers = quantized_layers(model)
    assert len(layers) == 14 and set(layers.values()) == {kind}
    if case == "llm_int8":
        assert model.get_submodule("model.layers.0.mlp.up_proj").qweight.threshold == 2.5
    if case == "smoothquant_static":
        act = model.get_submodule("model.layers.0.self_attn.q_proj").qweight.act
        assert act.scheme == "static" and float(act.scale) > 0
    base, _ = load_model(tiny_llama_dir, with_tokenizer=False)
    ids = tok("def f(x):\n    return [i for i in range(x)]\n" * 6, return_tensors="pt").input_ids[0]
    kl = kl_divergence(model, base, ids, seq_len=32, windows=2)
    assert 0 < kl < 0.01


def test_gguf_file_loads_with_its_tokenizer(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from core.export.gguf import export_gguf
    from core.loader import load_model
    from core.metrics import kl_divergence

    path = export_gguf(tiny_llama_dir, tmp_path / "m.gguf", "Q8_0")
    model, tok = load_model(path)
    base, base_tok = load_model(tiny_llama_dir)
    text = "while True:\n    break\n" * 8
    ids = tok(text, return_tensors="pt").input_ids[0]
    assert torch.equal(ids, base_tok(text, return_tensors="pt").input_ids[0])
    assert 0 < kl_divergence(model, base, ids, seq_len=16, windows=2) < 1e-3
