"""The notice that stands in a followed log for lines lost there."""

from __future__ import annotations

import copy
import pickle

from dspy_infra import LinesDropped


def test_a_lines_dropped_notice_survives_a_copy_and_a_pickle() -> None:
    notice = LinesDropped(5)
    for again in (copy.copy(notice), pickle.loads(pickle.dumps(notice))):
        assert isinstance(again, LinesDropped)
        assert again == notice == "[dspy-infra: 5 log lines dropped: read too slowly to keep up]"
        assert again.dropped == 5
