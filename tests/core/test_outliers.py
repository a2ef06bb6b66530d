from __future__ import annotations

import math

import pytest
import torch

from core.config import CalibConfig
from core.outliers import activation_stats, channel_vector, inspect_model, weight_stats


def test_weight_stats_on_gaussian_and_planted_outliers():
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    s = weight_stats(w)
    assert s["kurtosis"] == pytest.approx(3.0, abs=0.1)  # Pearson kurtosis of a Gaussian
    assert s["frac_beyond_3sigma"] == pytest.approx(0.0027, abs=0.0008)
    assert s["frac_beyond_6sigma"] == 0.0
    w[10, 33] = 80.0
    w[200, 7] = -60.0
    s = weight_stats(w)
    assert s["kurtosis"] > 20
    assert s["frac_beyond_6sigma"] == pytest.approx(2 / w.numel(), rel=1e-4)  # 5 significant digits in JSON
    out_max, in_max = s["out_channel_absmax"]["values"], s["in_channel_absmax"]["values"]
    assert len(out_max) == 256 and len(in_max) == 512
    assert out_max[10] == 80.0 and out_max[200] == 60.0 and in_max[33] == 80.0 and in_max[7] == 60.0


def test_long_vectors_are_max_pooled_keeping_peaks():
    v = torch.zeros(50000)
    v[12345] = 7.0
    c = channel_vector(v, limit=16384)
    assert c["stride"] == 4 and len(c["values"]) == math.ceil(50000 / 4)
    assert c["values"][12345 // 4] == 7.0 and max(c["values"]) == 7.0


def test_activation_stats_flag_channels_above_threshold_and_smoothquant_scales():
    act = torch.tensor([0.5, 7.0, 2.0, 6.0])
    w = torch.tensor([[1.0, 0.25, 4.0, 1.0]])
    a = activation_stats(act, w, threshold=6.0, alpha=0.5)
    assert a["outlier_channels"] == [1, 3] and a["n_outlier_channels"] == 2
    expected = (act.sqrt() / w.abs().amax(dim=0).sqrt()).tolist()
    assert a["smoothquant_scales"]["values"] == pytest.approx(expected, rel=1e-4)


def test_inspect_tiny_model_with_calibration(tiny_llama_dir):
    report = inspect_model(tiny_llama_dir, CalibConfig(samples=2, seq_len=32))
    names = [e["name"] for e in report["layers"]]
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.1.mlp.down_proj" in names
    q = next(e for e in report["layers"] if e["name"] == "model.layers.0.self_attn.q_proj")
    assert q["shape"] == [128, 128] and q["format"] == "float"
    act = q["activation"]
    assert len(act["channel_absmax"]["values"]) == 128 and act["absmax"] > 0
    assert act["n_outlier_channels"] == sum(v >= 6.0 for v in act["channel_absmax"]["values"])
    assert report["summary"]["linears"] == len(names)


def test_inspect_quantized_folder_sees_dequantized_weights(tiny_llama_dir, tmp_path):
    from core.config import QuantJob, RTNConfig
    from core.engine import run_quantization

    out = tmp_path / "q"
    run_quantization(QuantJob(model=tiny_llama_dir, out=out, method=RTNConfig(bits=3, group_size=32)))
    plain = inspect_model(tiny_llama_dir)
    quant = inspect_model(out)
    assert quant["quantized"] and not plain["quantized"]
    pq = {e["name"]: e for e in plain["layers"]}
    qq = {e["name"]: e for e in quant["layers"]}
    name = "model.layers.0.mlp.up_proj"
    assert qq[name]["format"] != "float"
    # 3-bit rounding moves every per-channel max but keeps it close.
    a, b = pq[name]["weight"]["out_channel_absmax"]["values"], qq[name]["weight"]["out_channel_absmax"]["values"]
    assert a != b and all(abs(x - y) <= 0.5 * x for x, y in zip(a, b))
