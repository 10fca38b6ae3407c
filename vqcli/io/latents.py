"""The latent file: one image's latent in a self-describing ``.safetensors`` file.

One tensor, under the key ``latent``:

- KL models: float32 ``(C, h, w)``, the Gaussian's mean (or a draw with ``sample``), raw or scaled;
- VQ models: the codebook indices ``(h, w)``, int16 when the codebook has at most 32,767 entries
  (int32 otherwise), so that they are small.

``h, w`` are the padded image size divided by the model's downsampling factor. The metadata (all
strings, as safetensors requires) says everything ``decode`` needs:

==================  ==========================================================================
``format``          ``vqcli.latent``
``format_version``  ``1``
``source``          the image's path relative to the folder it was found in (informative only:
                    output paths never come from metadata)
``width/height``    the original image size; ``padded_width/padded_height`` what was encoded;
                    ``padding`` = ``"right,bottom"`` pixels added by mirroring (see
                    ``pad_factor``)
``model``           the model's name; ``model_embedded`` ``true`` when it is an embedded model
``model_sha256``    ``AutoEncoder.identity()`` of the weights; ``model_config`` the config as JSON
``scale_factor``    ``shift_factor``: the model's latent factors; ``scaled`` ``true`` when the
                    tensor is ``(z - shift_factor) * scale_factor`` (diffusion-ready)
``kind``            ``kl`` or ``vq``; ``representation`` ``mean``, ``sample`` or ``indices``;
                    ``seed`` the draw's seed (``sample`` only); ``dtype`` the tensor's dtype
``icc_profile``     the name of the image's colour profile, converted to sRGB before encoding
                    (only for images that had one other than sRGB)
``frame``           with ``encode --all-frames``, of an animated image: the frame's index (from 0),
                    ``frames`` the file's frame count, ``frame_duration_ms`` how long it is shown
                    (where the format says)
==================  ==========================================================================

Every field is checked on reading (types, ranges, shapes against the config, index range, finite
values); anything wrong is a ``FileError`` naming the file.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vqcli.errors import ConfigError, FileError
from vqcli.io.atomic import atomic_path
from vqcli.io.images import check_pixels
from vqcli.io.padding import padded_size
from vqcli.io.safetensors import (
    LATENT_HEADER,
    read_safetensors,
    read_safetensors_header,
    short_name,
    write_safetensors,
)
from vqcli.model.autoencoder import AutoEncoder
from vqcli.model.config import AutoEncoderConfig

FORMAT = "vqcli.latent"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
KEY = "latent"
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INDEX_DTYPES = {"int16": torch.int16, "int32": torch.int32, "int64": torch.int64}
REPRESENTATIONS = {"kl": ("mean", "sample"), "vq": ("indices",)}


# safetensors' dtype names, as torch names them (for checking a header before reading the tensor)
HEADER_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


MAX_SIDE = 1 << 20  # no image side above a million pixels is believable


def pad_factor(height: int, width: int, factor: int) -> int:
    """The multiple an image of this size is padded to: the model's downsampling ``factor``, or
    twice that for an image no larger than ``factor`` x ``factor``.

    A 1x1 latent would leave GroupNorm one value per group in a model whose deepest level has 32
    channels (PyTorch refuses that), so the smallest latent is 2x2.
    """
    return 2 * factor if height <= factor and width <= factor else factor


def padded_dims(height: int, width: int, factor: int) -> tuple[int, int]:
    """The (height, width) an image is encoded at."""
    return padded_size(height, width, pad_factor(height, width, factor))


@dataclass(frozen=True)
class LatentMeta:
    """What a latent file says about its tensor."""

    source: str
    width: int
    height: int
    padded_width: int
    padded_height: int
    model: str
    model_embedded: bool
    model_sha256: str
    config: AutoEncoderConfig
    scale_factor: float
    shift_factor: float
    scaled: bool
    representation: str  # "mean" | "sample" | "indices"
    dtype: str
    seed: int | None = None
    input_stamp: str | None = None  # "size:mtime_ns" of the image it was made from (resume)
    recipe: str | None = None  # canonical JSON of what decided the result (model, options; resume)
    original_size: tuple[int, int] | None = None  # (height, width) before a resize (None: not resized)
    crop_top_left: tuple[int, int] = (0, 0)  # (top, left) of the crop in the resized image
    bucket: bool = False  # the size (height, width) is an aspect-ratio bucket (--buckets)
    icc_profile: str | None = None  # the colour profile the image was converted to sRGB from
    frame: tuple[int, int] | None = None  # (index, count): one frame of an animated image (--all-frames)
    frame_duration_ms: int | None = None  # how long that frame is shown

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def padding(self) -> tuple[int, int]:
        """Pixels added on the (right, bottom)."""
        return self.padded_width - self.width, self.padded_height - self.height

    @property
    def latent_shape(self) -> tuple[int, ...]:
        f = self.config.downsampling
        hw = (self.padded_height // f, self.padded_width // f)
        return hw if self.kind == "vq" else (self.config.latent_channels, *hw)

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "source": self.source,
            "width": str(self.width),
            "height": str(self.height),
            "padded_width": str(self.padded_width),
            "padded_height": str(self.padded_height),
            "padding": f"{self.padding[0]},{self.padding[1]}",
            "model": self.model,
            "model_embedded": _bool_text(self.model_embedded),
            "model_sha256": self.model_sha256,
            "model_config": json.dumps(self.config.to_dict(), sort_keys=True),
            "scale_factor": repr(float(self.scale_factor)),
            "shift_factor": repr(float(self.shift_factor)),
            "scaled": _bool_text(self.scaled),
            "kind": self.kind,
            "representation": self.representation,
            "dtype": self.dtype,
        }
        if self.seed is not None:
            meta["seed"] = str(self.seed)
        if self.input_stamp is not None:
            meta["input_stamp"] = self.input_stamp
        if self.recipe is not None:
            meta["recipe"] = self.recipe
        original = self.original_size or (self.height, self.width)
        meta["original_size"] = f"{original[0]},{original[1]}"
        meta["crop_top_left"] = f"{self.crop_top_left[0]},{self.crop_top_left[1]}"
        meta["target_size"] = f"{self.height},{self.width}"
        if self.bucket:
            meta["bucket"] = "true"
        if self.icc_profile is not None:
            meta["icc_profile"] = self.icc_profile
        if self.frame is not None:
            meta["frame"], meta["frames"] = str(self.frame[0]), str(self.frame[1])
            if self.frame_duration_ms is not None:
                meta["frame_duration_ms"] = str(self.frame_duration_ms)
        return meta

    def to_json(self) -> dict:
        """A JSON-friendly view (for ``vqcli info``)."""
        d = {k: v for k, v in self.to_metadata().items() if k != "model_config"}
        d.update(
            width=self.width,
            height=self.height,
            padded_width=self.padded_width,
            padded_height=self.padded_height,
            padding=list(self.padding),
            model_embedded=self.model_embedded,
            scale_factor=self.scale_factor,
            shift_factor=self.shift_factor,
            scaled=self.scaled,
            seed=self.seed,
            format_version=FORMAT_VERSION,
            config=self.config.to_dict(),
            latent_shape=list(self.latent_shape),
        )
        if self.frame is not None:
            d.update(frame=self.frame[0], frames=self.frame[1])
            if self.frame_duration_ms is not None:
                d["frame_duration_ms"] = self.frame_duration_ms
        return d


def _bool_text(value: bool) -> str:
    return "true" if value else "false"


# Tensors a latent file may hold besides ``latent``, each of its shape and dtype: the latent of the
# horizontally flipped image (--flip) and the log-variance of the posterior (--posterior, KL).
EXTRA_KEYS = ("latent_flipped", "latent_logvar", "latent_flipped_logvar")


@dataclass
class Latent:
    tensor: torch.Tensor  # (C, h, w) float for KL, (h, w) integer for VQ
    meta: LatentMeta
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # by EXTRA_KEYS name


def _utf8(name: str) -> str:
    """A file name as metadata can hold it: the bytes of a name that is not UTF-8 as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def make_meta(
    model: AutoEncoder,
    *,
    source: str,
    width: int,
    height: int,
    model_name: str,
    model_embedded: bool,
    representation: str,
    scaled: bool = False,
    seed: int | None = None,
    input_stamp: str | None = None,
    recipe: str | None = None,
    original_size: tuple[int, int] | None = None,
    crop_top_left: tuple[int, int] = (0, 0),
    bucket: bool = False,
    dtype: str | None = None,
    icc_profile: str | None = None,
    frame: tuple[int, int] | None = None,
    frame_duration_ms: int | None = None,
) -> LatentMeta:
    """The metadata for a latent of a ``width`` x ``height`` image made by ``model``."""
    c = model.config
    ph, pw = padded_dims(height, width, c.downsampling)
    return LatentMeta(
        source=_utf8(source),
        width=width,
        height=height,
        padded_width=pw,
        padded_height=ph,
        model=_utf8(model_name),
        model_embedded=model_embedded,
        model_sha256=model.identity(),
        config=c,
        scale_factor=c.scale_factor,
        shift_factor=c.shift_factor,
        scaled=scaled,
        representation=representation,
        dtype=dtype if dtype is not None and c.kind == "kl" else storage_dtype_name(c),
        seed=seed,
        input_stamp=input_stamp,
        recipe=recipe,
        original_size=original_size,
        crop_top_left=crop_top_left,
        bucket=bucket,
        icc_profile=_utf8(icc_profile[:256]) if icc_profile else None,
        frame=frame,
        frame_duration_ms=frame_duration_ms if frame is not None else None,
    )


