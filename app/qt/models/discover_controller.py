"""Drives the Discover tab: debounced search, repo listing, fit badges read in the background.

Nothing here touches the network until the user types a search. Every hub call
runs on the controller's own small thread pool, so header reads (one Range
request series per quant) never queue behind the app's other background work,
and answers that arrive for an earlier search or repo are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from PySide6.QtCore import QObject, QTimer, QUrl, Signal
from PySide6.QtGui import QDesktopServices

from app.qt.error_panel import ErrorReporter
from app.qt.models.discover_tab import DiscoverTab
from app.qt.settings.controller import SettingsController
from app.qt.workers import BackgroundCalls
from app.services.models.hub import HubService, QuantOption, RepoListing, SearchResult

log = logging.getLogger(__name__)

DEBOUNCE_MS = 350
SEARCH_LIMIT = 50
HEADER_THREADS = 3


@dataclass(frozen=True)
class HubWiring:
    """The planner's pieces for fit badges (from `planner_wiring()`); all None: no badges."""

    fit: Any = None
    pick: Any = None
    read_header: Any = None


class DiscoverController(QObject):
    """Searches, opens repos and reads their quants' headers; hands downloads on."""

    download_requested = Signal(str, list, object)  # repo id, files, revision (commit)
    settings_requested = Signal()
    search_finished = Signal(str, int)  # term, result count (tests wait on it)
    repo_listed = Signal(str)  # repo id: its quants are drawn (headers may still be read)
    fit_finished = Signal(str)  # repo id: every header read and the pick marked

    def __init__(
        self,
        tab: DiscoverTab,
        settings: SettingsController,
        errors: ErrorReporter,
        wiring: HubWiring,
        *,
        open_url: Callable[[QUrl], object] = QDesktopServices.openUrl,
        debounce_ms: int = DEBOUNCE_MS,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.tab = tab
        self._settings = settings
        self._errors = errors
        self._wiring = wiring
        self._open_url = open_url
        self._calls = BackgroundCalls(errors.show, self, threads=HEADER_THREADS)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(debounce_ms)
        self._timer.timeout.connect(lambda: self.search(self.tab.search.text()))
        self._search_seq = 0
        self._open_seq = 0
        self.listing: RepoListing | None = None
        self.result: SearchResult | None = None
        self._pending_reads = 0
        self.searching = False
        self._user_chose = False  # a quant clicked: the pick no longer moves the selection
        tab.quants.clicked.connect(self._chosen)
        tab.query_edited.connect(self._on_edited)
        tab.query_submitted.connect(self._on_submitted)
        tab.repo_opened.connect(self.open)
        tab.download_requested.connect(self.download)
        tab.open_on_hub.connect(self.open_on_hub)
        tab.open_settings.connect(self.settings_requested)

    def hub(self) -> HubService:
        """A hub client with the token as the settings say now (HF_ENDPOINT read at call time)."""
        w = self._wiring
        return HubService(
            token=self._settings.settings.token,
            fit=w.fit,
            pick=w.pick,
            header_reader=w.read_header,
        )

    # search -------------------------------------------------------------------------

    def _on_edited(self, text: str) -> None:
        if not text.strip():
            self._timer.stop()
            self._search_seq += 1  # drop an answer still on its way
            self.searching = False
            self.tab.set_results([])
            self.tab.set_status("Type to search Hugging Face for GGUF models.")
            return
        self._timer.start()

    def _on_submitted(self, text: str) -> None:
        self._timer.stop()
        self.search(text)

    def search(self, term: str) -> None:
        """Searches now; an answer to an earlier search that arrives later is dropped."""
        term = term.strip()
        if not term:
            return
        self._search_seq += 1
        seq = self._search_seq
        self.searching = True
        self.tab.set_status(f"Searching for “{term}”…")
        hub = self.hub()

        def done(results: list[SearchResult]) -> None:
            if seq != self._search_seq:
                return
            self.searching = False
            self.tab.set_results(results)
            if results:
                more = " (the first 50)" if len(results) >= SEARCH_LIMIT else ""
                self.tab.set_status(
                    f"{len(results)} GGUF repos match “{term}”{more}, most downloaded first. "
                    "Open one to see its files and whether they fit this machine."
                )
            else:
                self.tab.set_status(f"No GGUF repos match “{term}”.")
            self.search_finished.emit(term, len(results))

        def failed(message: str) -> None:
            if seq != self._search_seq:
                return
            self.searching = False
            self.tab.set_status(f"Search failed: {message}")
            self.search_finished.emit(term, -1)

        self._calls.run(lambda: hub.search(term, limit=SEARCH_LIMIT), done, failed, what="Search")

    # a repo -------------------------------------------------------------------------

    def open(self, result: SearchResult) -> None:
        """Lists the repo's quants, then reads each one's header for its fit badge."""
        self._open_seq += 1
        seq = self._open_seq
        self.result = result
        self.listing = None
        self._user_chose = False
        self.tab.show_repo(result, None)
        hub = self.hub()

        def done(listing: RepoListing) -> None:
            if seq != self._open_seq:
                return
            self.listing = listing
            self.tab.show_repo(result, listing)
            picked = next((o for o in listing.options if o.picked), None)
            if picked is None and listing.options:
                self.tab.select_option(listing.options[0].name)
            self.repo_listed.emit(listing.repo_id)
            self._read_fits(seq, hub, listing)

        def failed(message: str) -> None:
            if seq != self._open_seq:
                return
            self.tab.repo_detail.setText(f"Could not list the files: {message}")
            self.repo_listed.emit(result.repo_id)
            self.fit_finished.emit(result.repo_id)

        self._calls.run(
            lambda: hub.list_quants(result.repo_id, with_fit=False),
            done,
            failed,
            what=f"Listing {result.repo_id}",
        )

    def _read_fits(self, seq: int, hub: HubService, listing: RepoListing) -> None:
        options = list(listing.options)
        if not hub.reads_headers or not options:
            self.fit_finished.emit(listing.repo_id)
            return
        self._pending_reads = len(options)
        self.tab.set_reading(True)
        for row, opt in enumerate(options):
            self._read_one(seq, hub, listing, row, opt)

    def _read_one(
        self, seq: int, hub: HubService, listing: RepoListing, row: int, opt: QuantOption
    ) -> None:
        def read() -> QuantOption:
            return hub.read_fit(listing, opt)

        def done(new: QuantOption) -> None:
            self._fit_read(seq, hub, listing, row, new)

        def failed(message: str) -> None:
            self._fit_read(seq, hub, listing, row, _with_error(opt, message))

        self._calls.run(read, done, failed, what="Reading a header")

    def _fit_read(
        self, seq: int, hub: HubService, listing: RepoListing, row: int, opt: QuantOption
    ) -> None:
        if seq != self._open_seq:
            return
        listing.options[row] = opt
        self.tab.update_option(row, opt)
        self._pending_reads -= 1
        if self._pending_reads:
            return
        self.tab.set_reading(False)
        # The pick plans every quant; off the GUI thread too.
        snapshot = RepoListing(
            listing.repo_id, listing.commit, listing.gated, listing.license, list(listing.options)
        )

        def picked(name: str | None) -> None:
            if seq != self._open_seq:
                return
            for o in listing.options:
                o.picked = o.name == name
            self.tab.refresh_marks()
            if name and not self._user_chose:
                self.tab.select_option(name)
            self.fit_finished.emit(listing.repo_id)

        def pick() -> str | None:
            return hub.mark_pick(
                RepoListing(
                    snapshot.repo_id,
                    snapshot.commit,
                    snapshot.gated,
                    snapshot.license,
                    [_copy(o) for o in snapshot.options],
                )
            )

        self._calls.run(pick, picked, lambda _m: picked(None), what="Choosing a quant")

    # intents -------------------------------------------------------------------------

    def _chosen(self, *_args: object) -> None:
        self._user_chose = True

    def download(self, opt: QuantOption) -> None:
        if self.listing is None:
            return
        self.download_requested.emit(
            self.listing.repo_id, [f.path for f in opt.files], self.listing.commit
        )

    def open_on_hub(self, repo_id: str) -> None:
        if repo_id:
            self._open_url(QUrl(f"https://huggingface.co/{repo_id}"))

    def shutdown(self) -> None:
        self._search_seq += 1
        self._open_seq += 1
        self._calls.shutdown(2000)


def _copy(opt: QuantOption) -> QuantOption:
    return replace(opt)


def _with_error(opt: QuantOption, message: str) -> QuantOption:
    return replace(opt, header_error=message)
