"""The deterministic split of the inputs (``vqcli.shards`` and the pipeline's selection stage).

Oracles: brute force over every assignment for the balance bound; sets of the jobs a plain
(unsplit) listing gives for the coverage of the pieces.
"""

from __future__ import annotations

import itertools
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vqcli.errors import UsageError, VqcliError
from vqcli.pipeline import shards
from vqcli.pipeline.batching import Item, batched
from vqcli.pipeline.jobs import image_jobs
from vqcli.pipeline.results import FileResult, Job, TarJob
from vqcli.pipeline.selection import Selection, block_size, number_blocks, select_jobs

# --- parsing and combining ----------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [("0/1", (0, 1)), ("3/4", (3, 4)), (" 2 / 10 ", (2, 10))])
def test_parse_shard(text, want):
    share = shards.parse_shard(text)
    assert (share.index, share.count) == want
    assert str(share) == f"{want[0]}/{want[1]}"


@pytest.mark.parametrize("text", ["4/4", "1/0", "-1/3", "1", "a/b", "1/2/3", ""])
def test_parse_shard_refuses_what_is_not_a_shard(text):
    with pytest.raises(UsageError, match="--shard"):
        shards.parse_shard(text)


@given(
    weights=st.lists(st.integers(1, 10**6), max_size=40),
    worlds=st.lists(st.integers(1, 5), min_size=1, max_size=6),
)
@settings(max_examples=60, deadline=None)
def test_a_shard_takes_the_same_inputs_whatever_its_number_of_ranks(weights, worlds):
    # each shard I of N runs with its own number of torchrun ranks (worlds[I]); together they take
    # every unit exactly once, and a shard's ranks together take what the shard alone takes
    n = len(worlds)
    taken = [0] * len(weights)
    for i, world in enumerate(worlds):
        alone = shards.select(weights, shards.Share(i, n))
        union = [False] * len(weights)
        for r in range(world):
            share = shards.combine(shards.Share(i, n), r, world)
            for u, mine in enumerate(shards.select(weights, share)):
                taken[u] += mine
                union[u] |= mine
        assert union == alone
    assert taken == [1] * len(weights)


def test_one_process_without_shard_takes_everything():
    assert shards.combine(None, 0, 1) is None
    assert shards.combine(shards.Share(1, 3), 0, 1) == shards.Share(1, 3)
    assert shards.combine(None, 1, 2) == shards.Share(0, 1, 1, 2)


def test_a_huge_shard_count_allocates_nothing_in_proportion():
    import tracemalloc

    tracemalloc.start()
    try:
        owner = shards.assign([5, 9, 1], 10**6)  # (the old heap held a million tuples: 100 MB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert owner == [1, 0, 2]  # heaviest first, each to the lowest untouched share
    assert peak < 100_000
    count = 10**20
    assert shards.parse_shard(f"{count - 1}/{count}") == shards.Share(count - 1, count)
    assert shards.select([5, 9, 1], shards.Share(2, count)) == [False, False, True]


# --- assignment ---------------------------------------------------------------------------------


def _loads(weights, owner, count):
    loads = [0] * count
    for w, s in zip(weights, owner):
        loads[s] += w
    return loads


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10**6), max_size=40), st.integers(1, 6))
def test_assignment_covers_every_unit_once_and_stays_within_one_unit_of_average(weights, count):
    owner = shards.assign(weights, count)
    assert len(owner) == len(weights) and all(0 <= s < count for s in owner)
    assert owner == shards.assign(list(weights), count)  # deterministic
    if weights:
        assert max(_loads(weights, owner, count)) <= sum(weights) / count + max(weights)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=1, max_size=8), st.integers(2, 3))
def test_assignment_is_within_four_thirds_of_the_best_split(weights, count):
    """The greedy rule's guarantee, against the best of all count**n assignments."""
    best = min(max(_loads(weights, owner, count)) for owner in itertools.product(range(count), repeat=len(weights)))
    got = max(_loads(weights, shards.assign(weights, count), count))
    assert got <= best * 4 / 3 + 1e-9


def test_balance_is_by_size_not_count():
    # one huge file and nine small ones: the huge one alone, the small ones together
    weights = [shards.unit_weight([10**9])] + [shards.unit_weight([1000])] * 9
    owner = shards.assign(weights, 2)
    assert owner.count(owner[0]) == 1


# --- the pipeline's selection -------------------------------------------------------------------


