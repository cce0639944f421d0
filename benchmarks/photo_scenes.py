"""A labelled set of real colour photos at ImageNet-like sizes, for judging the photo path (``benchmarks/quality.py``).

    python benchmarks/photo_scenes.py OUT [--per-scene 80] [--area 0.02 0.2] [--seed 0] [--cache DIR]

Source: the real photographs among the wallpapers of five Debian packages (mate-backgrounds, plasma-workspace-
wallpapers, lomiri-wallpapers-16.04 and -20.04: landscapes, plants, animals, objects, interiors; 37 scenes, listed
in :data:`SCENES`; the illustrations and abstract art of the same packages are left out). Each output image is a
random crop of one photo, of ``--area`` of its area (2-20 % by default, aspect 3/4-4/3), resized so that its
shorter side lies in 300-500 px, saved as a quality-90 JPEG in ``OUT/<scene>/<index>.jpg`` (ImageFolder layout).
The packages are fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into ``--cache`` (no root needed).

What it measures: crops of the same scene share a class, so a k-NN on these labels asks "which scene is this crop
from", and multi-crop training rewards exactly that (two crops of one image are pulled together). It is a check
that the photo path learns something a raw-pixel or random-init k-NN does not see, not a general benchmark. Small
crops (2-20 % of a photo) make it harder than whole-photo crops: a crop shows a part of the scene (a flower, the sky,
a path) whose colours often match other scenes, and 37 scenes hold several of one kind (grass, flowers, water).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

#: (Debian package, path of the photo inside it) for every scene; the class name is the file's (or wallpaper's) name.
SCENES = [
    ("mate-backgrounds", f"usr/share/backgrounds/mate/nature/{n}.jpg")
    for n in ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
              "TwoWings", "Wood", "YellowFlower")
] + [
    ("plasma-workspace-wallpapers", f"usr/share/wallpapers/{n}/contents/images/*")
    for n in ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite",
              "OneStandsOut", "Path", "summer_1am")
] + [
    ("lomiri-wallpapers-16.04", f"usr/share/backgrounds/{n}.jpg")
    for n in ("Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace", "Picture_1A_by_freespace",
              "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi", "free_by_Peter_Nerlich",
              "friends_by_Aitzol_Berasategi", "greentock_by_Peter_Nerlich", "life_by_Aitzol_Berasategi",
              "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi")
] + [
    ("lomiri-wallpapers-20.04", "usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg"),
]


def fetch(package: str, cache: str) -> str:
    """Unpack ``package`` into ``cache/package`` once (apt-get download + dpkg -x); returns that folder."""
    dest = os.path.join(cache, package)
    done = os.path.join(dest, ".unpacked")
    if os.path.exists(done):
        return dest
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        get = ["apt-get", "download", package]
        if subprocess.run(get, cwd=tmp, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True)
            subprocess.run(get, cwd=tmp, check=True, capture_output=True)
        deb = glob.glob(os.path.join(tmp, f"{package}_*.deb"))[0]
        subprocess.run(["dpkg", "-x", deb, dest], check=True)
    open(done, "w").close()
    return dest


def scene_photos(cache: str) -> list[tuple[str, str]]:
    """(class name, photo path) of every scene; a wallpaper shipped at several sizes gives its largest file."""
    Image.MAX_IMAGE_PIXELS = None
    out = []
    for package, pattern in SCENES:
        files = glob.glob(os.path.join(fetch(package, cache), pattern))
        if not files:
            raise SystemExit(f"photo_scenes.py: {pattern} is not in {package}")
        path = max(files, key=lambda f: Image.open(f).size[0] * Image.open(f).size[1])
        name = pattern.split("/contents/")[0].rsplit("/", 1)[-1] if "/contents/" in pattern else \
            os.path.splitext(os.path.basename(path))[0]
        out.append((name.split("_by_")[0], path))
    return out


def random_crop_box(rng: np.random.Generator, w: int, h: int, area: tuple[float, float]) -> tuple[int, int, int, int]:
    """A box of ``area`` of the photo's area (uniform), aspect 3/4-4/3 (log-uniform), placed uniformly."""
    for _ in range(50):
        a = w * h * rng.uniform(*area)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round((a * ratio) ** 0.5)), int(round((a / ratio) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x, y, x + cw, y + ch
    return 0, 0, w, h


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--per-scene", type=int, default=80, help="crops per scene (default 80: 2,960 images)")
    ap.add_argument("--area", type=float, nargs=2, default=(0.02, 0.2), help="crop area range, fractions of a photo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/ibot-bench-data"))
    a = ap.parse_args(argv)
    photos = scene_photos(a.cache)
    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    rng = np.random.default_rng(a.seed)
    n = 0
    for name, path in photos:
        im = Image.open(path).convert("RGB")
        os.makedirs(os.path.join(a.out, name))
        for _ in range(a.per_scene):
            box = random_crop_box(rng, *im.size, tuple(a.area))
            crop = im.crop(box)
            scale = rng.uniform(300, 500) / min(crop.size)
            crop = crop.resize((max(1, round(crop.size[0] * scale)), max(1, round(crop.size[1] * scale))),
                               Image.BICUBIC)
            crop.save(os.path.join(a.out, name, f"{n:06d}.jpg"), quality=90)
            n += 1
    print(f"{n} JPEGs of {len(photos)} scenes -> {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
