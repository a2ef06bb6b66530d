from __future__ import annotations

import json

from core.cli import main


def test_inspect_json_has_per_layer_weight_and_activation_stats(tiny_llama_dir, capsys):
    rc = main(["inspect", "--model", str(tiny_llama_dir), "--calib", "builtin", "--samples", "2", "--seq-len", "32",
               "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["calibration"] == {"source": "builtin", "samples": 2, "seq_len": 32}
    layer = doc["layers"][0]
    assert set(layer["weight"]) >= {"absmax", "kurtosis", "frac_beyond_3sigma", "frac_beyond_6sigma",
                                    "out_channel_absmax", "in_channel_absmax"}
    assert set(layer["activation"]) >= {"channel_absmax", "outlier_channels", "smoothquant_scales"}
    assert all(isinstance(v, float) for v in layer["activation"]["smoothquant_scales"]["values"])


def test_inspect_text_table_without_calibration(tiny_llama_dir, capsys):
    assert main(["inspect", "--model", str(tiny_llama_dir)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out and "kurt" in out and "act max" not in out


def test_inspect_bad_input_gives_one_line_errors(tmp_path, tiny_llama_dir, capsys):
    assert main(["inspect", "--model", str(tmp_path / "nope")]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert main(["inspect", "--model", str(tiny_llama_dir), "--calib", str(tmp_path / "missing.txt")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["inspect", "--model", str(tiny_llama_dir), "--calib", "builtin", "--samples", "0"]) == 2
    err = capsys.readouterr().err
    assert "--samples must be positive" in err and len(err.strip().splitlines()) == 1
