"""Reading ahead and writing behind in threads: same results, in order, bounded, errors in place."""

from __future__ import annotations

import json
import random
import signal
import threading
import time

import numpy as np
import pytest
from conftest import TINY_KL, randomize_
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from vqcli.checkpoints.native import save_native
from vqcli.cli import app
from vqcli.model.autoencoder import AutoEncoder
from vqcli.pipeline.overlap import WriteBehind, ordered_map


def test_ordered_map_keeps_order_whatever_finishes_first():
    delays = [random.Random(i).random() * 0.02 for i in range(40)]

    def slow(i):
        time.sleep(delays[i])
        return i * i

    assert list(ordered_map(slow, range(40), workers=4, ahead=6)) == [i * i for i in range(40)]
    assert list(ordered_map(slow, range(5), workers=0, ahead=6)) == [0, 1, 4, 9, 16]


def test_ordered_map_runs_at_most_ahead_calls_beyond_the_consumer():
    started, lock = [], threading.Lock()

    def note(i):
        with lock:
            started.append(i)
        return i

    consumed = 0
    for value in ordered_map(note, range(100), workers=3, ahead=5):
        consumed += 1
        time.sleep(0.002)
        with lock:
            assert len(started) <= consumed + 5
    assert consumed == 100


def test_ordered_map_raises_at_the_failing_items_turn():
    def fn(i):
        if i == 3:
            raise ValueError("three")
        return i

    got = []
    with pytest.raises(ValueError, match="three"):
        for value in ordered_map(fn, range(10), workers=2, ahead=4):
            got.append(value)
    assert got == [0, 1, 2]


def test_write_behind_keeps_order_and_drains():
    order, results = [], []
    with WriteBehind(depth=2) as writer:
        for i in range(10):
            def job(i=i):
                time.sleep(0.005 * (i % 3))
                order.append(i)
                return i

            results += writer.submit(job)
        results += writer.drain()
    assert order == list(range(10)) and results == list(range(10))


def test_a_result_not_taken_before_an_interrupt_is_given_by_drain():
    """Two writes finished together: the caller takes the first, Ctrl-C stops it before the second;
    drain still gives the second (before, it was lost, and the summary missed a file on disk)."""
    writer = WriteBehind(depth=4)
    go = threading.Event()
    assert list(writer.submit(lambda: (go.wait(10), "a")[1])) == []
    assert list(writer.submit(lambda: "b")) == []  # queued behind "a"
    go.set()
    deadline = time.monotonic() + 10
    while not all(f.done() for f in writer.pending) and time.monotonic() < deadline:
        time.sleep(0.01)
    given = writer.submit(lambda: "c")  # "a" and "b" are ready now
    assert next(given) == "a"
    # (interrupted here: nothing more is taken from ``given``)
    assert list(writer.drain()) == ["b", "c"]
    writer.close()


def test_ctrl_c_while_waiting_for_a_write_loses_no_result(ctrl_c_raises):
    """Ctrl-C while ``submit`` waits for the oldest write (the queue is full): that write still
    finishes, and ``drain`` gives its result. Before, it was taken off the queue before the wait
    and its result lost: the summary counted one file fewer than were on disk (seen in CI)."""
    import concurrent.futures as cf

    from vqcli.pipeline import overlap

    go = threading.Event()
    writer = WriteBehind(depth=1)
    assert list(writer.submit(lambda: (go.wait(10), "a")[1])) == []
    real_wait = cf.wait
    waiting = threading.Event()

    def wait(futures, *a, **k):  # the schedule, controlled: the signal comes once the wait has begun
        waiting.set()
        return real_wait(futures, *a, **k)

    def interrupt():
        waiting.wait(10)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # (to the main thread: it interrupts its wait)
        go.set()

    threading.Thread(target=interrupt).start()
    with pytest.raises(KeyboardInterrupt):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(overlap.cf, "wait", wait)
            list(writer.submit(lambda: "b"))  # two queued, depth 1: waits for "a"
            time.sleep(10)  # (were "a" done before the handler ran, Ctrl-C lands here)
    assert list(writer.drain()) == ["a", "b"]
    writer.close()


