"""The id checks remember the ids that matched: they must still mean exactly their patterns."""

from __future__ import annotations

import re

import hypothesis.strategies as st
from hypothesis import given

from protocol import fields
from protocol.frames import Deliver, FieldError, spec_of

USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}")
CONV_RE = re.compile(r"(?:dm|grp|chn):[A-Za-z0-9_.@+:-]+")

id_text = st.one_of(
    st.sampled_from(["grp:" + "a" * 156, "grp:" + "a" * 157, "dm:" + "b" * 200, "a" * 64,
                     "a" * 65, "", "dm:", "-a"]),
    st.from_regex(USER_RE, fullmatch=True),
    st.from_regex(CONV_RE, fullmatch=True),
    st.text(alphabet="abAB09_.@+-: \0é", max_size=170),
    st.builds(lambda a, b: a + b, st.sampled_from(["dm:", "grp:", "chn:", "x:"]),
              st.text(alphabet="ab:9-", max_size=170)),
)


class Sub(str):
    pass


@given(st.lists(id_text, max_size=30))
def test_checks_mean_their_patterns_first_time_and_after(values):
    """Asked twice (the second time a remembered id is a set lookup), in the frame decoders
    too, the answers are the patterns' own; a str subclass never passes."""
    spec = spec_of(Deliver)
    for _ in range(2):
        for v in values:
            assert fields.user_id(v) == (USER_RE.fullmatch(v) is not None)
            conv_ok = len(v) <= fields.MAX_CONV_CHARS and CONV_RE.fullmatch(v) is not None
            assert fields.conv_id(v) == conv_ok
            assert not fields.user_id(Sub(v)) and not fields.conv_id(Sub(v))
            wire = {"t": "deliver", "inbox_seq": 1, "kind": "msg", "conv": v, "seq": 1,
                    "from": v, "body": "b", "cid": "c", "ts": 1}
            try:
                spec.decode(wire, 1024)
                accepted = True
            except FieldError:
                accepted = False
            assert accepted == (conv_ok and USER_RE.fullmatch(v) is not None)


def test_the_remembered_ids_are_bounded():
    """Past the bound the memory is emptied, never grown."""
    for n in range(fields._KNOWN_MAX + 10):
        assert fields.user_id(f"u{n}")
        assert fields.conv_id(f"grp:{n}")
    assert len(fields._KNOWN_USERS) <= fields._KNOWN_MAX
    assert len(fields._KNOWN_CONVS) <= fields._KNOWN_MAX
    assert not fields.user_id("-bad") and "-bad" not in fields._KNOWN_USERS
