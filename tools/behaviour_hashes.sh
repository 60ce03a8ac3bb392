#!/usr/bin/env bash
# Behaviour fingerprint of a checkout: encode three eval frames with the shipped bundle (default auto scale and
# --scale 1, 0.03 bpp) and decode them with fixed seeds (realism 0 and 0.5). Run it on two revisions and diff
# the hash lists: a pure refactor must print the same list.
#   tools/behaviour_hashes.sh OUTDIR        (uses .venv/bin; data from $MRIDC_DATA or ../shared/data)
set -euo pipefail
OUT=${1:?usage: tools/behaviour_hashes.sh OUTDIR}
DATA=${MRIDC_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
BIN=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin
mkdir -p "$OUT"
"$BIN/python" - "$DATA" "$OUT" <<'PY'
import sys
from pathlib import Path
from PIL import Image
data, out = Path(sys.argv[1]), Path(sys.argv[2])
wine = Image.open(data / "photos/eval/Wine_by_Jakkub_Mede.jpg").convert("RGB")
wine.thumbnail((768, 768))
wine.save(out / "wine768.png")
Image.open(data / "photos/eval_kodak_tid2013/I03.bmp").convert("RGB").save(out / "kodak03.png")
Image.open(data / "photos/eval/astronaut.png").convert("RGB").save(out / "astronaut.png")
PY
for n in astronaut wine768 kodak03; do
  "$BIN/mridc-edge" encode "$OUT/$n.png" -o "$OUT/$n.mrd" --bpp 0.03 >/dev/null
  "$BIN/mridc-edge" encode "$OUT/$n.png" -o "$OUT/$n.s1.mrd" --bpp 0.03 --scale 1 >/dev/null
  "$BIN/mridc-cloud" decode "$OUT/$n.mrd" -o "$OUT/$n.r0.png" --realism 0 --seed 0 >/dev/null
  "$BIN/mridc-cloud" decode "$OUT/$n.s1.mrd" -o "$OUT/$n.s1.r05.png" --realism 0.5 --seed 0 >/dev/null
done
(cd "$OUT" && sha256sum ./*.mrd ./*.r0.png ./*.r05.png)
