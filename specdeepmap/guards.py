"""Outputs never replace inputs or files that are not ours.

Every command that writes a file checks, before any work, that none of its outputs is one of
its inputs (the same path, however it was spelled: relative, absolute, ``file://``, through a
symbolic link) and that no two outputs are the same file. An output that already exists and is
not a product of this software is refused unless the caller says ``overwrite`` (rasterio's
``rio`` tools behave the same way with ``--overwrite``); earlier products of the same command
are replaced, as re-running a command is expected to do.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from specdeepmap import storage
from specdeepmap.errors import OutputConflictError


def location(uri: str) -> str:
    """A canonical spelling of a URI, for comparing two of them.

    An absolute, resolved local path (symbolic links followed), or the ``s3://bucket/key`` without
    repeated slashes.
    """
    uri = str(uri)
    if storage.is_s3(uri):
        bucket_key = uri[len("s3://") :]
        while "//" in bucket_key:
            bucket_key = bucket_key.replace("//", "/")
        return "s3://" + bucket_key.rstrip("/")
    return os.path.realpath(storage.absolute(uri))


def refuse_overwriting_inputs(
    outputs: Mapping[str, str | None], inputs: Mapping[str, str | None]
) -> None:
    """Refuse when an output is an input, or two outputs are one file.

    Args:
        outputs: what each output is (e.g. ``"class map"``) → its URI (None: not written).
        inputs: what each input is → its URI (None: not given).

    Raises:
        OutputConflictError: naming both roles and the path.
    """
    given_inputs = {location(u): (role, u) for role, u in inputs.items() if u}
    seen: dict[str, str] = {}
    for role, uri in outputs.items():
        if not uri:
            continue
        where = location(uri)
        if where in given_inputs:
            input_role, input_uri = given_inputs[where]
            raise OutputConflictError(
                f"the {role} {uri} would replace the {input_role} {input_uri}: write it "
                "under another name (an output never replaces an input)"
            )
        if where in seen:
            raise OutputConflictError(
                f"the {role} and the {seen[where]} are one file ({uri}): give them different names"
            )
        seen[where] = role


def refuse_foreign_output(
    uri: str, what: str, is_ours: Callable[[str], bool] | None, overwrite: bool = False
) -> None:
    """Refuse to replace an existing file that is not a product of this software.

    Args:
        uri: the output about to be written.
        what: what the output is, for the message.
        is_ours: tells, from the existing file's URI, whether it is an earlier product of the
            same kind (which is replaced silently); None: any existing file is refused.
        overwrite: replace whatever is there.

    Raises:
        OutputConflictError: the file exists, is not ours and ``overwrite`` is off; or it
            is a folder.
    """
    if not storage.is_s3(uri) and os.path.isdir(storage.local_path(uri)):
        raise OutputConflictError(f"the {what} {uri} is a folder: give a file name")
    if overwrite or not storage.exists(uri):
        return
    if is_ours is not None and is_ours(uri):
        return
    kind = f" and is not a specdeepmap {what}" if is_ours else ""
    raise OutputConflictError(
        f"{uri} exists{kind}: choose another output, or pass --overwrite to replace it"
    )


__all__ = ["location", "refuse_foreign_output", "refuse_overwriting_inputs"]