def _tree(root: Path) -> Path:
    """Images of varied sizes in nested folders, a tar shard, a non-image (bytes only: nothing is
    decoded here)."""
    for i, rel in enumerate(["a.png", "b.jpg", "sub/c.png", "sub/deep/d.png", "sub/e.webp", "z.png", "y/x.png"]):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * (100 * (i + 1) ** 3))
    with tarfile.open(root / "sub" / "shard.tar", "w") as tf:
        tf.add(root / "a.png", arcname="k1.png")
    (root / "notes.txt").write_text("skipped")
    return root


def _keys(items):
    return [(type(i).__name__, str(i.input)) for i in items]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("count", [1, 2, 3, 5, 11])
def test_shares_together_are_the_whole_exactly_once(tmp_path, count, batch):
    root = _tree(tmp_path / "in")
    out = tmp_path / "out"
    size = block_size(batch)
    whole = list(select_jobs(lambda: image_jobs([root], out), Selection(), size))
    assert len(whole) == 8
    pieces = [list(select_jobs(lambda: image_jobs([root], out), Selection(share=shards.Share(i, count)), size)) for i in range(count)]
    assert sorted(k for p in pieces for k in _keys(p)) == sorted(_keys(whole))
    # every share keeps the order of the whole list, and the blocks of the whole list
    position = {k: n for n, k in enumerate(_keys(whole))}
    blocks = {str(j.input): j.block for j in whole}
    for p in pieces:
        assert [position[k] for k in _keys(p)] == sorted(position[k] for k in _keys(p))
        assert all(j.block == blocks[str(j.input)] for j in p)
    assert any(isinstance(j, TarJob) for j in whole)


def test_listing_failures_go_to_share_zero_only(tmp_path):
    root = _tree(tmp_path / "in")
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "sub" / "c.png").write_bytes(b"collides with in/sub/c.png")
    make = lambda: image_jobs([root, other], tmp_path / "out")  # noqa: E731
    got = [list(select_jobs(make, Selection(share=shards.Share(i, 3)), 1)) for i in range(3)]
    failures = [[r for r in g if isinstance(r, FileResult)] for g in got]
    assert [len(f) for f in failures] == [1, 0, 0]
    assert "also the output of" in failures[0][0].reason


def test_digest_of_the_list_is_the_same_for_every_share_and_changes_with_a_size(tmp_path):
    root = _tree(tmp_path / "in")
    digests = []
    for i in range(3):
        sel = Selection(share=shards.Share(i, 3), listed=lambda d, n: digests.append((d, n)))
        list(select_jobs(lambda: image_jobs([root], tmp_path / "out"), sel, 1))
    assert len(set(digests)) == 1 and digests[0][1] == 8
    (root / "z.png").write_bytes(b"other size")
    sel = Selection(share=shards.Share(0, 3), listed=lambda d, n: digests.append((d, n)))
    list(select_jobs(lambda: image_jobs([root], tmp_path / "out"), sel, 1))
    assert digests[-1][0] != digests[0][0]


def test_inputs_changing_between_the_two_listings_is_an_error(tmp_path):
    root = _tree(tmp_path / "in")
    calls = []

    def make():
        calls.append(1)
        if len(calls) == 2:
            (root / "new.png").write_bytes(b"new")
        return image_jobs([root], tmp_path / "out")

    with pytest.raises(VqcliError, match="changed while"):
        list(select_jobs(make, Selection(share=shards.Share(0, 2)), 1))


def test_blocks_are_runs_of_files_and_each_tar_alone():
    jobs = [Job(Path(f"{i}.png"), Path("."), Path(f"{i}.png"), Path(f"o/{i}")) for i in range(5)]
    tar = TarJob(Path("t.tar"), Path("."), Path("t.tar"), Path("o/t.tar"))
    failed = FileResult(Path("bad"), None, "failed", "x")
    items = list(number_blocks([jobs[0], jobs[1], tar, failed, jobs[2], jobs[3], jobs[4]], 2))
    assert [getattr(i, "block", None) for i in items] == [0, 0, 1, None, 2, 2, 3]
    assert [i.block for i in number_blocks(jobs, 1)] == [0, 1, 2, 3, 4]


def test_batches_never_mix_blocks():
    """A batch holds the same images however the inputs are split: never two blocks' images."""
    items = [Item(Job(Path(f"{i}"), Path("."), Path(f"{i}"), Path("o"), block=i // 3), None, key=(0,), model=None) for i in range(10)]
    batches = list(batched(iter(items), 4))
    assert all(len({it.job.block for it in b}) == 1 for b in batches)
    assert sorted(it.job.block * 100 + int(str(it.job.input)) for b in batches for it in b) == sorted(
        i // 3 * 100 + i for i in range(10)
    )
    assert [len(b) for b in batches] == [3, 3, 3, 1]
