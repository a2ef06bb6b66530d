"""A long status-bar message is elided, never widens the window (issue 17, bug 4)."""
from __future__ import annotations

from typing import Any


def test_long_status_message_does_not_widen_the_window(window: Any, qtbot: Any) -> None:
    window.resize(1360, 860)
    qtbot.wait(50)
    before = window.minimumSizeHint().width()
    long = "Quantization failed: " + "a very long path component/" * 60
    window.status.show_message(long)
    qtbot.wait(50)
    assert window.minimumSizeHint().width() <= before  # the message asks for no width
    assert window.width() == 1360
    narrow = before + 20  # as narrow as the rest of the window allows
    window.resize(narrow, 860)
    qtbot.wait(50)
    assert window.width() == narrow  # still shrinks after the message
    assert window.status.message.text() == long  # the whole text is kept (tooltip when elided)


def test_multi_line_status_message_stays_one_line(window: Any, qtbot: Any) -> None:
    window.status.show_message("first line\nsecond line")
    assert window.status.message.text() == "first line  second line"
    assert window.status.message.sizeHint().height() < 2 * window.status.message.fontMetrics().height()
