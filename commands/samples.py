"""`mmtui samples [DEST]`: copy the bundled sample photos and their annotations where the README's tour expects
them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from commands._app import app, err, fail, out


@app.command()
def samples(
    dest: Annotated[
        Path, typer.Argument(help="Folder to copy into (photos/ and the annotation files go here).")
    ] = Path("."),
    path: Annotated[
        bool, typer.Option("--path", help="Only print the folder of the bundled samples; copy nothing.")
    ] = False,
) -> None:
    """Copy the 8 bundled COCO photos to DEST/photos/, their captions to DEST/captions.json, their object
    annotations to DEST/instances.json and their licences to DEST/samples-README.md (the files the README's tour
    uses)."""
    from mmtui.run.samples import copy_samples, sample_dir

    if path:
        out.print(str(sample_dir()), highlight=False, soft_wrap=True)
        return
    try:
        copied = copy_samples(dest)
    except FileExistsError as clash:
        fail(f"{clash.args[0]} exists with other content; pick another DEST (mmtui samples DEST)")
    except OSError as error:
        fail(f"cannot copy the samples into {dest}: {error.strerror or error}")
    err.print(
        f"{len(list(copied.photos.glob('*.jpg')))} photos in {copied.photos}/, captions {copied.captions}, "
        f"objects {copied.instances}, licences {copied.licences} ({copied.written} file(s) written)",
        highlight=False,
        soft_wrap=True,
    )
