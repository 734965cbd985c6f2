"""`mmtui browse`: the Textual app. Build it with `make_app(db_path, ...)` (the command, the tests and the
snapshots share this factory).

Start-up reads the store only (no torch): the store is opened in a worker thread, then the app shows a run
chooser (several runs), the browser (one run, or --run), or a screen saying why there is nothing to browse.
"""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import App
from textual.binding import Binding

from mmtui.defaults import GRAPHICS
from mmtui.errors import NotFoundError
from mmtui.store import Run
from mmtui.store.core import match_run
from mmtui.tui.failures import ShowsWorkerErrors
from mmtui.tui.messages import StoreFailed, StoreOpened
from mmtui.tui.screens.browse import BrowseScreen
from mmtui.tui.screens.problem import LoadingScreen, ProblemScreen
from mmtui.tui.screens.runs import RunsScreen
from mmtui.tui.session import Session, StackHolder, StoreProblem, open_store
from mmtui.tui.state import PAGE


class BrowseApp(ShowsWorkerErrors, App[None]):
    """Browse a store's runs, layers, neurons and images; run ablations."""

    CSS_PATH = "app.tcss"
    TITLE = "mmtui"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
    ]

    def __init__(
        self,
        db_path: Path,
        *,
        run_id: str | None = None,
        graphics: str = "halfblock",
        device: str = "auto",
        page: int = PAGE,
    ) -> None:
        super().__init__()
        self.db_path = Path(db_path)
        self.run_id = run_id
        self.graphics = graphics
        self.page = page
        self.show_heatmaps = False  # `h` turns heatmaps on for the session
        self.specific = False  # `x`: generic units hidden, an image's units ranked by lift (every screen)
        self.session: Session | None = None
        self.stacks = StackHolder(device)
        self.runs: list[Run] = []

    def on_mount(self) -> None:
        self.push_screen(LoadingScreen(f"Opening {self.db_path.name} …"))
        self.open_store()

    @work(thread=True, exclusive=True, group="store", exit_on_error=False)
    def open_store(self) -> None:
        try:
            store, runs = open_store(self.db_path)
        except StoreProblem as problem:
            self.post_message(StoreFailed(problem.title, problem.message))
            return
        self.session = Session(store)
        self.post_message(StoreOpened(runs))

    @on(StoreOpened)
    def show_runs(self, message: StoreOpened) -> None:
        self.runs = message.runs
        if self.run_id is not None:
            try:
                chosen = match_run(self.runs, self.run_id, self.db_path)
            except NotFoundError as error:
                self.switch_screen(ProblemScreen("Run not found", str(error)))
                return
            self.switch_screen(BrowseScreen(chosen))
        elif len(self.runs) == 1:
            self.switch_screen(BrowseScreen(self.runs[0]))
        else:
            self.switch_screen(RunsScreen(self.runs))

    @on(StoreFailed)
    def show_problem(self, message: StoreFailed) -> None:
        self.switch_screen(ProblemScreen(message.title, message.message))

    def action_help(self) -> None:
        from mmtui.tui.screens.help import HelpScreen  # Markdown: imported when first asked for

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def on_unmount(self) -> None:
        if self.session is not None:
            self.session.close()


def make_app(
    db_path: Path | str,
    *,
    run_id: str | None = None,
    graphics: str = "auto",
    device: str = "auto",
    page: int = PAGE,
) -> BrowseApp:
    """The browser of the store at `db_path`.

    graphics: "auto" (real pixels when textual-image found Sixel or the kitty protocol, else half blocks),
    "pixels" or "halfblock". device: where a heatmap or an ablation loads the model. page: rows the neuron
    table holds at once.
    """
    if graphics not in GRAPHICS:
        raise ValueError(f"graphics must be one of {', '.join(GRAPHICS)}, not {graphics!r}")
    if graphics == "auto":
        from mmtui.tui.widgets.picture import pixel_graphics_available

        graphics = "pixels" if pixel_graphics_available() else "halfblock"
    return BrowseApp(Path(db_path), run_id=run_id, graphics=graphics, device=device, page=page)
