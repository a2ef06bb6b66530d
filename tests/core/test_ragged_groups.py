"""Group sizes that do not divide in_features: ceil(in/gs) groups, the last one ragged (its range
taken over its own columns), through RTN's fused path, GPTQ, AWQ, the GPTQ layout and the engine's
choice of export. SmolLM2-135M (hidden 576) at group size 128 is the case that needs it."""
from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import core.primitives as P
from core.config import AWQConfig, CalibConfig, GPTQConfig, Granularity, QuantJob, RTNConfig
from core.engine import layer_weight_error, run_quantization
from core.events import Log
from core.methods import get_quantizer
from core.methods.gptq import GPTQ, gptq_quantize
from core.metrics import weight_error
from core.qtensors import IntWeight
from layer_ctx import make_ctx, make_inputs, make_layer


def _w(out: int, n_in: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * torch.rand(out, 1, generator=g) * 4
    w[1, :] = 0.0  # an all-zero row: scale 1
    w[2, -5:] = 0.0  # a tail that is partly zero
    return w


def _reference(w: torch.Tensor, bits: int, sym: bool, gs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scale, zero spelled out one group at a time, the last group over its own columns."""
    n_in = w.shape[1]
    scales, zeros, codes = [], [], []
    for c0 in range(0, n_in, gs):
        x = w[:, c0:c0 + gs].float()
        lo = x.amin(dim=1, keepdim=True).clamp(max=0)
        hi = x.amax(dim=1, keepdim=True).clamp(min=0)
        s, z = P._qparams_from_range(lo, hi, bits, sym)
        codes.append(torch.clamp(torch.round(x / s) + z.float(), 0, 2**bits - 1).to(torch.uint8))
        scales.append(s)
        zeros.append(z)
    return torch.cat(codes, dim=1), torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "_CHUNK_ELEMS", 256)  # every shape below goes through the two-worker split


# ---------------------------------------------------------------- primitives


def test_resolve_group_size_keeps_non_dividing_sizes_and_maps_large_or_negative_to_per_channel() -> None:
    assert P.resolve_group_size(576, "group", 128) == 128
    assert P.num_groups(576, 128) == 5 and P.ragged_tail(576, 128) == 64
    assert P.num_groups(1536, 128) == 12 and P.ragged_tail(1536, 128) == 0
    for gs in (-1, 0, 576, 1024):
        assert P.resolve_group_size(576, "group", gs) == 576 and P.ragged_tail(576, gs) == 0
    assert P.resolve_group_size(576, "channel", 128) == 576
    assert P.common_divisor_hint({576, 1536}, 128) == "64/96/192"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_ragged_round_trip_error_within_half_step(bits: int, sym: bool) -> None:
    w = _w(48, 200)
    q = P.quantize_to_intweight(w, bits, sym, "group", 64)  # 64 + 64 + 64 + 8 columns
    assert q.group_size == 64 and tuple(q.scale.shape) == (48, 4) and tuple(q.zero.shape) == (48, 4)
    step = P._expand_groups(q.scale, 200, 64)
    err = (q.dequantize() - w).abs()
    assert torch.all(err <= step / 2 * (1 + 1e-5) + 1e-7), float((err - step / 2).max())
    assert int(q.codes.max()) <= 2**bits - 1
    # the fused weight error and the dequantized one agree on the ragged grid
    got, ref = layer_weight_error(w, q), weight_error(w, P.dequantize_affine(q.codes, q.scale, q.zero, 64))
    for k in ("mse", "rel_error"):
        assert got[k] == pytest.approx(ref[k], rel=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_ragged_clip_search_never_worse_per_group_and_last_group_searched_on_its_own_columns(
        bits: int, sym: bool) -> None:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(32, 200, generator=g)
    w[torch.rand(32, 200, generator=g) < 0.02] *= 10
    plain = P.quantize_to_intweight(w, bits, sym, "group", 64)
    clipped = P.quantize_to_intweight(w, bits, sym, "group", 64, clip_search=True)
    def per_group(q: IntWeight) -> torch.Tensor:
        d = (q.dequantize() - w).square()
        return torch.stack([d[:, c:c + 64].sum(dim=1) for c in range(0, 200, 64)], dim=1)
    assert torch.all(per_group(clipped) <= per_group(plain) * (1 + 1e-6) + 1e-9)
    tail = P.quantize_to_intweight(w[:, 192:], bits, sym, "channel", -1, clip_search=True)
    assert torch.equal(clipped.scale[:, 3:], tail.scale) and torch.equal(clipped.zero[:, 3:], tail.zero)
    assert torch.equal(clipped.codes[:, 192:], tail.codes)


@pytest.mark.parametrize("sym", [True, False])
def test_ragged_last_group_scale_equals_the_scale_of_its_columns_alone(sym: bool) -> None:
    w = _w(16, 576, seed=1)
    for fused in (True, False):
        q = P.quantize_to_intweight(w, 4, sym, "group", 128, clip_search=not fused)
        alone = P.quantize_to_intweight(w[:, 512:], 4, sym, "channel", -1, clip_search=not fused)
        assert tuple(q.scale.shape) == (16, 5)
        assert torch.equal(q.scale[:, 4:], alone.scale) and torch.equal(q.zero[:, 4:], alone.zero)
        whole = P.quantize_to_intweight(w[:, :512], 4, sym, "group", 128, clip_search=not fused)
        assert torch.equal(q.scale[:, :4], whole.scale) and torch.equal(q.codes[:, :512], whole.codes)
        s, z = P.choose_qparams(w, 4, sym, "group", 128, clip_search=not fused)
        assert torch.equal(s, q.scale) and torch.equal(z, q.zero)


@pytest.mark.parametrize("bits", range(2, 9))
def test_fused_rtn_bit_identical_to_reference_for_ragged_shapes(bits: int, small_chunks: None) -> None:
    for (out, n_in), sym, gs, dtype in itertools.product([(37, 200), (64, 390), (9, 100), (5, 576)], (True, False),
                                                         (32, 64, 128), (torch.float32, torch.bfloat16)):
        if gs >= n_in:
            continue
        w = _w(out, n_in, seed=bits).to(dtype)
        codes, scale, zero = _reference(w, bits, sym, gs)
        q = P.quantize_to_intweight(w, bits, sym, "group", gs)
        key = (bits, out, n_in, sym, gs, dtype)
        assert torch.equal(q.codes, codes) and torch.equal(q.scale, scale) and torch.equal(q.zero, zero), key
        # the chunked quantize_affine (what GPTQ/AWQ use) and the two-step path agree too
        assert torch.equal(P.quantize_affine(w, scale, zero, bits, gs), codes), key
        s2, z2 = P.choose_qparams(w, bits, sym, "group", gs)
        assert torch.equal(s2, scale) and torch.equal(z2, zero), key
        # dequantize: block view + tail equals the per-column gather
        gi = torch.arange(n_in) // gs
        gathered = (codes.float() - zero.float()[:, gi]) * scale[:, gi]
        assert torch.equal(q.dequantize(), gathered) and torch.equal(P.dequantize_affine(codes, scale, zero, gs), gathered)
        sums = P.affine_error_sums(w, codes, scale, zero, gs)
        d = (w.double() - gathered.double())
        assert sums is not None and sums[0] == pytest.approx(float(d.square().sum()), rel=1e-4)
        assert sums[1] == pytest.approx(float(w.double().square().sum()), rel=1e-6)


def test_ragged_non_finite_weight_in_the_tail_is_named() -> None:
    w = torch.randn(8, 200)
    w[5, 199] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj contains 1 NaN/Inf"):
        P.quantize_to_intweight(w, 4, True, "group", 64, name="model.layers.0.mlp.up_proj")


def test_rtn_w4_g128_on_a_576_wide_weight_is_close_to_g64() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(576, 576, generator=g) * 0.02
    rel = {gs: layer_weight_error(w, P.quantize_to_intweight(w, 4, True, "group", gs))["rel_error"]
           for gs in (64, 96, 128, 144)}
    # coarser groups cost a little precision; the ragged 128 (4 × 128 + 64) sits between 96 and 144
    assert rel[64] < rel[96] < rel[128] < rel[144] < 1.1 * rel[64] + 0.02


# ---------------------------------------------------------------- GPTQ


def _correlated(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim // 4, generator=g) @ torch.randn(dim // 4, dim, generator=g)
    x = x + 0.1 * torch.randn(n, dim, generator=g)
    x[:, ::25] *= 5.0
    return x


@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_loss_below_rtn_with_a_ragged_group(act_order: bool, static_groups: bool, sym: bool) -> None:
    torch.manual_seed(1)
    w = torch.randn(48, 200)
    x = _correlated(2048, 200)
    acc = GPTQ(200)
    acc.add_batch(x)
    cfg = GPTQConfig(bits=4, group_size=64, sym=sym, act_order=act_order, static_groups=static_groups)
    res = gptq_quantize(w, acc.H, cfg)
    q = res.weight
    assert q.group_size == 64 and tuple(q.scale.shape) == (48, 4)
    rtn = P.quantize_to_intweight(w, 4, sym, Granularity.GROUP, 64)

    def loss(w_hat: torch.Tensor) -> float:
        return float((x @ (w - w_hat).t()).square().sum())

    assert loss(q.dequantize()) < 0.8 * loss(rtn.dequantize())
    if act_order and not static_groups:
        # g_idx names the processed blocks of 64; the last (ragged) one holds the 8 columns left
        counts = torch.bincount(q.g_idx.long(), minlength=4).tolist()
        assert counts == [64, 64, 64, 8]
    else:
        assert q.g_idx is None
    if static_groups:
        # static grids come from the unpermuted weight: the ragged tail has the grid of its columns
        tail_s, tail_z = P.choose_qparams(w[:, 192:], 4, sym, "channel", -1)
        assert torch.equal(q.scale[:, 3:], tail_s) and torch.equal(q.zero[:, 3:], tail_z)


# ---------------------------------------------------------------- AWQ


@pytest.mark.parametrize("clip", [False, True])
def test_awq_never_worse_than_rtn_on_the_qkv_block_with_a_ragged_group(clip: bool) -> None:
    for seed in range(2):
        layer = make_layer(hidden=96, inter=160, seed=seed)  # 96 % 64 = 32, 160 % 64 = 32
        inputs = make_inputs(hidden=96, seed=seed, outliers=(seed + 1, 70), scale=10.0 + 10 * seed)
        ctx = make_ctx(copy.deepcopy(layer), inputs)
        del ctx.linears["self_attn.o_proj"]  # v_proj's rows stay as the q/k/v search left them
        orig = make_ctx(copy.deepcopy(layer), inputs)
        cfg = AWQConfig(bits=4, group_size=64, clip=clip)
        awq = get_quantizer(cfg).quantize_layer(ctx)
        assert all(q.group_size == 64 and q.scale.shape[1] == -(-q.shape[1] // 64) for q in awq.values())
        with torch.no_grad():
            x = torch.cat([orig.module.input_layernorm(i) for i in inputs]).reshape(-1, 96)
            x_scaled = torch.cat([ctx.module.input_layernorm(i) for i in inputs]).reshape(-1, 96)
        e_awq = e_rtn = 0.0
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            w = orig.linears[n].weight.detach()
            rtn = P.quantize_to_intweight(w, 4, cfg.sym, "group", 64)
            e_awq += float((x_scaled @ awq[n].dequantize().t() - x @ w.t()).square().sum())
            e_rtn += float((x @ rtn.dequantize().t() - x @ w.t()).square().sum())
        assert e_awq <= e_rtn * (1 + 1e-5), (seed, e_awq, e_rtn)


# ---------------------------------------------------------------- engine, layouts, loader


def _ragged_model(tiny_model_factory: Any, hidden: int = 96) -> Path:
    return tiny_model_factory(hidden_size=hidden, intermediate_size=256)


def _calib(method: str) -> CalibConfig | None:
    return None if method == "rtn" else CalibConfig(samples=4, seq_len=64)


def _record_stored(monkeypatch: pytest.MonkeyPatch) -> dict[str, IntWeight]:
    """The weights the engine hands the GPTQ writer (the in-memory quantized model)."""
    from core.export.gptq import GPTQExporter

    recorded: dict[str, IntWeight] = {}
    original = GPTQExporter.tensors

    def tensors(self: Any, name: str, q: Any) -> dict[str, torch.Tensor]:
        recorded[name] = q
        return original(self, name, q)

    monkeypatch.setattr(GPTQExporter, "tensors", tensors)
    return recorded


def _in_memory_model(src: Path, out: Path, recorded: dict[str, IntWeight]) -> torch.nn.Module:
    """The source model with every plain tensor the run wrote (AWQ folds its scales into norms)
    and each quantized linear's weight as the engine held it (scales as the layout stores them,
    float16)."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    state = model.state_dict()
    for f in out.glob("*.safetensors"):
        for k, v in load_file(str(f)).items():
            if k in state:
                state[k] = v.float()
    for name, q in recorded.items():
        state[f"{name}.weight"] = IntWeight(codes=q.codes, scale=q.scale.half().float(), zero=q.zero, bits=q.bits,
                                            group_size=q.group_size, sym=q.sym, g_idx=q.g_idx).dequantize()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("method", ["rtn", "gptq", "gptq-act-order", "awq"])
def test_ragged_model_quantizes_end_to_end_into_gptq_and_loads_back_with_the_same_logits(
        method: str, tiny_model_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.export.verify import verify_export
    from core.loader import load_model

    src = _ragged_model(tiny_model_factory)
    cfg = {"rtn": RTNConfig(bits=4, group_size=64), "gptq": GPTQConfig(bits=4, group_size=64),
           "gptq-act-order": GPTQConfig(bits=4, group_size=64, act_order=True, static_groups=False),
           "awq": AWQConfig(bits=4, group_size=64)}[method]
    recorded = _record_stored(monkeypatch)
    logs: list[str] = []
    result = run_quantization(QuantJob(src, tmp_path / "q", cfg, calib=_calib(cfg.method)),
                              sink=lambda e: logs.append(e.message) if isinstance(e, Log) else None)
    assert result.export == "gptq"
    if method != "gptq-act-order":  # act-order without static groups defaults to gptq anyway
        assert any("96 % 64 = 32" in m and "ragged" in m and "the export is gptq" in m for m in logs), logs
    qc = json.loads((result.output / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["group_size"] == 64
    assert len(recorded) == 14 and recorded["model.layers.0.self_attn.q_proj"].scale.shape[1] == 2  # ceil(96/64)
    loaded, _ = load_model(result.output, with_tokenizer=False)
    ref = _in_memory_model(src, result.output, recorded)
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    # the independent reference reader dequantizes the ragged layout to the same function
    assert verify_export(result.output).ok


@pytest.mark.parametrize("export", ["compressed-tensors", "awq"])
def test_layouts_that_need_whole_groups_refuse_a_ragged_group_before_any_work(
        export: str, tiny_model_factory: Any, tmp_path: Path) -> None:
    src = _ragged_model(tiny_model_factory)
    cfg = AWQConfig(bits=4, group_size=64, sym=True) if export == "awq" else RTNConfig(bits=4, group_size=64)
    with pytest.raises(ValueError) as info:
        run_quantization(QuantJob(src, tmp_path / "q", cfg, calib=_calib(cfg.method), export=export))
    msg = str(info.value)
    assert msg.startswith(f"{export} needs group_size to divide in_features (96 % 64 ≠ 0 in model.layers.0.")
    assert msg.endswith("): use --export gptq, or --group-size 8/16/32") and "\n" not in msg
    assert not (tmp_path / "q").exists() and list(tmp_path.iterdir()) == []


def test_default_export_sees_the_model_widths() -> None:
    from core.export import default_export

    widths = {"model.layers.0.self_attn.q_proj": 576, "model.layers.0.mlp.down_proj": 1536}
    assert default_export(RTNConfig(group_size=128)) == "compressed-tensors"
    assert default_export(RTNConfig(group_size=128), widths) == "gptq"
    assert default_export(RTNConfig(group_size=64), widths) == "compressed-tensors"
    assert default_export(AWQConfig(group_size=128, sym=False), widths) == "gptq"
    assert default_export(AWQConfig(group_size=64, sym=False), widths) == "awq"
    # 5-bit: the GPTQ kernels cannot store it either, so the default stays (and the engine refuses)
    assert default_export(RTNConfig(bits=5, group_size=128), widths) == "compressed-tensors"


def test_five_bit_ragged_group_is_refused_with_dividing_group_sizes(tiny_model_factory: Any, tmp_path: Path) -> None:
    src = _ragged_model(tiny_model_factory)
    with pytest.raises(ValueError, match=r"\): use --group-size 8/16/32$"):
        run_quantization(QuantJob(src, tmp_path / "q", RTNConfig(bits=5, group_size=64)))


def test_quantscope_export_refuses_ragged_into_whole_group_layouts_and_writes_gptq_and_gguf(
        tiny_model_factory: Any, tmp_path: Path) -> None:
    from core.export.convert import relayout
    from core.export.gguf import export_gguf
    from core.export.verify import verify_export

    src = _ragged_model(tiny_model_factory)
    q = run_quantization(QuantJob(src, tmp_path / "q", RTNConfig(bits=4, group_size=64))).output
    for fmt in ("compressed-tensors", "awq"):
        with pytest.raises(ValueError) as info:
            relayout(q, tmp_path / fmt, fmt)
        assert str(info.value).startswith(f"{fmt} needs group_size to divide in_features (96 % 64 ≠ 0 in ")
        assert "use --format gptq, or quantize again with --group-size 8/16/32" in str(info.value)
        assert not (tmp_path / fmt).exists()
    again = relayout(q, tmp_path / "gptq", "gptq")
    assert verify_export(again, reference=q).ok
    # GGUF dequantizes the ragged groups and re-encodes: it works and reads back as written
    gguf = export_gguf(q, tmp_path / "m.gguf", "Q8_0")
    assert verify_export(gguf).ok


def test_quantize_cli_group_size_128_on_a_model_it_does_not_divide(
        tiny_model_factory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from core.cli import main
    from core.loader import load_model

    src = _ragged_model(tiny_model_factory, hidden=192)  # 192 % 128 = 64 (as SmolLM2's 576 % 128)
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(src), "--method", "rtn", "--bits", "4", "--group-size", "128",
               "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads(captured.out)
    assert doc["export"] == "gptq" and doc["settings"]["group_size"] == 128
    assert all(0 < layer["rel_error"] < 0.2 for layer in doc["layers"])
    model, _ = load_model(out, with_tokenizer=False)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    rc = main(["quantize", "--model", str(src), "--method", "rtn", "--group-size", "128", "--export",
               "compressed-tensors", "--out", str(tmp_path / "ct")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "192 % 128 ≠ 0" in err[0] and "--export gptq" in err[0]


def test_planner_bits_per_weight_counts_the_ragged_group() -> None:
    from core.formats import get_format

    fmt = get_format("int4_g128")
    assert fmt.bits_per_weight(1536) == pytest.approx(4 + 16 / 128)
    assert fmt.bits_per_weight(576) == pytest.approx(4 + 16 * 5 / 576)  # 5 scales per 576-wide row