def storage_dtype_name(config: AutoEncoderConfig) -> str:
    """The dtype latents of this model are stored in."""
    if config.kind == "vq":
        return "int16" if config.n_embed <= 32767 else "int32"
    return "float32"


def to_storage(tensor: torch.Tensor, meta: LatentMeta) -> torch.Tensor:
    """The tensor as it is written: on the CPU, contiguous, in the recorded dtype."""
    dtype = INDEX_DTYPES.get(meta.dtype) or FLOAT_DTYPES[meta.dtype]
    return tensor.detach().to("cpu", dtype).contiguous()


def stored_tensors(tensor: torch.Tensor, meta: LatentMeta, extras: dict[str, torch.Tensor] | None = None) -> dict:
    """The tensors of a latent file, as written (checked against the metadata)."""
    tensors = {KEY: to_storage(tensor, meta)}
    for name, extra in (extras or {}).items():
        if name not in EXTRA_KEYS:
            raise ValueError(f"{name!r} is not a tensor a latent file holds ({', '.join(EXTRA_KEYS)})")
        tensors[name] = to_storage(extra, meta)
    for name, stored in tensors.items():
        if tuple(stored.shape) != meta.latent_shape:
            raise ValueError(f"{name} shape {tuple(stored.shape)} does not match its metadata {meta.latent_shape}")
    return tensors


