"""The wizard's controller: opens a `LoadWizard` off the GUI thread, redraws on every change,
runs the dry run in the background, and applies through the engine's load route.

A change (a slider, a setting) updates the service and redraws the dialog in
the same call, so the bars follow within one event-loop turn. On this machine
a dry run (`engine.planning.probe.measure`: a child process, started from a
pool thread) follows half a second after the last change and marks the
figures measured; with a described machine there is none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal
from PySide6.QtWidgets import QWidget

from app.qt import theme
from app.qt.chat.controller import ConfirmFn
from app.qt.engine_controller import EngineController
from app.qt.settings.controller import SettingsController
from app.qt.wizard.dialog import WizardDialog
from app.qt.workers import BackgroundCalls
from app.services.models.fit import HardwareSource
from app.services.models.library import ModelEntry
from app.services.models.wizard import LoadWizard, open_wizard, runtime_text
from engine.planning.probe import MeasuredMemory, measure
from engine.wire.control import LoadRequest

log = logging.getLogger(__name__)

DRY_RUN_DELAY_MS = 500
# While a budget slider moves, the recommendation (a full search, ~10-20 ms for a 30B MoE)
# waits until it rests this long; the bars follow every step.
RECOMMEND_DELAY_MS = 150
MeasureFn = Callable[[LoadRequest], MeasuredMemory]
ApplyFn = Callable[[Path, LoadRequest], bool]  # False: refused (the reason was shown)


class WizardController(QObject):
    """One wizard window for the app; `open(model)` shows it for a model."""

    redrawn = Signal()  # after every redraw (tests and the responsiveness figure)
    measured = Signal()  # a dry run's figures arrived (or it failed)

    def __init__(
        self,
        window: QWidget,
        palette: theme.Palette,
        hardware: HardwareSource,
        engine: EngineController,
        settings: SettingsController,
        background: BackgroundCalls,
        confirm: ConfirmFn,
        entries: Callable[[], Sequence[ModelEntry]],
        *,
        measure_fn: MeasureFn = measure,
        apply_fn: ApplyFn | None = None,
        clock: Callable[[], float] = time.perf_counter,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self._window = window
        self.palette_ = palette
        self.hardware = hardware
        self.engine = engine
        self._settings = settings
        self._background = background
        self._confirm = confirm
        self._entries = entries
        self._measure = measure_fn
        self._apply = apply_fn or engine.load_with
        self._clock = clock
        self.dialog: WizardDialog | None = None
        self.wizard: LoadWizard | None = None
        self.model: Path | None = None
        self.applying: Path | None = None
        self.sent: list[LoadRequest] = []  # every request Apply sent, in order
        self.redraw_seconds: list[float] = []  # how long each redraw took (docs/app.md)
        self._measuring = False
        self._dry_run = QTimer(self)
        self._dry_run.setSingleShot(True)
        self._dry_run.setInterval(DRY_RUN_DELAY_MS)
        self._dry_run.timeout.connect(self._start_dry_run)
        self._recommend = QTimer(self)
        self._recommend.setSingleShot(True)
        self._recommend.setInterval(RECOMMEND_DELAY_MS)
        self._recommend.timeout.connect(self._draw_recommendation)
        engine.load_progress.connect(self._on_progress)
        engine.load_finished.connect(self._on_finished)
        engine.load_failed.connect(self._on_failed)

    # opening --------------------------------------------------------------------

    def open(self, model: Path, *, first_run: bool = False) -> WizardDialog:
        """Shows the wizard for `model`; the model's header and the hardware are read in the background."""
        dialog = self._dialog()
        dialog.set_first_run(first_run)
        self.model = model
        self.wizard = None
        self._draw_models(model)
        dialog.set_progress(None, f"Reading {model.name} and this computer's hardware…")
        dialog.apply_button.setEnabled(False)
        dialog.show()
        dialog.raise_()
        remembered = self._settings.settings.load_settings(str(model)).draft_model

        def done(wizard: LoadWizard) -> None:
            if self.model != model or self.dialog is None:
                return  # another model was chosen meanwhile
            self.wizard = wizard
            source = self.hardware
            dialog.set_wizard(wizard, source.file if source.described else None)
            dialog.set_progress(None, "")
            self.redraw()

        def failed(message: str) -> None:
            if self.model == model and self.dialog is not None:
                dialog.set_progress(None, f"{model.name} cannot be planned: {message}")
                dialog.apply_button.setEnabled(False)

        self._background.run(
            lambda: open_wizard(
                model, self.hardware.get, described=self.hardware.described, draft_model=remembered
            ),
            done,
            failed,
            what=f"Planning {model.name}",
        )
        return dialog

    def _dialog(self) -> WizardDialog:
        if self.dialog is None:
            dialog = WizardDialog(self.palette_, self._window)
            dialog.budget_changed.connect(self._on_budget)
            dialog.choice_changed.connect(self._on_choice)
            dialog.recommended_requested.connect(self._on_recommended)
            dialog.reset_budgets_requested.connect(self._on_reset_budgets)
            dialog.apply_requested.connect(self.apply)
            dialog.model_chosen.connect(lambda path: self.open(Path(path)))
            dialog.destroyed.connect(self._forget_dialog)
            self.dialog = dialog
        return self.dialog

    def _forget_dialog(self) -> None:
        # Deleted with its window: nothing may draw into it any more.
        self._recommend.stop()
        self._dry_run.stop()
        self.dialog = None
        self.wizard = None

    def _draw_models(self, current: Path) -> None:
        assert self.dialog is not None
        models = [(e.path.stem, e.path) for e in self._entries() if e.valid and len(e.parts) <= 1]
        self.dialog.set_models(models, current)

    def set_palette(self, palette: theme.Palette) -> None:
        self.palette_ = palette
        if self.dialog is not None:
            self.dialog.set_palette(palette)

    # changes --------------------------------------------------------------------

    def redraw(self, *, recommendation: bool = True) -> None:
        """Draws the service's state now; a dry run follows on this machine.

        recommendation=False leaves the planner's recommendation for a moment later.
        """
        if self.wizard is None or self.dialog is None:
            return
        start = self._clock()
        view = self.wizard.view()
        self.dialog.draw(view, self.wizard.budgets)
        if recommendation:
            self._recommend.stop()
            self.dialog.draw_recommendation(self.wizard.recommendation())
        else:
            self._recommend.start()
        self.dialog.runtime.setText("Runtime: " + runtime_text(self.wizard.hardware, view.request))
        self.dialog.apply_button.setEnabled(self.applying is None)
        self.redraw_seconds.append(self._clock() - start)
        self.redrawn.emit()
        if self.wizard.wants_dry_run() is not None:
            self._dry_run.start()

    def _on_budget(self, index: int, value: int) -> None:
        if self.wizard is not None:
            self.wizard.set_budget(index, value)
            self.redraw(recommendation=False)

    def _on_choice(self, change: dict[str, Any]) -> None:
        if self.wizard is not None:
            self.wizard.set_choices(**change)
            self.redraw()

    def _draw_recommendation(self) -> None:
        if self.wizard is not None and self.dialog is not None:
            self.dialog.draw_recommendation(self.wizard.recommendation())

    def _on_recommended(self) -> None:
        if self.wizard is not None and self.dialog is not None:
            if not self.wizard.use_recommended():
                self.dialog.set_progress(None, "Nothing fits these budgets; raise a budget.")
            self.redraw()

    def _on_reset_budgets(self) -> None:
        if self.wizard is not None:
            for i in range(len(self.wizard.budgets)):
                self.wizard.set_budget(i, self.wizard.default_budget(i))
            self.redraw()

    # the dry run ------------------------------------------------------------------

    def _start_dry_run(self) -> None:
        wizard = self.wizard
        if wizard is None or self._measuring or self.dialog is None or not self.dialog.isVisible():
            return  # a closed wizard measures nothing; reopening redraws and asks again
        load = wizard.wants_dry_run()
        if load is None:
            return
        self._measuring = True

        def done(found: MeasuredMemory) -> None:
            self._measuring = False
            wizard.set_measured(load, found)
            self.measured.emit()
            if wizard is self.wizard:
                self.redraw()  # measures the current settings next if they changed meanwhile

        def failed(message: str) -> None:
            self._measuring = False
            wizard.set_measure_failed(message)
            self.measured.emit()
            if wizard is self.wizard and self.dialog is not None:
                self.dialog.draw(wizard.view(), wizard.budgets)

        self._background.run(lambda: self._measure(load), done, failed, what="The dry run")

    # applying -------------------------------------------------------------------

    def apply(self) -> None:
        """Loads the model with exactly the wizard's settings; what won't fit is asked first."""
        wizard, dialog = self.wizard, self.dialog
        if wizard is None or dialog is None or self.applying is not None:
            return
        view = wizard.view()
        if view.problems:
            question = (
                "These settings do not fit the budgets:\n\n"
                + "\n".join(view.problems)
                + "\n\nLoading may fail or slow the computer down. Load anyway?"
            )
            if not self._confirm("Load anyway?", question, "Load anyway"):
                dialog.set_progress(None, "Not loaded: change the settings or the budgets.")
                return
        request = view.request
        self.applying = wizard.model
        self.sent.append(request)
        dialog.set_progress(0.0, f"Loading {wizard.model.name}…")
        if not self._apply(wizard.model, request):
            self.applying = None
            dialog.set_progress(None, "Not loaded: another model is still loading.")

    def _on_progress(self, progress: float) -> None:
        if self.applying is not None and self.dialog is not None:
            self.dialog.set_progress(progress, f"Loading {self.applying.name}… {progress:.0%}")

    def _on_finished(self, path: str) -> None:
        if self.applying is None or Path(path) != self.applying:
            return
        self.applying = None
        if self.dialog is not None:
            self.dialog.set_progress(None, f"{Path(path).name} is loaded with these settings.")
            self.dialog.close()

    def _on_failed(self, path: str, message: str) -> None:
        if self.applying is None or Path(path) != self.applying:
            return
        self.applying = None
        if self.dialog is not None:
            self.dialog.set_progress(None, f"{Path(path).name} could not be loaded: {message}")
