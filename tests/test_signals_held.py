"""Counting a finished file cannot be cut in two by Ctrl-C or SIGTERM: the CLI holds the signals
while it counts, and sends them again after."""

from __future__ import annotations

import os
import signal

import pytest

from vqcli.cli._app import signals_held


def _interrupt_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    for _ in range(1000):  # (Python runs signal handlers between bytecodes: give it many)
        pass


def test_a_signal_inside_waits_for_the_end_and_is_sent_again():
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            _interrupt_self(signal.SIGINT)
            steps.append("after the signal")
            steps.append("still counting")
    assert steps == ["after the signal", "still counting"]


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
        for _ in range(1000):
            pass
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_nothing_held_means_nothing_sent():
    with signals_held():
        pass  # no exception on the way out
