"""`checked` (the one-pass check and encode of `Connection.send`) means decode(encode(frame)).

For every frame class, valid frames and frames with up to three fields replaced by odd values
(which of several bad fields is named depends on the order of the checks): the same map (same
keys in the same order, so the same bytes) or the same `FieldError` message.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import ALL_FRAMES, Deliver, Result
from protocol.frames import FieldError, spec_of

from .helpers import frames_of

ODD = st.sampled_from([
    None, -1, 0, 1, 2**63, 1.5, True, False, "", "x", "\0", "a" * 129, "dm:", "dm:a b",
    "grp:ok", "-lead", "ok", b"", b"\xff" * 70, (), ("x",), [], {}, "é" * 16_385,
])
MAX_BODIES = st.sampled_from([0, 3, 64, 65_536])


def _reference(spec, frame, mb):
    wire = spec.encode(frame)
    spec.decode(wire, mb)
    return wire


def _outcome(fn, *args):
    try:
        return ("ok", list(fn(*args).items()))
    except FieldError as exc:
        return ("error", str(exc))
    except (TypeError, ValueError, AttributeError) as exc:  # Connection.send: "cannot encode"
        return ("cannot encode", type(exc))


@pytest.mark.parametrize("cls", ALL_FRAMES, ids=lambda c: c.__name__)
@given(data=st.data(), mb=MAX_BODIES)
def test_checked_is_encode_then_decode(cls, data, mb):
    spec = spec_of(cls)
    frame = data.draw(frames_of(cls))
    odd = data.draw(st.lists(st.sampled_from(cls._fields), max_size=3, unique=True))
    frame = frame._replace(**{field: data.draw(ODD) for field in odd})
    assert _outcome(spec.checked, frame, mb) == _outcome(_reference, spec, frame, mb)


@pytest.mark.parametrize("cls", [Deliver, Result], ids=lambda c: c.__name__)
def test_the_hot_frames_are_checked_in_one_pass(cls):
    # The frames sent for every message must not take the encode-then-decode fallback.
    assert "decode(" not in spec_of(cls).source.split("def checked")[1]
