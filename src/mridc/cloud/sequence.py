"""The cloud side of inter frames: the reference grids each device's frames left, and the token frame an
inter stream decodes to (docs/bitstream.md, "Inter frames").

    frames = SequenceFrames(decoder.prior, model_id=decoder.model_id)   # references in memory
    token_frame = frames.token_frame(bitstream, device_id, sequence)     # NeedIntra if the reference is missing
    image = decoder.decode_frames([token_frame], settings)[0].image

An intra frame's grid is its kept tokens; an inter frame's is its reference's with the changed positions
overwritten. Positions no frame of the chain sent are masked in the token frame, for BPCG to fill; the
unchanged ones are the reference's tokens.
"""

from __future__ import annotations

from collections.abc import MutableMapping

from mridc.shared.bitstream import BitstreamError, TokenFrame, decompress
from mridc.shared.entropy import TokenPrior
from mridc.shared.inter import ReferenceGrid, decompress_inter, is_inter, parse_inter_header


class NeedIntra(LookupError):
    """An inter frame whose reference this cloud does not hold: the device must send the frame intra."""

    def __init__(self, device_id: str, sequence: int, ref_sequence: int):
        super().__init__(f"{device_id}/{sequence}: reference frame {ref_sequence} is not held here")
        self.device_id, self.sequence, self.ref_sequence = device_id, sequence, ref_sequence


class SequenceFrames:
    """Reference grids by (device, sequence) and the inter/intra parse. `references` is any mutable mapping
    (a dict by default; the service passes a durable one)."""

    def __init__(self, prior: TokenPrior, *, model_id: int | None = None,
                 references: MutableMapping[tuple[str, int], ReferenceGrid] | None = None) -> None:
        self.prior = prior
        self.model_id = model_id
        self.references = references if references is not None else {}

    def token_frame(self, bitstream: bytes, device_id: str, sequence: int) -> TokenFrame:
        """The frame to complete and decode; its grid becomes the reference for `sequence`."""
        if is_inter(bitstream):
            _, ref_sequence, _ = parse_inter_header(bitstream)
            reference = self.references.get((device_id, ref_sequence))
            if reference is None:
                raise NeedIntra(device_id, sequence, ref_sequence)
            inter = decompress_inter(bitstream, self.prior, reference, model_id=self.model_id)
            grid, frame = inter.grid, inter.frame
        else:
            frame = decompress(bitstream, self.prior, model_id=self.model_id)
            grid = ReferenceGrid.from_frame(frame)
        self.references[(device_id, sequence)] = grid
        return frame


__all__ = ["BitstreamError", "NeedIntra", "SequenceFrames"]
