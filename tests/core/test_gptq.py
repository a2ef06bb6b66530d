from __future__ import annotations

import math

import pytest
import torch

from core.config import GPTQConfig, Granularity
from core.events import CancelToken, Cancelled, Log, Progress
from core.methods.gptq import GPTQ, gptq_quantize
from core.primitives import quantize_to_intweight


def _correlated(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """n samples [n, dim] with strongly correlated channels and a few loud ones (like LLM inputs)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim // 4, generator=g)
    mix = torch.randn(dim // 4, dim, generator=g)
    x = z @ mix + 0.1 * torch.randn(n, dim, generator=g)
    x[:, :: dim // 8] *= 5.0
    return x


def _output_loss(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ w.t()) - (x @ w_hat.t())).square().sum())


def _hessian(x: torch.Tensor) -> torch.Tensor:
    g = GPTQ(x.shape[1])
    for chunk in x.split(97):  # uneven batches exercise the running mean
        g.add_batch(chunk)
    return g.H


def test_hessian_accumulation_matches_closed_form():
    x = _correlated(500, 64)
    H = _hessian(x)
    assert torch.allclose(H, 2.0 / 500 * x.t() @ x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_loss_below_rtn_on_correlated_inputs(bits: int, sym: bool):
    torch.manual_seed(1)
    w = torch.randn(96, 256)
    x = _correlated(2048, 256)
    cfg = GPTQConfig(bits=bits, group_size=64, sym=sym)
    res = gptq_quantize(w, _hessian(x), cfg)
    rtn = quantize_to_intweight(w, bits, sym, Granularity.GROUP, 64)
    gptq_loss = _output_loss(w, res.weight.dequantize(), x)
    rtn_loss = _output_loss(w, rtn.dequantize(), x)
    assert gptq_loss < 0.8 * rtn_loss, (gptq_loss, rtn_loss)
    assert res.weight.codes.dtype == torch.uint8 and int(res.weight.codes.max()) <= 2**bits - 1
    assert res.weight.scale.shape == (96, 4)


def test_gptq_per_channel_and_per_tensor_beat_rtn():
    torch.manual_seed(2)
    w = torch.randn(32, 128)
    x = _correlated(1024, 128)
    H = _hessian(x)
    for gran in (Granularity.CHANNEL, Granularity.TENSOR):
        res = gptq_quantize(w, H, GPTQConfig(bits=4, granularity=gran))
        rtn = quantize_to_intweight(w, 4, True, gran, 128)
        assert res.weight.scale.shape == rtn.scale.shape
        assert _output_loss(w, res.weight.dequantize(), x) < _output_loss(w, rtn.dequantize(), x)


def test_act_order_without_static_groups_records_processing_order_in_g_idx():
    torch.manual_seed(3)
    w = torch.randn(16, 128)
    x = _correlated(1024, 128)
    H = _hessian(x)
    res = gptq_quantize(w, H, GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=False))
    q = res.weight
    assert q.g_idx is not None and q.g_idx.dtype == torch.int32
    perm = torch.argsort(torch.diag(H), descending=True)
    for g in range(4):
        cols = torch.nonzero(q.g_idx == g).flatten()
        assert sorted(cols.tolist()) == sorted(perm[g * 32:(g + 1) * 32].tolist())
    # Codes are back in the original column order: dequantization equals the explicit formula.
    gi = q.g_idx.long()
    manual = (q.codes.float() - q.zero.float()[:, gi]) * q.scale[:, gi]
    assert torch.equal(q.dequantize(), manual)
    rtn = quantize_to_intweight(w, 4, True, Granularity.GROUP, 32)
    assert _output_loss(w, q.dequantize(), x) < _output_loss(w, rtn.dequantize(), x)


def test_act_order_with_static_groups_keeps_contiguous_groups_and_original_grid():
    torch.manual_seed(4)
    w = torch.randn(16, 128)
    x = _correlated(1024, 128)
    H = _hessian(x)
    res = gptq_quantize(w, H, GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=True))
    q = res.weight
    assert q.g_idx is None
    assert torch.equal(q.group_index(), torch.arange(128) // 32)
    rtn = quantize_to_intweight(w, 4, True, Granularity.GROUP, 32)
    # Static groups: the grid is the one of the unmodified weight.
    assert torch.equal(q.scale, rtn.scale) and torch.equal(q.zero, rtn.zero)
    assert _output_loss(w, q.dequantize(), x) < _output_loss(w, rtn.dequantize(), x)


def test_act_order_helps_or_matches_on_outlier_channels():
    torch.manual_seed(5)
    w = torch.randn(64, 256)
    x = _correlated(2048, 256)
    H = _hessian(x)
    plain = gptq_quantize(w, H, GPTQConfig(bits=3, group_size=64))
    ordered = gptq_quantize(w, H, GPTQConfig(bits=3, group_size=64, act_order=True))
    assert _output_loss(w, ordered.weight.dequantize(), x) < 1.05 * _output_loss(w, plain.weight.dequantize(), x)


def test_rank_deficient_hessian_and_dead_columns_survive():
    torch.manual_seed(6)
    w = torch.randn(32, 128)
    x = torch.randn(64, 8) @ torch.randn(8, 128)  # rank 8
    x[:, 5] = 0.0  # a dead input channel
    res = gptq_quantize(w, _hessian(x), GPTQConfig(bits=4, group_size=32))
    deq = res.weight.dequantize()
    assert torch.isfinite(deq).all()
    assert torch.all(deq[:, 5] == 0)
    rtn = quantize_to_intweight(w, 4, True, Granularity.GROUP, 32)
    assert _output_loss(w, deq, x) < _output_loss(w, rtn.dequantize(), x)


def test_indefinite_hessian_retries_with_more_damping_and_says_so():
    n = 64
    H = torch.ones(n, n) - 0.02 * torch.eye(n)  # eigenvalue −0.02: damp 0.01 is not enough
    events = []
    res = gptq_quantize(torch.randn(8, n), H, GPTQConfig(bits=4, group_size=32), sink=events.append)
    logs = [e for e in events if isinstance(e, Log)]
    assert len(logs) == 1 and logs[0].level == "warning" and "damp=0.1" in logs[0].message
    assert res.damp == pytest.approx(0.1)
    assert torch.isfinite(res.weight.dequantize()).all()


def test_nan_inputs_raise_clear_error():
    H = torch.full((16, 16), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(torch.randn(4, 16), H, GPTQConfig(bits=4, group_size=8))


def test_group_size_not_dividing_in_features_gives_a_ragged_last_group():
    res = gptq_quantize(torch.randn(4, 200), torch.eye(200), GPTQConfig(group_size=128), name="layer.x")
    assert res.weight.group_size == 128 and tuple(res.weight.scale.shape) == (4, 2)


def test_cancellation_between_blocks():
    token = CancelToken()

    def sink(event: object) -> None:
        if isinstance(event, Progress):
            token.cancel()

    with pytest.raises(Cancelled):
        gptq_quantize(torch.randn(8, 256), torch.eye(256), GPTQConfig(bits=4, block_size=64), cancel=token, sink=sink)


@pytest.mark.parametrize("bits", [2, 8])
def test_extreme_bit_widths(bits: int):
    torch.manual_seed(7)
    w = torch.randn(16, 64)
    x = _correlated(512, 64)
    res = gptq_quantize(w, _hessian(x), GPTQConfig(bits=bits, group_size=32, sym=False))
    assert int(res.weight.codes.max()) <= 2**bits - 1
    rel = (res.weight.dequantize() - w).norm() / w.norm()
    assert rel < (0.02 if bits == 8 else 1.0)


def _run(model_dir, out, method, sink=None, cancel=None):
    from core.config import CalibConfig, QuantJob
    from core.engine import run_quantization

    job = QuantJob(model=model_dir, out=out, method=method, calib=CalibConfig(samples=4, seq_len=32))
    return run_quantization(job, sink=sink or (lambda e: None), cancel=cancel)


def test_gptq_end_to_end_on_tiny_llama_closer_to_float_than_rtn(tiny_llama_dir, tmp_path):
    from core.config import RTNConfig
    from core.evaluate import evaluate_model
    from core.loader import load_model

    gptq = _run(tiny_llama_dir, tmp_path / "gptq", GPTQConfig(bits=3, group_size=32))
    _run(tiny_llama_dir, tmp_path / "rtn", RTNConfig(bits=3, group_size=32))
    assert len(gptq.layers) == 14 and all(r["output_rel_error"] < 1.0 for r in gptq.layers)
    ref, tok = load_model(tiny_llama_dir)
    kl = {}
    for name in ("gptq", "rtn"):
        model, _ = load_model(tmp_path / name)
        res = evaluate_model(model, tok, seq_len=32, windows=4, reference=ref)
        assert math.isfinite(res["perplexity"])
        kl[name] = res["kl_divergence"]
    assert 0 < kl["gptq"] < kl["rtn"], kl


def test_cancelling_inside_gptq_leaves_no_output(tiny_llama_dir, tmp_path):
    token = CancelToken()
    seen = []

    def sink(event: object) -> None:
        if isinstance(event, Progress) and event.stage == "gptq":
            seen.append(event)
            token.cancel()

    with pytest.raises(Cancelled):
        _run(tiny_llama_dir, tmp_path / "out", GPTQConfig(bits=4, group_size=32), sink=sink, cancel=token)
    assert seen and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
