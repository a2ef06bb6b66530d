"""A one-line label for text that changes many times a second (job stage, ETA, point count).

`QLabel.setText` always calls `updateGeometry()`, and a layout passes that up to the window
whatever the new size: the QTabWidget on the way re-lays itself out and repaints the whole tab,
settings panel included — about 10 ms of UI-thread time per text change on a 2-core machine.
`LiveText` keeps its size hint fixed (one line, `sample` wide), elides what does not fit, and only
repaints itself. It is still a QLabel for style sheets (`QLabel#Muted`) and `text()`.
"""
from __future__ import annotations

from PySide6.QtCore import QEvent, QSize, Qt
from PySide6.QtGui import QPainter
from PySide6.QtWidgets import QLabel, QSizePolicy, QToolTip, QWidget


class LiveText(QLabel):
    def __init__(self, text: str = "", parent: QWidget | None = None, *, sample: str = "",
                 elide: Qt.TextElideMode = Qt.TextElideMode.ElideRight) -> None:
        super().__init__(parent)
        self._text = text
        self._sample = sample
        self._elide = elide
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)

    def setText(self, text: str) -> None:  # noqa: N802 - Qt's name
        if text != self._text:
            self._text = text
            self.update()

    def text(self) -> str:
        return self._text

    def sizeHint(self) -> QSize:  # noqa: N802
        m = self.contentsMargins()
        fm = self.fontMetrics()
        return QSize(fm.horizontalAdvance(self._sample) + m.left() + m.right(), fm.height() + m.top() + m.bottom())

    def minimumSizeHint(self) -> QSize:  # noqa: N802
        return QSize(0, self.sizeHint().height())

    def _shown(self) -> str:
        return self.fontMetrics().elidedText(self._text, self._elide, self.contentsRect().width())

    def paintEvent(self, _event: object) -> None:  # noqa: N802
        painter = QPainter(self)
        self.style().drawItemText(painter, self.contentsRect(), int(self.alignment() | Qt.AlignmentFlag.AlignVCenter),
                                  self.palette(), self.isEnabled(), self._shown(), self.foregroundRole())

    def event(self, ev: QEvent) -> bool:
        # The whole text as a tooltip when it is elided and no tooltip of its own was set.
        if ev.type() == QEvent.Type.ToolTip and not self.toolTip() and self._shown() != self._text:
            QToolTip.showText(ev.globalPos(), self._text, self)
            return True
        return super().event(ev)
