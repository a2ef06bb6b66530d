"""An invalid group size clears what the last valid one derived (ragged note, formats) and says
why right under the method; the proposed output folder follows the method and the model
(issue 17, bug 8)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def test_invalid_group_size_replaces_the_stale_note_and_empty_format_box(window: Any,
                                                                          tiny_model_factory: Any) -> None:
    model = tiny_model_factory(hidden_size=96, intermediate_size=256)
    window.open_model_folder(model)
    q = window.quantize_view
    q.set_method("gptq")
    q.group_size.setCurrentText("64")  # 96 % 64: ragged note shown
    assert "96 % 64" in q.group_note.text() and not q.group_note.isHidden()
    q.group_size.setCurrentText("100")
    assert q.group_note.isHidden() and "96 % 64" not in q.group_note.text()
    assert not q.settings_error.isHidden() and "100" in q.settings_error.text()
    # The reason sits in the first rows of the settings form, above every method option.
    row, _role = q.settings_form.getWidgetPosition(q.settings_error)
    assert row <= 1
    assert q.export.count() == 1 and q.export.currentData() is None and not q.export.isEnabled()
    assert "fix" in q.export.currentText()
    assert not q.run_button.isEnabled()
    q.group_size.setCurrentText("32")
    assert q.settings_error.isHidden() and q.export.isEnabled() and q.export.currentData() is not None


def test_proposed_output_folder_follows_method_and_model(window: Any, tiny_llama_dir: Path,
                                                         tiny_model_factory: Any, tmp_path: Path) -> None:
    q = window.quantize_view
    window.open_model_folder(tiny_llama_dir)
    q.set_method("rtn")
    assert q.out_dir.text().endswith(f"{tiny_llama_dir.name}-rtn")
    q.set_method("gptq")
    assert q.out_dir.text().endswith(f"{tiny_llama_dir.name}-gptq")
    other = tiny_model_factory(hidden_size=96, intermediate_size=256)
    window.open_model_folder(other)
    assert q.out_dir.text() == str(other.parent / f"{other.name}-gptq")
    mine = str(tmp_path / "my-choice")
    q.out_dir.setText(mine)
    q.set_method("awq")
    assert q.out_dir.text() == mine  # typed by the user: kept while the method changes
    window.open_model_folder(tiny_llama_dir)
    assert q.out_dir.text() == str(tiny_llama_dir.parent / f"{tiny_llama_dir.name}-awq")  # another model
