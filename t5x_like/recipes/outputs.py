"""Output directories that recipes write once: never over an earlier output (a
fine-tuning run may be reading it), and whole or not at all (written under
`<dir>.partial`, then renamed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator


def check_new(output_dir: str, what: str, flag: str) -> None:
    """A FileExistsError naming `flag` (the gin setting) unless `output_dir` is new or
    an empty directory; `what` names the recipe in the message."""
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise FileExistsError(
            f"{output_dir} exists and is not empty; {what} never overwrites an earlier "
            "output (a fine-tuning run may be reading it). Pass a new directory "
            f"(--gin.{flag}=\"'{output_dir.rstrip('/')}_2'\") or move that one away.")


@contextlib.contextmanager
def written_whole(output_dir: str) -> Iterator[str]:
    """Yields `<output_dir>.partial` to write into (a leftover of an unfinished earlier
    run is removed first); once the block ends without an error, the partial directory
    becomes `output_dir` (new or empty: `check_new`)."""
    partial = output_dir + ".partial"
    if os.path.exists(partial):
        shutil.rmtree(partial)
    os.makedirs(partial)
    yield partial
    if os.path.isdir(output_dir):
        os.rmdir(output_dir)  # empty (check_new)
    os.replace(partial, output_dir)