def test_ctrl_c_at_any_line_of_giving_loses_and_repeats_no_result():
    """A Ctrl-C raised at each line of ``WriteBehind._give`` in turn (the interrupt thrown in by a
    trace function, once): the caller, as ``_compute_and_write`` does, then drains, and every job's
    result comes exactly once. Before, a Ctrl-C just after a job was taken off the queue and before
    its result was kept lost that result (its file on disk, missing from the summary).

    One line is left out: the ``yield`` right after ``self._given = future``. CPython runs signal
    handlers only at calls and backward jumps, never between an attribute store and the yield that
    follows it; a trace function can raise there, a signal cannot."""
    import inspect
    import sys

    code = WriteBehind._give.__code__
    source = inspect.getsourcelines(code)[0]
    lines = [i for i, text in enumerate(source, start=code.co_firstlineno) if "yield result" in text]
    assert len(lines) == 1
    names = ["a", "b", "c", "d", "e"]
    interrupted_at = set()
    for n in range(200):
        seen = [0]

        def local(frame, event, arg, seen=seen, n=n):
            if event == "line" and frame.f_lineno != lines[0]:
                seen[0] += 1
                if seen[0] == n + 1:
                    interrupted_at.add(frame.f_lineno)
                    raise KeyboardInterrupt
            return local

        def tracer(frame, event, arg):
            return local if frame.f_code is code else None

        writer = WriteBehind(depth=1)
        given, submitted = [], []
        sys.settrace(tracer)
        try:
            for name in names:
                results = writer.submit(lambda name=name: name)
                submitted.append(name)
                for result in results:
                    given.append(result)
            given += writer.drain()
        except KeyboardInterrupt:
            sys.settrace(None)
            given += writer.drain()  # (as _compute_and_write does, then stops)
        finally:
            sys.settrace(None)
            writer.close()
        assert given == submitted, f"interrupt number {n + 1}"
        assert len(submitted) >= 1
        if seen[0] <= n:  # the whole run had fewer lines: every one has been tried
            break
    else:
        raise AssertionError("more lines than tried")
    body = set(range(code.co_firstlineno, code.co_firstlineno + len(source)))
    assert len(interrupted_at) >= 8 and interrupted_at <= body


def test_write_behind_finishes_submitted_writes_when_closed_early():
    done = []
    writer = WriteBehind(depth=8)
    for i in range(4):
        writer.submit(lambda i=i: (time.sleep(0.01), done.append(i)))
    writer.close()  # as when the run stops: nothing submitted is left half-done
    assert done == [0, 1, 2, 3]


def test_a_failed_write_stops_the_writes_queued_behind_it():
    """A write that raises (a full disk) stops the run; the writes queued behind it must not run:
    their results would never be reported, so a file they wrote would be one the summary misses."""
    ran = []
    go = threading.Event()
    writer = WriteBehind(depth=4)

    def fail():
        go.wait(10)
        ran.append("fail")
        raise OSError("no space")

    list(writer.submit(fail))
    for name in ("b", "c"):
        list(writer.submit(lambda name=name: ran.append(name)))  # queued behind the failing one
    go.set()
    with pytest.raises(OSError, match="no space"):
        list(writer.drain())
    writer.close()
    assert ran == ["fail"]


def test_a_failed_write_is_raised_after_the_results_written_before_it():
    """The schedule that made tests/faults/test_disk_full.py fail on a busy machine, forced: the
    second write finishes while the caller waits for nothing, the third fails, and the caller takes
    both at once. The second one's result must be given before the third's error (its file is on
    disk: the summary must count it), whatever the interleaving."""
    import concurrent.futures as cf

    second = threading.Event()
    writer = WriteBehind(depth=2)

    def full():
        raise OSError("no space")

    given = list(writer.submit(lambda: "r1"))
    given += list(writer.submit(lambda: second.wait(10) and "r2"))
    given += list(writer.submit(full))  # r1 taken (over the depth); r2 still running
    second.set()
    cf.wait(list(writer.pending))  # r2 done, the third failed: neither taken yet
    with pytest.raises(OSError, match="no space"):
        for result in writer.submit(lambda: "r4"):
            given.append(result)
    writer.close()
    assert given == ["r1", "r2"]


