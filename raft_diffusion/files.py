"""Reading files that a record names, not the user: one rule for paths, one decoder for pictures.

A path read from a file the user did not type on the command line (a sample folder's
samples.jsonl row, a run directory's samples rows) must resolve, after symlinks, inside its
folder: an absolute path, a `../` or a symlink out of the folder is refused, so a shared or
tampered folder cannot pull any other file of the machine into a run or a report.

Pictures are decoded fully before they are used (`read_image`): a decompression bomb, a
truncated file, an oversized text chunk or a format PIL cannot read is a `UserError` naming the
field, and 16-bit and float pictures keep their scale (not PIL's clipping `convert("RGB")`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from .errors import UserError


def inside(folder: Path, name: object, field: str, where: str) -> Path:
    """`folder / name`, refused (UserError naming `where`) unless it resolves inside `folder`."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UserError(field, f"{where}: {name!r} is not a file name", "name a file inside the folder")
    if os.path.isabs(name) or Path(name).drive:
        raise UserError(field, f"{where}: {name!r} is an absolute path",
                        f"name the file relative to {folder}, inside it")
    base = Path(os.path.realpath(folder))
    target = Path(os.path.realpath(base / name))
    if target != base and base not in target.parents:
        raise UserError(field, f"{where}: {name!r} leads outside {folder}",
                        "keep every file inside the folder (no '..', no symlinks out of it)")
    return target


def read_image(path: Path, field: str = "IMAGE", size: tuple[int, int] | None = None):
    """The picture as (3, H, W) float32 in [0, 1]; anything PIL cannot decode fully and safely is a
    UserError naming `field`. With `size` (width, height), another size is refused before decoding.

    8-bit images are divided by 255 and 16-bit ones (PNG mode I;16, or I up to 65535) by 65535;
    a gray image fills all three channels. Float images (TIFF mode F) are taken as they are when
    every value lies in [0, 1], and refused otherwise: their scale cannot be guessed.
    """
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL only warns about images of 1 to 2 times MAX_IMAGE_PIXELS (it raises above), and
            # would then decode them into gigabytes: refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if size is not None and image.size != tuple(size):
                    raise UserError(field, f"{path} is {image.size[0]}x{image.size[1]}, not {size[0]}x{size[1]}",
                                    "resize it, or set generation.resolution to match")
                image.load()
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(field, f"{path} is missing", "fix the file name") from None
    except IsADirectoryError:
        raise UserError(field, f"{path} is a directory, not an image", "name an image file") from None
    except UnidentifiedImageError:
        raise UserError(field, f"{path} is not an image", "use PNG or JPEG files") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(field, f"{path} has more than {Image.MAX_IMAGE_PIXELS} pixels, too many to decode safely",
                        "use a smaller image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL's words for cut-off or damaged data
        raise UserError(field, f"{path} is truncated or damaged ({e})", "use a complete image file") from None
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array, scale = np.asarray(image, dtype=np.float32), 65535
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise UserError(field, f"{path} holds integers outside 0..65535", "save it as an 8- or 16-bit image")
    elif image.mode == "F":
        array, scale = np.asarray(image, dtype=np.float32), 1
        if not np.isfinite(array).all() or (array.size and (array.min() < 0 or array.max() > 1)):
            raise UserError(field, f"{path} holds floats outside [0, 1] (min {np.nanmin(array):.4g}, "
                            f"max {np.nanmax(array):.4g})", "scale it to [0, 1], or save it as an 8- or 16-bit image")
    else:
        array, scale = np.asarray(image.convert("RGB"), dtype=np.float32), 255
    if array.ndim == 2:  # gray: the same value in all three channels
        array = np.repeat(array[:, :, None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1) / scale
