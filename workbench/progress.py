"""The one shape of a progress callback in the core: `progress(fraction, message)`.

`fraction` is the share of the job done, in [0, 1]; `message` says what is happening now. A
`gr.Progress` fits as it is, a notebook bar or a log line in one lambda. Long work also shows a
tqdm bar on the console; the callback is for whoever drives the job (a UI, a script).

Every long call in the core takes this shape: model loading and GGUF conversion, the prune (in
memory and out of core), recipes, sweeps (local and on Ray), evaluation, export. A job made of
stages hands each stage `within(progress, start, end)`.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[float, str], None]


def within(progress: Progress | None, start: float, end: float) -> Progress | None:
    """`progress` for one stage of a longer job: the stage's [0, 1] maps onto [start, end]."""
    if progress is None:
        return None
    return lambda fraction, message: progress(start + (end - start) * min(max(fraction, 0.0), 1.0), message)
