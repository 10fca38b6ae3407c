"""Resume that keeps only what this run would make: an output's provenance, recorded and compared.

An output vqcli wrote records the input it was made from (``input_stamp``: its size and
modification time, so checking costs a ``stat``) and a *recipe*: the model's weights hash and every
option that changes the result (scaled, sample and seed, resize and crop, flip, posterior, storage
dtype, layout; for images the format and quality). A re-run skips an existing output only when
both match; otherwise the output is stale and the job fails with a line saying why, so that a run
never reports old results as done. ``--overwrite`` replaces them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from vqcli.io.images import vqcli_mark
from vqcli.pipeline.results import Job, MemberJob

OVERWRITE_HINT = "--overwrite to replace"


def input_stamp(job: Job) -> str | None:
    """``"size:mtime_ns"`` of a job's input (a tar member: its size and the tar's time stamp for it)."""
    if isinstance(job, MemberJob):
        return f"{job.size}:{job.mtime}"
    try:
        st = os.stat(job.input)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def recipe_text(recipe: dict[str, Any]) -> str:
    """A recipe as recorded: canonical JSON (sorted keys, no spaces)."""
    return json.dumps(recipe, sort_keys=True, separators=(",", ":"))


def stale_reason(
    expected_stamp: str | None, expected: dict[str, Any], found_stamp: str | None, found_recipe: str | None
) -> str | None:
    """Why an existing output is not what this run would make (``None``: it is)."""
    try:
        found = json.loads(found_recipe) if found_recipe else None
    except json.JSONDecodeError:
        found = None
    if not isinstance(found, dict):
        return f"exists, made by an older vqcli that did not record its model and options: {OVERWRITE_HINT}"
    if found.get("model_sha256") != expected.get("model_sha256"):
        return f"exists, made with another model: {OVERWRITE_HINT}"
    changed = [k for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]
    if changed:
        shown = ", ".join(f"{k} {_show(found.get(k))} (now {_show(expected.get(k))})" for k in changed[:4])
        return f"exists, made with other options ({shown}): {OVERWRITE_HINT}"
    if expected_stamp is not None and found_stamp != expected_stamp:
        return f"exists, made from another version of the input (size or modification time differ): {OVERWRITE_HINT}"
    return None


def image_mark(job: Job, recipe: dict[str, Any]) -> str:
    """What an image records of its making (in its EXIF, after ``vqcli``, see ``save_image``): its
    input's stamp and the recipe."""
    return recipe_text({"input": input_stamp(job), "recipe": recipe})


def image_stale(job: Job, out: os.PathLike, expected: dict[str, Any]) -> str | None:
    """Why the image ``out`` (marked by ``image_mark``) is not what ``job`` with ``expected`` would make."""
    try:
        found = json.loads(vqcli_mark(out) or "null")
    except json.JSONDecodeError:
        found = None
    if not isinstance(found, dict):
        found = {}
    recipe = found.get("recipe")
    return stale_reason(input_stamp(job), expected, found.get("input"), recipe_text(recipe) if recipe else None)


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value)
