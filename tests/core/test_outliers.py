from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch

import core.outliers as outliers
from core.config import CalibConfig
from core.events import Cancelled, CancelToken, Progress
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


def test_weight_stats_in_row_chunks_match_one_pass(monkeypatch):
    torch.manual_seed(1)
    w = torch.randn(300, 70) * torch.linspace(0.1, 3.0, 70)
    w[17, 3] = 40.0
    whole = weight_stats(w)
    monkeypatch.setattr(outliers, "_STATS_CHUNK", 7 * 70)  # 43 chunks, the last one short
    assert weight_stats(w) == whole


def _assert_same_report(a: Any, b: Any, path: str = "report") -> None:
    """Equal structure, equal strings/ints/lists of channel indices, floats equal to tolerance
    (the report keeps 5 significant digits)."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same_report(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_report(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=2e-4, abs=1e-9), path
    else:
        assert a == b, path


def _whole_model_report(monkeypatch: pytest.MonkeyPatch, *args: Any, **kwargs: Any) -> dict[str, Any]:
    with monkeypatch.context() as m:
        m.setattr(outliers, "streamable_source", lambda path: None)
        return inspect_model(*args, **kwargs)


@pytest.mark.parametrize("calibrated", [False, True], ids=["weights", "calibrated"])
@pytest.mark.parametrize("variant", [{}, {"tied": True, "dtype": torch.bfloat16}, {"arch": "qwen2"}],
                         ids=["llama", "llama-tied-bf16", "qwen2"])
def test_streamed_report_equals_whole_model_report(tiny_model_factory, monkeypatch, variant, calibrated):
    model = tiny_model_factory(**variant)
    calib = CalibConfig(samples=3, seq_len=40) if calibrated else None
    # A low threshold, so that the outlier channel lists are not empty.
    streamed = inspect_model(model, calib, threshold=0.5)
    whole = _whole_model_report(monkeypatch, model, calib, threshold=0.5)
    _assert_same_report(streamed, whole)
    assert streamed["layers"][-1]["name"] == "lm_head"
    if calibrated:
        assert streamed["summary"]["outlier_channels_total"] > 0
        assert all("activation" in e for e in streamed["layers"])


def test_streamed_activation_absmax_equals_whole_model_forwards(tiny_llama_dir):
    from core.calibration import calibration_batches
    from core.loader import load_model

    model, tokenizer = load_model(tiny_llama_dir)
    batches = calibration_batches(tokenizer, CalibConfig(samples=3, seq_len=40))
    whole = outliers.activation_absmax(model, batches)
    streamed = outliers.stream_activation_absmax(outliers.streamable_source(tiny_llama_dir), batches)
    assert streamed.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(streamed[name], whole[name], rtol=1e-4, atol=1e-6)


def test_quantized_folders_take_the_whole_model_path(tiny_llama_dir, tmp_path):
    from core.config import QuantJob, RTNConfig
    from core.engine import run_quantization

    out = tmp_path / "q"
    run_quantization(QuantJob(model=tiny_llama_dir, out=out, method=RTNConfig(bits=4, group_size=32)))
    assert outliers.streamable_source(out) is None
    assert outliers.streamable_source(tiny_llama_dir) is not None


def test_cancelling_between_layers_stops_and_frees_the_layer(tiny_model_factory):
    from core.calibration import calibration_batches
    from core.engine import meta_model
    from core.loader import load_tokenizer

    path = tiny_model_factory(layers=4)
    token = CancelToken()
    seen: list[Progress] = []

    def sink(event: Any) -> None:
        if isinstance(event, Progress) and event.stage == "activations":
            seen.append(event)
            if event.done == 1:
                token.cancel()

    with pytest.raises(Cancelled):
        inspect_model(path, CalibConfig(samples=2, seq_len=32), sink=sink, cancel=token)
    assert [e.done for e in seen] == [1]  # no layer after the first one ran

    # Cancelled inside a layer (after its forward): the layer's weights are dropped all the same.
    src = outliers.streamable_source(path)
    model, hf_config = meta_model(src)
    batches = calibration_batches(load_tokenizer(path), CalibConfig(samples=2, seq_len=32))
    token = CancelToken()
    layers_seen: list[int] = []

    def on_layer(linears: dict, stats: dict) -> None:
        layers_seen.append(len(layers_seen))
        assert not any(m.weight.is_meta for m in linears.values())
        if len(layers_seen) == 2:
            token.cancel()
            token.check()

    with pytest.raises(Cancelled):
        outliers._stream_layers(src, model, hf_config, batches, sink=lambda e: None, cancel=token,
                                on_layer=on_layer)
    assert layers_seen == [0, 1]
    assert all(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    from core.config import CalibConfig
    from core.engine import GIB, _RssMonitor
    from core.model_io import open_model
    from core.outliers import inspect_model
    small, big = sys.argv[1:3]
    calib = CalibConfig(samples=4, seq_len=64)
    def peak(path, c):
        with _RssMonitor() as rss:
            inspect_model(path, c)
        return rss.peak / GIB
    peak(small, calib)  # first-use costs (imports, lazy initialisation) out of the comparison
    doc = {"weights": [peak(small, None), peak(big, None)], "calibrated": [peak(small, calib), peak(big, calib)],
           "sizes": [open_model(p).total_bytes / GIB for p in (small, big)]}
    print(json.dumps(doc))
""")


def test_inspect_peak_memory_is_independent_of_model_size(tiny_model_factory):
    dims = dict(hidden_size=256, intermediate_size=768)
    small, big = tiny_model_factory(layers=2, **dims), tiny_model_factory(layers=24, **dims)
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(small), str(big)],
                         capture_output=True, text=True, timeout=300, check=True)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    grown = doc["sizes"][1] - doc["sizes"][0]
    assert grown > 0.06  # GiB: the big model is ~10x the small one
    # Holding the model would add `grown`; streaming adds far less (allow noise).
    for kind in ("weights", "calibrated"):
        peaks = doc[kind]
        assert peaks[1] - peaks[0] < 0.3 * grown, (kind, doc)
