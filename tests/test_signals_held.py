"""Counting a finished file cannot be cut in two by Ctrl-C or SIGTERM: the CLI holds the signals
while it counts, and sends them again after."""

from __future__ import annotations

import signal

import pytest

from vqcli.cli._app import signals_held


def _interrupt_self(signum: int) -> None:
    """``signum`` sent to this thread, its Python handler run before this returns. (``os.kill`` of
    the process let the kernel pick any thread, a worker left by an earlier test too, and the
    handler then ran whenever the main thread next looked: under load, after the section.)"""
    signal.raise_signal(signum)


def test_a_signal_inside_waits_for_the_end_and_is_sent_again(ctrl_c_raises):
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            _interrupt_self(signal.SIGINT)
            steps.append("after the signal")
            steps.append("still counting")
    assert steps == ["after the signal", "still counting"]


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals_held():
            _interrupt_self(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # nothing raised, the ignore kept
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_previous_handlers_are_back_afterwards():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with signals_held():
        assert signal.getsignal(signal.SIGINT) is not before[0]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_reaches_its_own_handler_after_the_section():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with signals_held():
            _interrupt_self(signal.SIGTERM)
            assert seen == []  # held
        assert seen == [signal.SIGTERM]  # sent again on the way out
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_nothing_held_means_nothing_sent():
    with signals_held():
        pass  # no exception on the way out
