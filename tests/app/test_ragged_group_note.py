"""The Quantize view offers group sizes that leave a ragged last group (SmolLM2's 576 at 128) and
says what that means for the export."""
from __future__ import annotations

from typing import Any


def test_ragged_group_size_is_offered_with_a_note_and_gptq_as_the_default_export(
        window: Any, tiny_model_factory: Any) -> None:
    model = tiny_model_factory(hidden_size=96, intermediate_size=256)  # 96 % 64 = 32
    window.open_model_folder(model)
    q = window.quantize_view
    q.set_method("rtn")
    offered = [q.group_size.itemText(i) for i in range(q.group_size.count())]
    assert "64" in offered and "32" in offered
    q.group_size.setCurrentText("64")
    assert not q.group_note.isHidden()
    assert "96 % 64 = 32" in q.group_note.text() and "gptq" in q.group_note.text()
    assert "96 % 64 = 32" in q.group_size.toolTip() and "scale" in q.group_size.toolTip()
    exports = [q.export.itemData(i) for i in range(q.export.count())]
    assert q.export.currentData() == "gptq" and "compressed-tensors" not in exports and "awq" not in exports
    q.group_size.setCurrentText("32")  # divides 96 and 256: whole groups, the usual default
    assert q.group_note.isHidden() and "%" not in q.group_size.toolTip()  # the plain explanation only
    default = [q.export.itemData(i) for i in range(q.export.count()) if "(default)" in q.export.itemText(i)]
    assert default == ["compressed-tensors"]
