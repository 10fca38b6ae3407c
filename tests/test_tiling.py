"""Tiled execution gives the untiled result, and really bounds the memory."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import torch

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import save_native
from vqcli.model.blocks import Downsample
from vqcli.speed import bands, stages, tiling
from vqcli.speed.bands import whole_stats
from vqcli.speed.budget import parse_size
from vqcli.speed.tiling import bounded_memory
from vqcli.train import TRAIN_PRESETS


def _randomised(config: AutoEncoderConfig, seed: int = 0) -> AutoEncoder:
    """A model whose GroupNorm affines are not the identity, so that wrong statistics show."""
    torch.manual_seed(seed)
    model = AutoEncoder(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a busy two-core machine a second one mostly spins in OpenMP's barriers (the
    bands are many small convolutions), burning many times the CPU of the work itself."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


KL = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4)
VQ = AutoEncoderConfig(kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=2, z_channels=4, n_embed=64)
# attention at a level (a map that must stay whole inside the network), average-pool downsampling
ATTN = AutoEncoderConfig(
    kind="kl", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), z_channels=4, resolution=32,
    resamp_with_conv=False,
)


@pytest.fixture
def banded_runs(monkeypatch):
    """How many segments ran in bands (so that a test knows the tiled path really ran)."""
    calls = []
    original = stages._run_banded

    def spy(steps, inputs, budget, spill=None):
        calls.append((len(steps), tuple(inputs[-1].shape)))
        return original(steps, inputs, budget, spill)

    monkeypatch.setattr(tiling, "_run_banded", spy)
    return calls


@pytest.fixture
def staged_runs(monkeypatch):
    """How many banded segments ran in stages through temporary files."""
    calls = []
    original = stages._run_staged

    def spy(steps, *args):
        calls.append(len(steps))
        return original(steps, *args)

    monkeypatch.setattr(stages, "_run_staged", spy)
    return calls


def test_bands_cover_every_row_once():
    model = _randomised(KL)
    steps = tiling._block_unit(model.encoder.down[0].block[0]).steps
    shapes = [(32, 37, 50)] * (len(steps) + 1)
    for budget in (1, 200_000, 10**9):
        covered = torch.zeros(37, dtype=torch.int32)
        for lo, hi in bands._bands(steps, shapes, 1, budget):
            covered[lo:hi] += 1
        assert torch.equal(covered, torch.ones_like(covered)), budget


@pytest.mark.parametrize(
    "layer",
    ["conv", "block", "block-shortcut", "upsample", "downsample", "avgpool", "out"],
)
def test_every_band_of_every_layer_equals_the_whole_map(layer):
    """Any rows of a layer's output, computed from the rows around them (odd starts, borders,
    single rows), equal those rows of the untiled output."""
    model = _randomised(KL)
    enc, dec = model.encoder, model.decoder
    x = torch.randn(2, 32, 22, 18)
    units = {
        "conv": (tiling._Unit([bands._Conv(enc.down[0].block[0].conv1)], enc.down[0].block[0].conv1), x),
        "block": (tiling._block_unit(enc.down[0].block[0]), x),
        "block-shortcut": (tiling._block_unit(enc.down[1].block[0]), x),
        "upsample": (tiling._upsample_unit(dec.up[1].upsample), torch.randn(2, 64, 11, 9)),
        "downsample": (tiling._Unit([bands._Down(enc.down[0].downsample)], enc.down[0].downsample), x),
        "avgpool": (tiling._Unit([bands._Down(Downsample(32, with_conv=False))], Downsample(32, False)), x),
        "out": (tiling._decoder_units(dec)[-1], x),
    }
    unit, x = units[layer]
    shapes = [tuple(x.shape[1:])]
    for step in unit.steps:
        shapes.append(step.shape(*shapes[-1]))
    stats = {}
    with torch.inference_mode():
        whole = unit.whole(x)
        # the statistics of each norm's input in the untiled network
        h = x
        for step in unit.steps:
            if isinstance(step, bands._Norm):
                stats[step] = bands.whole_stats(h, step.norm.num_groups)
            if not isinstance(step, bands._Push):
                h = step.run(bands._Band(h, 0, h.shape[2]), stats).t if not isinstance(step, bands._Add) else h
        height = shapes[-1][1]
        assert whole.shape[1:] == torch.Size(shapes[-1])
        for lo in range(height):
            for hi in range(lo + 1, min(height, lo + 4) + 1):
                band = bands._forward(unit.steps, shapes, x, lo, hi, stats)
                assert (band.r0, band.r1) == (lo, hi)
                torch.testing.assert_close(band.t, whole[:, :, lo:hi], rtol=1e-5, atol=1e-5)


def _plan_of(config: AutoEncoderConfig, size: int, budget: int, coder: str, spill: bool = False):
    model = AutoEncoder(config)
    if coder == "decoder":
        units = tiling._decoder_units(model.decoder)
        shape = (config.ch * config.ch_mult[-1], size // config.downsampling, size // config.downsampling)
    else:
        units, shape = tiling._encoder_units(model.encoder), (3, size, size)
    shapes = [shape]
    for unit in units:
        shapes.append(unit.shape(shapes[-1]))
    plan = tiling._plan(units, shapes, 1, budget, spill)
    return units, shapes, plan


SD = AutoEncoderConfig(kind="kl", ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4)


@pytest.mark.parametrize("spill", [False, True], ids=["recompute", "files"])
@pytest.mark.parametrize("coder", ["decoder", "encoder"])
@pytest.mark.parametrize("config", [SD, TRAIN_PRESETS["default"]], ids=["sd", "default"])
def test_plans_keep_within_the_budget_and_work_falls_as_it_grows(config, coder, spill):
    """At 4096 px: every segment held within the budget (whole maps within 3/4 of it, untiled units
    within it), the units covered in order, and more memory never means more work."""
    gib = 2**30
    works = []
    for budget in (2 * gib, 4 * gib, 8 * gib, 256 * gib):
        units, shapes, plan = _plan_of(config, 4096, budget, coder, spill)
        assert [start for start, _, _ in plan] == [0] + [end for _, end, _ in plan[:-1]]
        assert plan[-1][1] == len(units)
        work = 0.0
        for start, end, banded in plan:
            held = 4 * (np.prod(shapes[start]) + np.prod(shapes[end]))
            steps, sh = tiling._segment(units, shapes, start, end)
            if banded:
                assert held <= budget * 3 // 4
                work += tiling._banded_flops(steps, sh, spill)
            else:
                assert end == start + 1
                size_in, size_out = (4 * int(np.prod(shapes[k])) for k in (start, end))
                assert units[start].barrier or tiling._whole_bytes(units[start], size_in, size_out) <= budget
                work += sum(tiling._step_flops(st, sh[j], sh[j + 1]) for j, st in enumerate(steps))
        works.append(work)
    assert all(a >= b for a, b in zip(works, works[1:])), works
    assert all(not banded for _, _, banded in plan)  # 256 GB: everything untiled


_UNIT_MEMORY = textwrap.dedent(
    """
    import json, torch
    from vqcli import AutoEncoder, AutoEncoderConfig
    from vqcli.speed import tiling
    from vqcli.speed.fastpath import use_fast_paths

    def rss(field):  # kB -> bytes
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    torch.set_grad_enabled(False)
    model = use_fast_paths(AutoEncoder(AutoEncoderConfig(ch=64, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)).eval())
    found = []
    for units, shape in ((tiling._encoder_units(model.encoder), (3, 512, 512)),
                         (tiling._decoder_units(model.decoder), (128, 256, 256))):
        x = torch.randn(2, *shape)
        for unit in units:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak RSS starts again from the present one
            base = rss("VmRSS")
            y = unit.whole(x)
            size_in, size_out = x.numel() * 4, y.numel() * 4
            found.append([type(unit.steps[0]).__name__, size_in, size_out, rss("VmHWM") - base + size_in,
                          tiling._whole_bytes(unit, size_in, size_out)])
            x = y
    print(json.dumps(found))
    """
)


def test_untiled_units_hold_no_more_than_the_planner_prices():
    """Every kind of unit (conv_in, residual blocks keeping, doubling and halving their channels,
    down- and upsampling, the output layers), run untiled in a fresh process: the peak RSS over what
    was there before, plus its input, stays within the planner's price (2% for the kernels' own
    scratch space, which the planner's headroom covers); and the price is no more than
    twice that (the planner must not band work that fits: the SD decoder at 512 px, batch 4)."""
    out = subprocess.run([sys.executable, "-c", _UNIT_MEMORY], capture_output=True, text=True, check=True).stdout
    units = json.loads(out)
    assert {u[0] for u in units} >= {"_Conv", "_Push", "_Down", "_Up", "_Norm"}
    for kind, size_in, size_out, held, price in units:
        assert held <= 1.02 * price, (kind, size_in, size_out, held / 2**20, price / 2**20)  # (kernels' scratch)
        assert price <= 2 * held, (kind, size_in, size_out, held / 2**20, price / 2**20)


def test_stages_through_files_cut_the_work_of_long_banded_segments():
    """The SD decoder at 4096 px with 4 GB: its last two levels are one banded segment (their maps
    cannot be held); recomputing it up to each norm plans 7.5x the untiled work, stages through
    files about 1.4x (the files' writing and reading counted as work)."""
    untiled = 0.0
    units, shapes, _ = _plan_of(SD, 4096, 2**40, "decoder")
    for i in range(len(units)):
        steps, sh = tiling._segment(units, shapes, i, i + 1)
        untiled += sum(tiling._step_flops(st, sh[j], sh[j + 1]) for j, st in enumerate(steps))
    work = {}
    for spill in (False, True):
        _, _, plan = _plan_of(SD, 4096, 4 * 2**30, "decoder", spill)
        work[spill] = 0.0
        for start, end, banded in plan:
            steps, sh = tiling._segment(units, shapes, start, end)
            work[spill] += tiling._banded_flops(steps, sh, spill) if banded else sum(
                tiling._step_flops(st, sh[j], sh[j + 1]) for j, st in enumerate(steps))
    assert work[False] > 5 * untiled
    assert work[True] < 1.6 * untiled


def test_whole_stats_match_group_norm_statistics():
    x = torch.randn(2, 64, 19, 23) * 3 + 1
    grouped = x.reshape(2, 32, -1)
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        mean, var = whole_stats(t, 32)
        torch.testing.assert_close(mean, grouped.mean(-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var, grouped.var(-1, unbiased=False), rtol=1e-5, atol=1e-5)


def _near_tie(model: AutoEncoder, moments: torch.Tensor, margin: float) -> torch.Tensor:
    """Latent positions whose two nearest codes are within ``margin`` of each other."""
    flat = moments.permute(0, 2, 3, 1).reshape(-1, moments.shape[1])
    nearest = torch.cdist(flat, model.quantize.embedding.weight).topk(2, largest=False).values
    return (nearest[:, 1] - nearest[:, 0] < margin).reshape(moments.shape[0], *moments.shape[2:])


@pytest.mark.parametrize(
    "config, budget",
    [
        (KL, 48 * 1024),  # nothing fits: the whole high-resolution part in bands, one segment
        (KL, 2 * 2**20),  # some maps kept whole, some blocks in bands
        (VQ, 48 * 1024),
        (VQ, 2 * 2**20),
        (ATTN, 256 * 1024),  # the level's attention between banded segments
        (TRAIN_PRESETS["default"], 1 * 2**20),  # the embedded default model's architecture
    ],
    ids=["kl-tiny-budget", "kl-some-budget", "vq-tiny-budget", "vq-some-budget", "attention-avgpool", "default"],
)
@pytest.mark.parametrize("spill", [True, False], ids=["files", "recompute"])
def test_tiled_encode_and_decode_equal_untiled(config, budget, spill, banded_runs, staged_runs, monkeypatch, tmp_path):
    """Both ways of banding: stages through temporary files, and recomputing for each norm."""
    monkeypatch.setattr(tiling, "spill_directory", lambda: str(tmp_path) if spill else None)
    model = _randomised(config)
    x = torch.rand(2, 3, 96, 136) * 2 - 1  # a batch: the statistics are per image
    x[1] = x[1] * 0.3 + 0.5
    with torch.inference_mode():
        moments = model.encode_moments(x)
        z = model.encode(x)
        image = model.decode(z)
        with bounded_memory(model, budget=budget):
            moments_tiled = model.encode_moments(x)
            image_tiled = model.decode(z)
            indices_tiled = model.encode_indices(x) if config.kind == "vq" else None
    assert len(banded_runs) >= 2  # the encoder and the decoder ran in bands
    if not spill:
        assert staged_runs == []
    elif budget == 48 * 1024:  # one long banded segment: stages pay
        assert staged_runs
    assert list(tmp_path.iterdir()) == []  # the temporary files are gone
    assert (moments_tiled - moments).abs().max().item() <= 1e-5
    assert (image_tiled - image).abs().max().item() <= 5e-5
    if config.kind == "vq":
        with torch.inference_mode():
            indices = model.encode_indices(x)
        differ = indices_tiled != indices
        assert not (differ & ~_near_tie(model, moments, 1e-4)).any()  # only where float rounding decides


def test_a_budget_that_fits_runs_the_plain_network(banded_runs):
    model = _randomised(KL)
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.inference_mode():
        z = model.encode(x)
        image = model.decode(z)
        with bounded_memory(model, budget=2**40):
            assert torch.equal(model.encode(x), z)
            assert torch.equal(model.decode(z), image)
    assert banded_runs == []


@pytest.mark.parametrize("dtype, memory_format", [(torch.float32, torch.contiguous_format), (torch.bfloat16, torch.channels_last)])
def test_a_spilled_map_gives_back_any_rows(tmp_path, dtype, memory_format):
    whole = torch.randn(2, 5, 23, 7).to(dtype).contiguous(memory_format=memory_format)
    spilled = stages._Spilled(str(tmp_path), tuple(whole.shape), memory_format)
    for lo in (16, 0, 9, 4):  # bands written in any order
        hi = {0: 4, 4: 9, 9: 16, 16: 23}[lo]
        spilled.write(bands._Band(whole[:, :, lo:hi], lo, 23))
    for lo, hi in ((0, 23), (3, 4), (5, 20), (22, 23)):
        rows = spilled.read(lo, hi)
        assert rows.dtype == dtype and rows.is_contiguous(memory_format=memory_format)
        assert torch.equal(rows, whole[:, :, lo:hi])
    spilled.close()


def test_too_little_disk_for_the_files_means_recomputing(monkeypatch, tmp_path, staged_runs, caplog):
    monkeypatch.setattr(tiling, "spill_directory", lambda: str(tmp_path))
    monkeypatch.setattr(tiling, "_free_disk", lambda directory: 1000)
    model = _randomised(KL)
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.inference_mode():
        z = model.encode(x)
        with bounded_memory(model, budget=48 * 1024), caplog.at_level("WARNING", logger="vqcli.tiling"):
            z_tiled = model.encode(x)
    assert staged_runs == []
    assert f"0 MB free in {tmp_path}" in caplog.text and "recomputing instead" in caplog.text
    assert (z_tiled - z).abs().max().item() <= 1e-5


def test_a_full_disk_names_the_temporary_directory(monkeypatch, tmp_path):
    import errno
    import os

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tiling, "spill_directory", lambda: str(tmp_path))
    monkeypatch.setattr(os, "pwrite", full)
    model = _randomised(KL)
    with torch.inference_mode(), bounded_memory(model, budget=48 * 1024):
        with pytest.raises(OSError, match=f"temporary file in {tmp_path}: No space left on device .*TMPDIR"):
            model.encode(torch.rand(1, 3, 64, 96) * 2 - 1)
    assert list(tmp_path.iterdir()) == []


_MOUNTINFO = """\
22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:21 / /tmp rw,nosuid shared:2 - tmpfs tmpfs rw,size=4g
24 23 252:1 / /tmp/big\\040disk rw shared:3 - xfs /dev/vdb rw
25 22 0:22 / /dev/shm rw shared:4 opt:x - tmpfs tmpfs rw
"""


def test_files_kept_in_memory_are_recognised_from_the_mount_table():
    assert not stages._in_memory("/", _MOUNTINFO)
    assert not stages._in_memory("/var/tmp", _MOUNTINFO)
    assert stages._in_memory("/tmp", _MOUNTINFO)
    assert stages._in_memory("/tmp/x/y", _MOUNTINFO)
    assert not stages._in_memory("/tmp/big disk/x", _MOUNTINFO)  # a disk mounted inside the tmpfs
    assert stages._in_memory("/dev/shm", _MOUNTINFO)  # optional fields before the separator
    assert not stages._in_memory("/tmpfoo", _MOUNTINFO)


def test_temporary_files_go_where_the_disk_is(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(stages, "_in_memory", lambda path: False)
    assert stages.spill_directory() == str(tmp_path)
    monkeypatch.setattr(stages, "_in_memory", lambda path: path == str(tmp_path))
    assert stages.spill_directory() == "/var/tmp"
    monkeypatch.setattr(stages, "_in_memory", lambda path: True)
    assert stages.spill_directory() is None


def test_bfloat16_channels_last_tiled_as_close_to_float32_as_untiled(banded_runs):
    """The CLI's reduced-precision path (autocast, channels-last) through bands: bfloat16 rounds
    differently where the kernels differ, so the bands are held to the untiled run's own error."""
    from vqcli.speed.context import compute_context, prepare_model

    model = _randomised(KL)
    x = torch.rand(1, 3, 96, 128) * 2 - 1
    with compute_context(torch.device("cpu"), torch.float32, model=model, budget=2**40):
        z32 = model.encode(x)
        image32 = model.decode(z32)
    prepare_model(model, torch.device("cpu"), torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    errors = {}
    for name, budget in (("whole", 2**40), ("tiled", 96 * 1024)):
        with compute_context(torch.device("cpu"), torch.bfloat16, model=model, budget=budget):
            z = model.encode(x)
            image = model.decode(z32)
        assert image.shape == image32.shape
        errors[name] = ((z.float() - z32).abs().mean().item(), (image.float() - image32).abs().mean().item())
    assert banded_runs
    for tiled, whole in zip(errors["tiled"], errors["whole"]):
        assert tiled <= 1.5 * whole + 1e-4, errors


def test_tiling_with_per_tile_statistics_would_differ():
    """The guard of the test above: normalising each tile by itself is visibly wrong."""
    model = _randomised(KL)
    x = torch.rand(1, 3, 160, 224) * 2 - 1
    block = model.encoder.down[0].block[0]
    with torch.inference_mode():
        h = model.encoder.conv_in(x)
        whole = block(h)
        left, right = block(h[..., :112]), block(h[..., 112:])
    assert (torch.cat([left, right], dim=-1) - whole).abs().max().item() > 1e-2


def test_tiling_leaves_the_model_as_it_was():
    model = _randomised(KL)
    with bounded_memory(model, budget=1024):
        assert "run_high_res" in vars(model.decoder)
    assert all("forward" not in vars(m) and "run_high_res" not in vars(m) for m in model.modules())


def test_features_are_all_there_under_a_budget():
    """Every intermediate map wanted: the high-resolution part runs whole, as it must to give them."""
    model = _randomised(KL)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        out, features = model.encoder.forward_with_features_output(x)
        with bounded_memory(model, budget=1024):
            out_b, features_b = model.encoder.forward_with_features_output(x)
    assert list(features) == list(features_b)
    for name in features:
        torch.testing.assert_close(features_b[name], features[name], rtol=1e-5, atol=1e-5)


def test_training_runs_the_plain_network(banded_runs):
    """With gradients nothing is banded (the bands hold no graph), and the gradients flow."""
    model = _randomised(KL).train()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with bounded_memory(model, budget=1024):
        model.decode(model.encode(x)).square().mean().backward()
    assert model.encoder.conv_in.weight.grad is not None
    assert banded_runs == []


def test_parse_size():
    assert parse_size("8GB") == 8 * 2**30
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError, match="not a memory size"):
        parse_size("lots")


_PEAK = textwrap.dedent(
    """
    import json, sys, torch
    from vqcli import AutoEncoder, AutoEncoderConfig
    from vqcli.speed.tiling import bounded_memory
    torch.set_num_threads(1)
    tiled = sys.argv[1] == "tiled"
    model = AutoEncoder(AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=4)).eval()
    z = torch.randn(1, 4, 128, 128)  # f8: a 1024x1024 image, a cheap 16,384-token middle attention
    def peak_kb():  # VmHWM: this program's own high-water mark (ru_maxrss keeps the forking parent's)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    base = peak_kb()
    with torch.inference_mode():
        if tiled:
            with bounded_memory(model, budget=64 * 2**20):
                out = model.decode(z)
        else:
            out = model.decode(z)
    print(json.dumps({"growth_mb": (peak_kb() - base) / 1024}))
    """
)


@pytest.mark.slow
def test_tiled_decode_really_uses_less_memory():
    """A 1024x1024 decode: untiled, four or five maps of the image's size (32 or 64 channels) are
    alive at once inside a residual block; tiled, two. Peak RSS growth measured in fresh processes."""

    def growth(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _PEAK, mode], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)["growth_mb"]

    untiled, tiled = growth("untiled"), growth("tiled")
    one_map_mb = 64 * 1024 * 1024 * 4 / 2**20  # 64 channels at 1024x1024, float32: 256 MB
    assert tiled < untiled - one_map_mb, (tiled, untiled)


def test_cli_max_memory_gives_the_same_latents_and_images(tmp_path):
    """`--max-memory` small enough to tile every layer changes nothing but the memory."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from vqcli.cli import app

    model = tmp_path / "m.safetensors"
    save_native(_randomised(KL), model)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (72, 100, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    runner = CliRunner()
    for name, extra in (("whole", []), ("tiled", ["--max-memory", "64KB"])):
        for args in (
            ["encode", str(tmp_path / "a.png"), "-o", str(tmp_path / f"lat-{name}")],
            ["decode", str(tmp_path / f"lat-{name}"), "-o", str(tmp_path / f"rec-{name}")],
        ):
            result = runner.invoke(app, [*args, "--model", str(model), *extra])
            assert result.exit_code == 0, result.output
    whole = load_file(tmp_path / "lat-whole" / "a.png.safetensors")["latent"]
    tiled = load_file(tmp_path / "lat-tiled" / "a.png.safetensors")["latent"]
    assert (whole - tiled).abs().max().item() <= 1e-4
    a = np.asarray(Image.open(tmp_path / "rec-whole" / "a.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "rec-tiled" / "a.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # 8-bit rounding of equal floats at most one level apart

    bad = runner.invoke(app, ["decode", str(tmp_path / "lat-whole"), "-o", str(tmp_path / "x"), "--model", str(model), "--max-memory", "lots"])
    assert bad.exit_code == 2 and "--max-memory" in bad.stderr
