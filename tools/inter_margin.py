"""Inter frames: bytes and PSNR for a few change margins, on vtest TRAINING frames (0-299, one per second,
0.02 bpp), so the default margin is not chosen on the eval frames.

Run: .venv/bin/python tools/inter_margin.py
"""

from __future__ import annotations

import numpy as np
import torch

from mridc.cloud.pipeline import DecodeSettings, MRIDCDecoder
from mridc.cloud.sequence import SequenceFrames
from mridc.edge.encoder import EdgeEncoder
from mridc.edge.sequence import SequenceConfig, SequenceEncoder
from mridc.lab.datasets import data_root, video_frames
from mridc.lab.metrics import psnr


def main() -> None:
    torch.set_num_threads(2)
    items = video_frames(data_root() / "camera" / "vtest.avi", 0, 300, 10)
    encoder = EdgeEncoder.from_bundle(scale="auto")
    decoder = MRIDCDecoder.from_models(backend="auto")
    settings = DecodeSettings(realism=0.0)
    for margin in (0.05, 0.1, 0.2):
        coder = SequenceEncoder(encoder, SequenceConfig(change_margin=margin))
        cloud = SequenceFrames(decoder.prior, model_id=decoder.model_id)
        scores, sizes = [], []
        for number, item in enumerate(items, 1):
            coded = coder.encode(item.image, number, 0.02)
            coder.acknowledge(number)
            image = decoder.decode_frames([cloud.token_frame(coded.bitstream, "cam", number)], settings)[0].image
            scores.append(psnr(item.image, image))
            sizes.append(len(coded.bitstream))
        print(f"margin {margin}: {np.mean(sizes):.0f} B/frame {np.mean(scores):.2f} dB; frames 4+: "
              f"{np.mean(sizes[3:]):.0f} B {np.mean(scores[3:]):.2f} dB", flush=True)


if __name__ == "__main__":
    main()