def write_latent(
    path: str | os.PathLike,
    tensor: torch.Tensor,
    meta: LatentMeta,
    *,
    overwrite: bool = False,
    extras: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write one latent file atomically (``FileExistsError`` if it exists and not ``overwrite``)."""
    buffer = io.BytesIO()
    # (the same latent, the same bytes)
    write_safetensors(buffer, stored_tensors(tensor, meta, extras), meta.to_metadata())
    # written by Python, not by safetensors' save_file, which takes only paths that are UTF-8 (a
    # subfolder named in Latin-1 is mirrored in the output) and fails with an error of its own
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())


def is_latent_file(path: str | os.PathLike) -> bool:
    """True when ``path`` looks like a vqcli latent file from its header (nothing else is read)."""
    try:
        header = read_safetensors_header(Path(path), LATENT_HEADER)
    except (FileError, OSError):
        return False
    meta = header.get("__metadata__")
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def read_latent(path: str | os.PathLike, *, max_pixels: int | None = None) -> Latent:
    """Read and validate a latent file, or raise ``FileError`` saying what is wrong.

    The header (metadata, tensor name, dtype and shape) is checked before the tensor is read, so a
    file whose header is wrong costs no memory whatever sizes it claims; then the values. A latent
    that decodes to more than ``max_pixels`` pixels (the padded size the decoder makes; None: no
    limit) is refused from its header too.
    """
    path = Path(path)
    if path.is_dir():
        raise FileError(path, "is a folder, not a latent file")
    header = read_safetensors_header(path, LATENT_HEADER)
    meta = parse_meta(path, header.get("__metadata__") or {})
    check_pixels(path, meta.padded_width, meta.padded_height, max_pixels, what="the decoded image")
    names = [k for k in header if k != "__metadata__"]
    if KEY not in names or any(n != KEY and n not in EXTRA_KEYS for n in names):
        found = ", ".join(short_name(n) for n in sorted(names)[:5]) or "none"
        raise FileError(
            path, f"a latent file holds a tensor named {KEY!r} and maybe {', '.join(EXTRA_KEYS)} (found: {found})"
        )
    for name in names:
        info = header[name]
        _check_shape_and_dtype(path, tuple(info["shape"]), HEADER_DTYPES.get(info["dtype"], info["dtype"][:20]), meta)
    tensors, _ = read_safetensors(path, LATENT_HEADER)
    for tensor in tensors.values():
        check_tensor(path, tensor, meta)
    return Latent(tensors.pop(KEY), meta, tensors)


def parse_meta(path: Path, metadata: dict[str, str]) -> LatentMeta:
    """Validate a latent file's metadata."""
    if metadata.get("format") != FORMAT:
        raise FileError(path, "not a vqcli latent file (no 'format: vqcli.latent' in its metadata)")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise FileError(path, f"latent format version {version!r} is not supported (this vqcli reads {FORMAT_VERSION})")

    def field(name: str) -> str:
        value = metadata.get(name)
        if not isinstance(value, str):
            raise FileError(path, f"latent metadata lacks {name!r}")
        return value

    def integer(name: str, lo: int, hi: int) -> int:
        text = field(name)
        if not re.fullmatch(r"[0-9]{1,%d}" % len(str(hi)), text) or not lo <= int(text) <= hi:
            raise FileError(path, f"latent metadata {name}={text!r} is not an integer in [{lo}, {hi}]")
        return int(text)

    def number(name: str) -> float:
        text = field(name)
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or len(text) > 40:
            raise FileError(path, f"latent metadata {name}={text[:40]!r} is not a finite number")
        return value

    def boolean(name: str) -> bool:
        text = field(name)
        if text not in ("true", "false"):
            raise FileError(path, f"latent metadata {name}={text[:20]!r} is not true or false")
        return text == "true"

    try:
        raw_config = json.loads(field("model_config"))
        if not isinstance(raw_config, dict):
            raise TypeError("not a JSON object")
        config = AutoEncoderConfig.from_dict(raw_config)
    except (json.JSONDecodeError, RecursionError, TypeError, ValueError, ConfigError) as e:
        raise FileError(path, f"latent metadata has a bad model_config ({str(e).splitlines()[0][:200]})") from None

    width, height = integer("width", 1, MAX_SIDE), integer("height", 1, MAX_SIDE)
    padded_width, padded_height = integer("padded_width", 1, MAX_SIDE), integer("padded_height", 1, MAX_SIDE)
    expected_h, expected_w = padded_dims(height, width, config.downsampling)
    if (padded_height, padded_width) != (expected_h, expected_w):
        raise FileError(
            path,
            f"latent metadata says {width}x{height} padded to {padded_width}x{padded_height}, "
            f"but the model's factor {config.downsampling} pads it to {expected_w}x{expected_h}",
        )
    sha = field("model_sha256")
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise FileError(path, "latent metadata model_sha256 is not a SHA-256 hex digest")
    kind = field("kind")
    if kind != config.kind:
        raise FileError(path, f"latent metadata kind={kind[:10]!r} contradicts its model config ({config.kind})")
    representation = field("representation")
    if representation not in REPRESENTATIONS[kind]:
        raise FileError(path, f"latent representation {representation[:20]!r} is not one of {REPRESENTATIONS[kind]}")
    dtype = field("dtype")
    allowed = INDEX_DTYPES if kind == "vq" else FLOAT_DTYPES
    if dtype not in allowed:
        raise FileError(path, f"latent dtype {dtype[:20]!r} is not one of {', '.join(allowed)} for a {kind} model")
    scale_factor, shift_factor = number("scale_factor"), number("shift_factor")
    if scale_factor == 0:
        raise FileError(path, "latent metadata scale_factor is 0")
    scaled = boolean("scaled")
    if kind == "vq" and scaled:
        raise FileError(path, "a VQ latent (codebook indices) cannot be scaled")
    seed = integer("seed", 0, 2**63 - 1) if "seed" in metadata else None
    frame = None
    if "frame" in metadata:
        count = integer("frames", 1, 999_999_999)
        frame = (integer("frame", 0, count - 1), count)
    duration = integer("frame_duration_ms", 0, 999_999_999) if frame is not None and "frame_duration_ms" in metadata else None
    name = field("model")
    if not name or len(name) > 255:
        raise FileError(path, "latent metadata model name is empty or too long")
    return LatentMeta(
        source=field("source")[:4096],
        width=width,
        height=height,
        padded_width=padded_width,
        padded_height=padded_height,
        model=name,
        model_embedded=boolean("model_embedded"),
        model_sha256=sha,
        config=config,
        scale_factor=scale_factor,
        shift_factor=shift_factor,
        scaled=scaled,
        representation=representation,
        dtype=dtype,
        seed=seed,
        input_stamp=_optional(metadata, "input_stamp", 64),
        recipe=_optional(metadata, "recipe", 4096),
        original_size=_pair(path, metadata, "original_size", 1) if "original_size" in metadata else None,
        crop_top_left=_pair(path, metadata, "crop_top_left", 0) if "crop_top_left" in metadata else (0, 0),
        bucket=metadata.get("bucket") == "true",
        icc_profile=_optional(metadata, "icc_profile", 256),
        frame=frame,
        frame_duration_ms=duration,
    )


def _pair(path: Path, metadata: dict[str, str], name: str, lo: int) -> tuple[int, int]:
    m = re.fullmatch(r"([0-9]{1,7}),([0-9]{1,7})", metadata[name])
    if not m or min(int(m.group(1)), int(m.group(2))) < lo:
        raise FileError(path, f"latent metadata {name}={metadata[name][:30]!r} is not two integers 'a,b' (at least {lo})")
    return int(m.group(1)), int(m.group(2))


def _optional(metadata: dict[str, str], name: str, limit: int) -> str | None:
    value = metadata.get(name)
    return value if isinstance(value, str) and len(value) <= limit else None


def read_provenance(path: str | os.PathLike) -> tuple[str | None, str | None]:
    """``(input_stamp, recipe)`` of a vqcli latent file, from its header alone (resume)."""
    meta = read_safetensors_header(Path(path), LATENT_HEADER).get("__metadata__") or {}
    return _optional(meta, "input_stamp", 64), _optional(meta, "recipe", 4096)


def check_tensor(path: Path, tensor: torch.Tensor, meta: LatentMeta) -> None:
    """The tensor must have the shape, dtype and values its metadata promises."""
    _check_shape_and_dtype(path, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), meta)
    if meta.kind == "vq":
        if tensor.numel():
            lo, hi = int(tensor.min()), int(tensor.max())
            if lo < 0 or hi >= meta.config.n_embed:
                raise FileError(
                    path, f"codebook indices range over [{lo}, {hi}], outside [0, {meta.config.n_embed - 1}]"
                )
    elif not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise FileError(path, f"latent has {bad} NaN or infinite value(s)")


