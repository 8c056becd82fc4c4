"""Output sizes that both the strategies (at create) and the processors (at run) derive."""

from __future__ import annotations

MAX_SIDE = 4096


def round8(value: float) -> int:
    """The nearest multiple of 8, at least 8."""
    return max(8, round(value / 8.0) * 8)


def refine_output_size(
    base_width: int,
    base_height: int,
    *,
    target_width: int,
    target_height: int,
    upscale_enabled: bool,
    upscale_factor: float,
) -> tuple[int, int]:
    """REFINE's output size, by the precedence ``RefineParams`` documents.

    Both targets set: exactly that size. One set: the other follows the base image's
    aspect ratio. Neither: the base size times ``upscale_factor`` when upscaling, else the
    base size. Derived sides are rounded to the nearest multiple of 8; a set target is
    used as given. The caller checks the result against ``MAX_SIDE``.
    """
    if target_width and target_height:
        return target_width, target_height
    if target_width:
        return target_width, round8(target_width * base_height / base_width)
    if target_height:
        return round8(target_height * base_width / base_height), target_height
    factor = upscale_factor if upscale_enabled else 1.0
    return round8(base_width * factor), round8(base_height * factor)
