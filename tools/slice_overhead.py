"""Bytes a sliced frame costs against the same frame coded whole (docs/bitstream.md, "Sliced frames").

    .venv/bin/python tools/slice_overhead.py [--image-index 1] [--bpp 0.02] [--slice-bytes 222,128]
"""

from __future__ import annotations

import argparse
import json

from mridc.bench.edge_bench import cover_crop
from mridc.edge.encoder import EdgeEncoder
from mridc.lab.datasets import resolve
from mridc.shared.slices import compress_sliced, decompress_slices


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="photos-eval")
    p.add_argument("--image-index", type=int, default=1)
    p.add_argument("--bpp", type=float, default=0.02)
    p.add_argument("--slice-bytes", default="222,128")
    args = p.parse_args(argv)
    item = resolve([args.images], max_side=0)[args.image_index]
    encoder = EdgeEncoder.from_bundle(backend="onnx")
    result = encoder.encode(cover_crop(item.image, 768, 512), bpp=args.bpp)
    whole = len(result.bitstream)
    for size in (int(x) for x in args.slice_bytes.split(",")):
        slices = compress_sliced(result.token_frame, encoder.prior, size)
        assert decompress_slices(slices, encoder.prior).frame == result.token_frame
        total = sum(map(len, slices))
        print(json.dumps({"image": item.name, "bytes_whole": whole, "slice_bytes": size, "slices": len(slices),
                          "bytes_sliced": total, "overhead": round(total / whole - 1, 4)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
