"""One progress shape, (fraction, message), and `within` for the stages of a longer job."""

from __future__ import annotations

import pytest

from workbench.progress import within


def test_within_maps_a_stage_onto_its_share_and_clamps():
    said = []

    def record(fraction, message):
        said.append((fraction, message))

    within(record, 0.5, 1.0)(0.25, "block 1/4")
    within(record, 0.2, 0.4)(2.0, "past the end")
    within(record, 0.2, 0.4)(-1.0, "before the start")
    assert said == [(pytest.approx(0.625), "block 1/4"), (pytest.approx(0.4), "past the end"),
                    (pytest.approx(0.2), "before the start")]
    assert within(None, 0, 1) is None
