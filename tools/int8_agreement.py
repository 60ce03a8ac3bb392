"""Token agreement of an edge bundle's int8 encoder with its fp32 encoder, on photos/eval at 768 px.

    python tools/int8_agreement.py MODELS_DIR [--images 6]

MODELS_DIR holds `edge/` (a bundle from `mridc-cloud export`). Prints the share of tokens equal between
`EdgeEncoder` backends onnx (int8) and onnx-fp32 over the first N photos/eval images, each fit to 768 px.
"""

from __future__ import annotations

import argparse
import glob

import numpy as np
from PIL import Image

from mridc.edge.encoder import EdgeEncoder, read_image
from mridc.shared.zoo import default_shared_data_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models_dir")
    p.add_argument("--images", type=int, default=6)
    args = p.parse_args()
    int8 = EdgeEncoder.from_bundle(models_dir=args.models_dir, backend="onnx")
    fp32 = EdgeEncoder.from_bundle(models_dir=args.models_dir, backend="onnx-fp32")
    files = sorted(glob.glob(str(default_shared_data_dir() / "photos/eval/*")))[: args.images]
    equal = total = 0
    for path in files:
        image = read_image(path)
        h, w = image.shape[:2]
        scale = 768 / max(h, w)
        if scale < 1:
            image = np.asarray(Image.fromarray(image).resize((int(w * scale), int(h * scale)), Image.BOX))
        a, b = int8.tokens(image), fp32.tokens(image)
        equal += int((a == b).sum())
        total += a.size
    print(f"{args.models_dir}: int8 vs fp32 token agreement {equal / total:.4f} on {len(files)} photos/eval images")


if __name__ == "__main__":
    main()
