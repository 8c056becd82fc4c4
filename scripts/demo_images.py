"""Write the small pictures of the README tour: a model, a garment, a portrait, a bad photo.

Usage: python -m scripts.demo_images OUTPUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from scripts.faces import face_image


def _model(path: Path) -> None:
    image = Image.new("RGB", (240, 480), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    draw.ellipse((90, 20, 150, 90), fill=(224, 180, 150))
    draw.rectangle((80, 95, 160, 260), fill=(40, 40, 60))
    draw.rectangle((85, 260, 115, 450), fill=(30, 30, 40))
    draw.rectangle((125, 260, 155, 450), fill=(30, 30, 40))
    image.save(path)


def _garment(path: Path) -> None:
    image = Image.new("RGB", (320, 320), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.polygon(
        [(60, 40), (260, 40), (300, 120), (240, 140), (240, 300), (80, 300), (80, 140), (20, 120)],
        fill=(200, 30, 45),
    )
    image.save(path)


def main(out: Path) -> None:
    """Write model.png, dress.png, portrait.png and dark.png into ``out``.

    dark.png is the portrait blurred and under-exposed: the AGENTIC example's input.
    """
    out.mkdir(parents=True, exist_ok=True)
    _model(out / "model.png")
    _garment(out / "dress.png")
    portrait = face_image(320, 320)
    portrait.save(out / "portrait.png")
    soft = portrait.filter(ImageFilter.GaussianBlur(2.5))
    ImageEnhance.Brightness(soft).enhance(0.35).save(out / "dark.png")
    for name in ("model.png", "dress.png", "portrait.png", "dark.png"):
        print(out / name)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "var/demo"))
