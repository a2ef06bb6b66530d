"""Run is validated when the model, settings or output folder are chosen, not seconds after it is
pressed: disabled with the reason in this window's words (issue 17, bug 7)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def test_unsupported_architecture_disables_run_with_the_reason(window: Any, tiny_llama_dir: Path,
                                                                tmp_path: Path) -> None:
    odd = tmp_path / "odd-model"
    shutil.copytree(tiny_llama_dir, odd)
    config = json.loads((odd / "config.json").read_text())
    config["architectures"] = ["FrobnicatorForCausalLM"]
    (odd / "config.json").write_text(json.dumps(config))
    window.open_model_folder(odd)
    q = window.quantize_view
    q.out_dir.setText(str(tmp_path / "out"))
    assert not q.run_button.isEnabled()
    assert not q.run_blocked.isHidden()
    assert "FrobnicatorForCausalLM" in q.run_blocked.text() and "cannot be quantized" in q.run_blocked.text()
    assert q.run_button.toolTip() == q.run_blocked.text()
    assert not q.run()  # Ctrl+R says the same instead of starting a job that fails later


def test_existing_output_folder_disables_run_and_names_the_checkbox(window: Any, tiny_llama_dir: Path,
                                                                     tmp_path: Path, dialogs: list) -> None:
    window.open_model_folder(tiny_llama_dir)
    q = window.quantize_view
    existing = tmp_path / "already-here"
    existing.mkdir()
    q.out_dir.setText(str(existing))
    assert not q.run_button.isEnabled()
    assert f"“{q.overwrite.text()}”" in q.run_blocked.text()
    assert "--overwrite" not in q.run_blocked.text() and "--out" not in q.run_blocked.text()
    q.overwrite.setChecked(True)
    assert q.run_button.isEnabled() and q.run_blocked.isHidden()
    q.overwrite.setChecked(False)
    q.out_dir.setText(str(tmp_path / "new-folder"))
    assert q.run_button.isEnabled() and q.run_blocked.isHidden()
    q.out_dir.setText(str(tmp_path / "missing-parent" / "out"))
    assert not q.run_button.isEnabled() and "does not exist" in q.run_blocked.text()


def test_core_messages_are_shown_with_the_windows_words(window: Any) -> None:
    q = window.quantize_view
    text = q.gui_words("output folder /x already exists; pass --overwrite to replace it or choose another --out")
    assert "--" not in text and f"tick “{q.overwrite.text()}”" in text and "another output folder" in text