def _check_shape_and_dtype(path: Path, shape: tuple[int, ...], dtype_name: str, meta: LatentMeta) -> None:
    if shape != meta.latent_shape:
        what = "(h, w) codebook indices" if meta.kind == "vq" else "(channels, h, w)"
        shown = shape if len(shape) <= 8 else f"{shape[:8]}... ({len(shape)} dimensions)"
        raise FileError(
            path,
            f"latent has shape {shown}, but its metadata implies {meta.latent_shape} {what} "
            f"for a {meta.width}x{meta.height} image",
        )
    if dtype_name != meta.dtype:
        raise FileError(path, f"latent tensor is {dtype_name} but its metadata says {meta.dtype}")


def check_model(path: Path, meta: LatentMeta, model: AutoEncoder, model_label: str) -> None:
    """Refuse a latent that ``model`` did not make."""
    if meta.model_sha256 != model.identity():
        raise FileError(
            path,
            f"made by model {meta.model!r} (sha256 {meta.model_sha256[:12]}), not by {model_label} "
            f"(sha256 {model.identity()[:12]}); decode it with the model that encoded it",
        )
    mine, theirs = model.config, meta.config
    for name in ("kind", "downsampling", "latent_channels", "n_embed"):
        if getattr(mine, name) != getattr(theirs, name):
            raise FileError(
                path,
                f"its model config says {name}={getattr(theirs, name)}, but the model with the same "
                f"weights has {getattr(mine, name)} (a corrupt file?)",
            )


def latent_stats(latent: Latent) -> dict:
    """A few numbers about a latent's values (for ``vqcli info``)."""
    t = latent.tensor
    if latent.meta.kind == "vq":
        return {"codes_used": int(torch.unique(t).numel()), "codebook_size": latent.meta.config.n_embed}
    t = t.float()
    return {"mean": float(t.mean()), "std": float(t.std(unbiased=False)), "min": float(t.min()), "max": float(t.max())}
