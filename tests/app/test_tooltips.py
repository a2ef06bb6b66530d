"""Every control that uses a term of art explains it in plain words, with what it does to size
or quality (issue 17, workflow: tooltips)."""
from __future__ import annotations

from typing import Any


def test_term_of_art_controls_explain_themselves(window: Any, tiny_llama_dir: Any) -> None:
    window.open_model_folder(tiny_llama_dir)
    q, p, i = window.quantize_view, window.plan_view, window.inspect_view
    controls = {
        "bits": q.bits, "group size": q.group_size, "zero point": q.sym, "damping": q.damp,
        "act-order": q.act_order, "samples": q.samples, "α": q.alpha, "threshold": q.threshold,
        "KV dtype": p.kv_dtype, "engine": p.engine, "inspect threshold": i.threshold, "inspect α": i.alpha,
        "granularity": q.granularity, "double quantization": q.double_quant, "context": p.context,
    }
    for term, widget in controls.items():
        text = widget.toolTip()
        assert len(text) > 60, term
        assert any(w in text for w in ("size", "quality", "memory", "smaller", "grows")), term


def test_group_size_tooltip_keeps_its_explanation_next_to_the_ragged_note(window: Any,
                                                                          tiny_model_factory: Any) -> None:
    window.open_model_folder(tiny_model_factory(hidden_size=96, intermediate_size=256))
    q = window.quantize_view
    q.set_method("rtn")
    q.group_size.setCurrentText("64")
    text = q.group_size.toolTip()
    assert text.startswith("Input columns that share one scale") and "96 % 64 = 32" in text
