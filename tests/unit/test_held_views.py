"""The cap on a held screen view's properties (pipeline.max_held_view_bytes)."""

from __future__ import annotations

import msgspec

from evactors.core.model import EventRow
from evactors.pipeline.sessions import TRUNCATED, trim_properties


def _view(properties: dict[str, str]) -> EventRow:
    fields = {f.name: f.default for f in msgspec.structs.fields(EventRow)}
    row = {name: ("" if value is msgspec.NODEFAULT else value) for name, value in fields.items()}
    return EventRow(**{**row, "created_at": 0, "received_at": 0, "duration": 0, "latitude": None,
                       "longitude": None, "is_new_session": 0, "session_number": 0, "session_start": 0,
                       "is_bot": 0, "properties": properties})


def test_small_properties_are_left_alone() -> None:
    view = _view({"path": "/a", "title": "A"})
    trim_properties(view, 4096)
    assert view.properties == {"path": "/a", "title": "A"}


def test_the_largest_properties_go_first_and_are_named() -> None:
    view = _view({"path": "/a", "big": "x" * 5000, "mid": "y" * 900, "small": "z"})
    trim_properties(view, 1024)
    assert view.properties == {"path": "/a", "mid": "y" * 900, "small": "z", TRUNCATED: "big"}
    assert len(msgspec.json.encode(view.properties)) <= 1024 + 64
