"""Tests for sandbox_boot.py in this process: the codec (what crosses between candidate and checker, and what is
refused), the length-prefixed messages, the candidate's answers and the checker's calls over real pipes. What needs
a sandbox (mounts, privileges, the verdict) is tested through sandbox.py in test_sandbox.py."""
import linecache
import math
import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sandbox_boot as B  # noqa: E402

LITERALS = [None, True, False, 0, -7, 2**100, 1.5, -0.0, math.inf, -math.inf, 1 - 2j, complex(-math.inf, 3), "", "é\n",
            b"\x00\xff", [], (), {}, set(), frozenset(), [1, (2, "3")], {"a": [1.0, None], 2: {3: b"x"}},
            {1, "two"}, frozenset({(1, 2)}), ((),), [[[]]]]


@pytest.mark.parametrize("value", LITERALS, ids=repr)
def test_literal_data_round_trips(value):
    back = B.parse(repr(B.plain(value)))
    assert back == value and type(back) is type(value)


def test_nan_and_subclasses_cross_as_builtins():
    assert math.isnan(B.parse(repr(B.plain(math.nan))))
    assert math.isnan(B.parse(repr(B.plain(complex(0, math.nan)))).imag)

    class Loud(int):
        def __repr__(self):
            return "__import__('os')"
    assert type(B.plain(Loud(3))) is int and B.parse(repr(B.plain([Loud(3)]))) == [3]
    assert type(B.plain(True)) is bool


@pytest.mark.parametrize("text", ["__import__('os').system('true')", "open('x')", "x", "a.b", "1 + 1", "[1] * 3",
                                  "{**{}}", "lambda: 0", "(i for i in ())", "f'{1}'", "set([1], 2)", "dict()",
                                  "-'a'", "1 + 2", "inf()", "...", "not 0"])
def test_parse_refuses_anything_but_a_literal(text):
    with pytest.raises((ValueError, SyntaxError)):
        B.parse(text)


@pytest.mark.parametrize("value", [object(), len, lambda: 0, (i for i in ()), range(3), [object()], {1: print},
                                   bytearray(b"x"), type, Exception("no")], ids=repr)
def test_other_types_do_not_cross(value):
    with pytest.raises(TypeError):
        B.plain(value)


def test_too_deep_does_not_cross():
    deep = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(TypeError, match="deeply"):
        B.plain(deep)


def test_messages_are_length_prefixed_and_bounded():
    r, w = os.pipe()
    B.send(w, "é" * 3)
    B.send(w, "")
    os.write(w, (B.MAX_MESSAGE + 1).to_bytes(8, "big"))  # a forged header: refused before any read of the body
    os.close(w)
    assert B.receive(r) == "ééé" and B.receive(r) == ""
    with pytest.raises(ValueError, match="too large"):
        B.receive(r)
    assert B.receive(r) is None  # end-of-file
    os.close(r)
    with pytest.raises(ValueError, match="too large"):
        B.send(-1, "x" * (B.MAX_MESSAGE + 1))


def test_a_cut_short_message_is_refused():
    r, w = os.pipe()
    os.write(w, (10).to_bytes(8, "big") + b"abc")
    os.close(w)
    with pytest.raises(ValueError, match="cut short"):
        B.receive(r)
    os.close(r)


def test_the_candidate_answers_with_plain_values_or_a_failure():
    ns = {"add": lambda a, b=0: a + b, "boom": lambda: 1 / 0, "obj": lambda: object(), "exit": lambda: exit(0),
          "tree": (1, 2)}
    ask = lambda name, args=(), kwargs=None: B.parse(B.answer(ns, repr(("call", name, list(args), kwargs or {}))))
    assert ask("add", [("value", 2)], {"b": ("value", 3)}) == ("ok", 5)
    assert ask("add", [("name", "tree"), ("value", (3,))]) == ("ok", (1, 2, 3))  # a setup object, by name
    assert ask("boom")[0] == "raise" and "ZeroDivisionError" in ask("boom")[1]
    assert ask("obj")[0] == "raise" and "cannot cross" in ask("obj")[1]
    assert ask("exit")[0] == "raise" and "SystemExit" in ask("exit")[1]
    assert ask("missing") == ("raise", "NameError: the solution defines no 'missing'")


def test_the_checker_calls_through_pipes_and_trusts_only_plain_answers():
    call_r, call_w = os.pipe()
    answer_r, answer_w = os.pipe()
    replies = [repr(("ok", [1, 2])), repr(("raise", "ValueError: no")), "__import__('os')", repr(("ok",)), None]

    def candidate():  # a scripted candidate: reads each call, sends the next reply, then hangs up
        for reply in replies:
            assert B.receive(call_r) is not None
            if reply is None:
                os.close(answer_w)
                return
            B.send(answer_w, reply)
    t = threading.Thread(target=candidate)
    t.start()
    f = B.Remote(B.Link(call_w, answer_r), "f")
    assert f(1, key="v") == [1, 2]
    for match in ("f: ValueError: no", "not plain data", "malformed", "the candidate ended"):
        with pytest.raises(B.CandidateError, match=match):
            f()
    t.join(5)
    for fd in (call_r, call_w, answer_r):
        os.close(fd)


def test_compiled_code_shows_its_lines_in_tracebacks():
    code = B.compiled("x = 1\nraise ValueError('here')\n", "boot_test_program.py")
    with pytest.raises(ValueError, match="here"):
        exec(code, {})
    assert linecache.getline("boot_test_program.py", 2) == "raise ValueError('here')\n"


def test_importing_changes_nothing_and_runs_nothing():
    """The module is the sandbox's whole program only as __main__; imported, it only defines names."""
    assert B.__name__ == "sandbox_boot" and callable(B.main)
    assert sys.get_int_max_str_digits() != 100_000
    assert os.uname().machine not in B.SECCOMP_ARCHES or len(B.SECCOMP_ARCHES[os.uname().machine]) == 2