def test_cli_results_do_not_depend_on_io_threads(tmp_path):
    """Latents and images are bit-identical with 0, 1 and 3 I/O threads; a broken file fails the
    same way; the summaries agree."""
    model = tmp_path / "m.safetensors"
    save_native(randomize_(AutoEncoder(TINY_KL), 4), model)
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(24, 32), (24, 32), (40, 28), (24, 32), (33, 17), (24, 32)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(src / ("sub" if i % 2 else "") / f"{i}.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    runner = CliRunner()
    summaries, latents, images = {}, {}, {}
    for threads in ("0", "1", "3"):
        lat, rec = tmp_path / f"lat{threads}", tmp_path / f"rec{threads}"
        common = ["--model", str(model), "--io-threads", threads, "--batch-size", "2", "--json"]
        enc = runner.invoke(app, ["encode", str(src), "-o", str(lat), *common])
        assert enc.exit_code == 1, enc.output  # the broken file
        dec = runner.invoke(app, ["decode", str(lat), "-o", str(rec), *common])
        assert dec.exit_code == 0, dec.output
        summaries[threads] = {k: json.loads(r.stdout)[k] for r, k in ((enc, "done"), (enc, "failed"))}
        latents[threads] = {p.relative_to(lat).as_posix(): load_file(p)["latent"] for p in sorted(lat.rglob("*.safetensors"))}
        images[threads] = {p.relative_to(rec).as_posix(): np.asarray(Image.open(p)) for p in sorted(rec.rglob("*.png"))}
        assert "broken.png" in enc.stderr
    assert summaries["0"] == summaries["1"] == summaries["3"] and summaries["0"]["done"] == 6
    for threads in ("1", "3"):
        assert latents[threads].keys() == latents["0"].keys() and len(latents["0"]) == 6
        assert all(bool((latents[threads][k] == latents["0"][k]).all()) for k in latents["0"])
        assert images[threads].keys() == images["0"].keys()
        assert all(np.array_equal(images[threads][k], images["0"][k]) for k in images["0"])


def _encoding(tmp_path, count: int, options):
    """``encode_files`` started (nothing drawn yet) on ``count`` random 32x24 images of a folder,
    into ``tmp_path/lat``; the stream and that folder."""
    from vqcli.checkpoints.load import ModelRef
    from vqcli.pipeline.encode import encode_files

    model = randomize_(AutoEncoder(TINY_KL), 5).eval()
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(2)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(src / f"{i:02d}.png")
    out = tmp_path / "lat"
    return encode_files([src], out, model, ModelRef("m", False, tmp_path / "m.safetensors"), options=options), out


def test_ctrl_c_between_results_still_reports_every_file_written(tmp_path):
    """Ctrl-C can reach the caller between two results while files are being written behind: the
    caller throws it into the stream (cli.common.last_results) and gets those files' results, so
    the summary counts exactly the files on disk."""
    from vqcli.cli.common import last_results
    from vqcli.pipeline.encode import EncodeOptions
    from vqcli.pipeline.results import DONE

    stream, out = _encoding(tmp_path, 12, EncodeOptions(io_threads=2))
    seen = [next(stream) for _ in range(3)]
    seen += last_results(stream)  # as run_report does on KeyboardInterrupt
    with pytest.raises(StopIteration):
        next(stream)  # the stream is over
    done = {r.output.name for r in seen if r.status == DONE}
    on_disk = {p.name for p in out.glob("*.safetensors")}
    assert len(done) >= 3 and done == on_disk
    assert not [p for p in out.iterdir() if p.name.startswith(".vqcli-tmp-")]


@pytest.mark.parametrize("all_frames", [False, True])
def test_ctrl_c_reports_a_file_written_but_not_yet_given(tmp_path, monkeypatch, all_frames):
    """The case above made certain: a writer that always holds one finished write back (its file
    on disk, its result not given). Ctrl-C thrown into the stream after three results must reach
    the writer through every layer of ``encode_files`` (with and without --all-frames) and give
    that file's result: before, a wrapper's plain loop took the throw, and the file was written
    but missing from the summary."""
    import concurrent.futures as cf

    from vqcli.cli.common import last_results
    from vqcli.pipeline.encode import EncodeOptions
    from vqcli.pipeline.results import DONE

    def submit_holding_one_back(self, job):
        future = self.pool.submit(self._run, job)
        cf.wait([future])  # this write is on disk ...
        self.pending.append(future)
        return self._give(lambda: len(self.pending) > 1)  # ... but only the ones before it are given

    monkeypatch.setattr(WriteBehind, "submit", submit_holding_one_back)
    stream, out = _encoding(tmp_path, 6, EncodeOptions(io_threads=2, all_frames=all_frames))
    seen = [next(stream) for _ in range(3)]
    assert len(list(out.glob("*.safetensors"))) == 4  # the held-back write is there
    seen += last_results(stream)
    done = {r.output.name for r in seen if r.status == DONE}
    assert done == {p.name for p in out.glob("*.safetensors")} == {f"{i:02d}.png.safetensors" for i in range(4)}
