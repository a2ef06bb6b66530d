"""The Qt binding must not eat references to None/True/False: on Python < 3.12 those are ordinary
objects, and PySide6 6.12.0 drops one reference per void (or bool) call, so a window that paints
aborts with "Fatal Python error: none_dealloc" within seconds (pyproject pins it out)."""
from __future__ import annotations

import sys
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(sys.version_info >= (3, 12),
                                reason="None, True and False are immortal from Python 3.12 on")


def test_qt_setters_and_painting_keep_the_refcounts_of_none_and_bools(qtbot: Any) -> None:
    from PySide6.QtCore import QPointF
    from PySide6.QtGui import QImage, QPainter
    from PySide6.QtWidgets import QLabel, QProgressBar

    label, bar = QLabel(), QProgressBar()
    image = QImage(32, 32, QImage.Format.Format_ARGB32)
    painter = QPainter(image)
    try:
        n = 500
        none0, false0 = sys.getrefcount(None), sys.getrefcount(False)
        for i in range(n):
            label.setText("x")
            bar.setValue(i % 100)
            painter.setRenderHint(QPainter.RenderHint.Antialiasing, False)
            painter.drawLine(QPointF(0, 0), QPointF(5, 5))
            label.isVisible()
        lost_none = none0 - sys.getrefcount(None)
        lost_false = false0 - sys.getrefcount(False)
    finally:
        painter.end()
    # A few references come and go with caches; a leak loses about one per call (2000 here).
    assert lost_none < n // 10, f"{lost_none} references to None lost in {4 * n} Qt calls"
    assert lost_false < n // 10, f"{lost_false} references to False lost in {n} Qt calls"
