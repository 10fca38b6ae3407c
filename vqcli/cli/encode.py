"""``vqcli encode``: images to latent files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..images import DEFAULT_MAX_PIXELS
from ._app import app, handle_errors
from .common import (
    BatchOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxMemoryOpt,
    MaxPixelsOpt,
    ModelOpt,
    OverwriteOpt,
    PresetOpt,
    QuietOpt,
    RunReport,
    dtype_name,
    epilog,
    help_text,
    parse_max_memory,
    run_report,
    settle_dtype,
    setup_device,
)



HELP = help_text(
    """
    Encode images into latent files, one per image.

    Each image's path relative to the folder it was found in is mirrored under OUTPUT, with
    '.safetensors' appended to its whole name (a.png -> a.png.safetensors, so a.png and a.jpg do
    not collide). Files in folders whose extension is not an image format are skipped. Existing
    latent files are kept (the run resumes) unless --overwrite.

    Every image is read as RGB: EXIF orientation applied, transparency composited over white,
    animated images by their first frame. It is padded on the right and bottom to a multiple of
    the model's downsampling factor by mirroring, and its original size is recorded, so that
    'vqcli decode' gives back exactly that size.

    Latent files are plain safetensors: the tensor 'latent' (KL: the mean, float32 (C, h, w);
    VQ: codebook indices, int16 (h, w)) with the model, its config and the image size in the
    metadata. 'vqcli info FILE' shows it all.
    """
)


@app.command(
    help=HELP,
    epilog=epilog(
        "vqcli encode sample_images -o latents",
        "vqcli encode photos/ extra.jpg -o latents --model default-vq --batch-size 4",
        "vqcli encode photos/ -o latents --model sd-vae.safetensors --scaled --json",
    )
)
@handle_errors
def encode(
    inputs: Annotated[list[Path], typer.Argument(metavar="INPUT...", help="Image files and folders (folders are walked recursively).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the latent files (created if needed).")],
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    batch_size: BatchOpt = 1,
    sample: Annotated[bool, typer.Option("--sample", help="KL models: store a draw from the latent distribution, not its mean.")] = False,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, help="With --sample: seed of the draws (each image's draw also depends on its path).")] = None,
    scaled: Annotated[bool, typer.Option("--scaled", help="KL models: store diffusion-ready latents, (z - shift_factor) * scale_factor.")] = False,
    scale_factor: Annotated[Optional[float], typer.Option("--scale-factor", help="Override the model's latent scale factor.")] = None,
    shift_factor: Annotated[Optional[float], typer.Option("--shift-factor", help="Override the model's latent shift factor.")] = None,
    preset: PresetOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    max_memory: MaxMemoryOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    from ..images import is_image_path
    from ..models import model_ref, resolve_model
    from ..pipeline import EncodeOptions, check_inputs, count_inputs, encode_files

    check_inputs(inputs, output)
    torch_device, torch_dtype = setup_device(device, dtype)
    ae = resolve_model(
        model, device=torch_device, dtype=torch_dtype, preset=preset, scale_factor=scale_factor, shift_factor=shift_factor
    )
    torch_dtype = settle_dtype(ae, torch_device, torch_dtype)
    ref = model_ref(model)
    options = EncodeOptions(
        batch_size=batch_size,
        sample=sample,
        seed=seed,
        scaled=scaled,
        overwrite=overwrite,
        max_pixels=max_pixels or None,
        max_memory=parse_max_memory(max_memory),
    )
    results = encode_files(inputs, output, ae, ref, dtype=torch_dtype, options=options)
    extra = {
        "output": str(output),
        "model": {"name": ref.name, "sha256": ae.identity(), "kind": ae.config.kind},
        "device": str(torch_device),
        "dtype": dtype_name(torch_dtype),
    }
    report = RunReport(
        "encode",
        verb="encoded",
        count=lambda: count_inputs(inputs, is_image_path, exclude=output),
        quiet=quiet,
        as_json=as_json,
        extra=extra,
    )
    run_report(report, results)
