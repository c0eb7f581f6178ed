#!/usr/bin/env python3
"""PIL peer of bench_loader: the same images through the pipeline a
torchvision user runs (open + decode, RandomResizedCrop(224): its
get_params, crop, BILINEAR resize; random flip, float normalise), one
process, one thread.  Prints one JSON line like bench_loader's.
  pil_loader.py --dir DIR/jpeg|DIR/raw [--seconds S]"""
import argparse, glob, io, json, math, os, random, time

import numpy as np
from PIL import Image, __version__ as pil_version

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def rrc_box(w, h, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision.transforms.RandomResizedCrop.get_params."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return x, y, cw, ch
    in_ratio = w / h
    cw, ch = w, h
    if in_ratio < ratio[0]:
        ch = round(w / ratio[0])
    elif in_ratio > ratio[1]:
        cw = round(h * ratio[1])
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def sample(img, rng):
    x, y, cw, ch = rrc_box(img.width, img.height, rng)
    out = img.crop((x, y, x + cw, y + ch)).resize((224, 224), Image.BILINEAR)
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return (np.asarray(out, np.float32) / 255.0 - MEAN) / STD


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--seconds", type=float, default=4)
    a = ap.parse_args()
    rng = random.Random(1)
    if os.path.exists(os.path.join(a.dir, "pixels.u8")):
        kind = "raw"
        pixels = np.fromfile(os.path.join(a.dir, "pixels.u8"), np.uint8).reshape(-1, 256, 256, 3)
        load = lambda i: Image.fromarray(pixels[i % len(pixels)])
    else:
        kind = "jpeg"
        files = sorted(glob.glob(os.path.join(a.dir, "files", "*.jpg")))
        def load(i):
            with open(files[i % len(files)], "rb") as f:
                return Image.open(io.BytesIO(f.read())).convert("RGB")
    sample(load(0), rng)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < a.seconds:
        sample(load(count), rng)
        count += 1
    rate = count / (time.perf_counter() - t0)
    print(json.dumps({"name": f"pil_{kind}_rrc224", "value": round(rate, 1), "unit": "images/s",
                      "threads": 1, "pil": pil_version}))


if __name__ == "__main__":
    main()
