"""A sample's control (reference) images, checked when the plan is made.

ai-toolkit writes them as `--ctrl_img PATH` in the prompt or `ctrl_img` / `ctrl_img_1..3` on a
prompt item, musubi-tuner as `--ci`; each path is relative to the file that names it (the
config, or the prompt file). A missing or unreadable image is a located error at `sidecar
check`, not a failed render at the next checkpoint. Only the header is read (Pillow's
`verify`), so checking a plan stays fast.
"""

from __future__ import annotations

import logging

from PIL import Image, UnidentifiedImageError

from sidecar.plan.config import TrainerConfig
from sidecar.plan.prompts import Origin

logger = logging.getLogger("sidecar.plan")


def check_control_images(config: TrainerConfig, origin: Origin, paths: tuple[str, ...]) -> tuple[str, ...]:
    """`paths` (already resolved), each a readable image, no more than the architecture takes.

    On an architecture that takes none they are carried with a warning (no renderer reads them).
    """
    spec = config.spec
    if not paths:
        if spec.control_images and spec.name in ("flux_kontext", "qwen_image_edit", "qwen_image_edit_plus"):
            logger.warning(
                "%s has no control image (`--ctrl_img`, `ctrl_img`): %s renders it from the text alone",
                origin.where(),
                spec.label,
            )
        return paths
    if not spec.control_images:
        logger.warning(
            "%s control images are not used by %s (an edit model's: flux_kontext, qwen_image_edit, ...); "
            "ignored",
            origin.where(),
            spec.label,
        )
        return paths
    if len(paths) > spec.control_images:
        raise origin.error(
            f"{spec.label} takes at most {spec.control_images} control image(s), got {len(paths)}: "
            + ", ".join(paths)
        )
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except FileNotFoundError:
            raise origin.error(
                f"control image {path} does not exist (a relative path is read from the folder of the "
                "file that names it)"
            ) from None
        except (OSError, UnidentifiedImageError, SyntaxError) as error:
            raise origin.error(f"control image {path} is not a readable image ({error})") from None
    return paths
