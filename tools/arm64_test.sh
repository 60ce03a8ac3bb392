#!/usr/bin/env bash
# `make test-arm64`: prove that the edge runs on arm64 and that its streams are portable.
#
#  1. an arm64 Debian root in .arm64/root (debootstrap --foreign + dpkg-deb -x; no binfmt, no chroot);
#  2. the `edge` extra's aarch64 wheels in .arm64/wheels (pip --platform, binaries only; onnxruntime is
#     left out: it segfaults at import under qemu, so the ARM run uses --backend litert);
#  3. tools/arm64_check.py prepare writes sample frames as PNG; under qemu-aarch64-static,
#     tools/arm64_check.py arm encodes sample images (LiteRT int8 + the
#     project's edge code), runs `mridc-edge encode` once, and re-encodes the MRD test vectors;
#  4. on x86: tools/arm64_check.py verify decodes every ARM stream and checks the tokens, compares with
#     the x86 LiteRT encode, and checks the vectors' bytes.
# The root and the wheels are cached (stamps in .arm64/): a second run only does steps 3 and 4.
# Env: ARM64_DIR (default .arm64), ARM64_SUITE (bookworm), ARM64_MIRROR (default: this machine's apt sources),
#      ARM64_IMAGES (how many sample frames, default 4), PYTHON (x86 python, default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DIR=${ARM64_DIR:-$REPO/.arm64}
ROOT=$DIR/root
WHEELS=$DIR/wheels
SHIM=$DIR/shim
WORK=$DIR/run
SUITE=${ARM64_SUITE:-bookworm}
PY=${PYTHON:-$REPO/.venv/bin/python}
EDGE_WHEELS=(numpy pillow opencv-python-headless ai-edge-litert paho-mqtt "grpcio==1.85.1" "protobuf>=7.35,<8")
T0=$(date +%s)
step() { echo "[arm64 +$(( $(date +%s) - T0 ))s] $*"; }
die() { echo "arm64_test: $*" >&2; exit 1; }

need_pkg() {  # command, Debian package
  command -v "$1" >/dev/null 2>&1 && return 0
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || die "$1 is missing: apt-get install $2"
  step "installing $2 (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null; }
}

apt_mirror() {  # the first Debian archive URI in this machine's apt sources (not -security)
  local uri
  uri=$(awk 'tolower($1)=="uris:" {for (i=2;i<=NF;i++) print $i}' /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -v -- '-security' | head -1 || true)
  if [ -z "$uri" ]; then
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
          awk '$1=="deb" {for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' | grep -v -- '-security' | head -1 || true)
  fi
  [ -n "$uri" ] || die "no Debian mirror in /etc/apt/sources*; set ARM64_MIRROR"
  echo "$uri"
}

[ -x "$PY" ] || die "$PY is missing: run make setup"
[ -f models/edge/encoder_int8.tflite ] || die "models/edge/encoder_int8.tflite is missing: run make export-litert"
need_pkg debootstrap debootstrap
need_pkg qemu-aarch64-static qemu-user-static
need_pkg dpkg-deb dpkg
mkdir -p "$DIR"

# -- 1. arm64 root ------------------------------------------------------------------------------------
if [ ! -f "$ROOT/.mridc-ok" ]; then
  MIRROR=${ARM64_MIRROR:-$(apt_mirror)}
  step "debootstrap --foreign arm64 $SUITE from this machine's apt mirror"
  rm -rf "$ROOT"
  debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 "$SUITE" "$ROOT" "$MIRROR" \
    > "$DIR/debootstrap.log" 2>&1 || { tail -20 "$DIR/debootstrap.log"; die "debootstrap failed (log: $DIR/debootstrap.log)"; }
  # --foreign leaves the second stage undone; extracting the downloaded packages is enough for python3.
  step "extracting $(ls "$ROOT"/var/cache/apt/archives/*.deb | wc -l) packages (dpkg-deb -x)"
  for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
  [ -x "$ROOT/usr/bin/python3.11" ] || die "no $ROOT/usr/bin/python3.11 after extraction"
  touch "$ROOT/.mridc-ok"
fi
ARMPY=(qemu-aarch64-static -L "$ROOT" "$ROOT/usr/bin/python3.11")
step "arm64 python: $("${ARMPY[@]}" -c 'import platform, sys; print(platform.machine(), sys.version.split()[0])')"

# -- 2. aarch64 wheels of the edge extra --------------------------------------------------------------
WANT="${EDGE_WHEELS[*]}"
if [ ! -f "$WHEELS/.mridc-ok" ] || [ "$(cat "$WHEELS/.mridc-ok")" != "$WANT" ]; then
  step "pip install --platform manylinux aarch64 cp311: $WANT"
  rm -rf "$WHEELS"
  "$PY" -m pip install -q --target "$WHEELS" --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
    --platform manylinux_2_17_aarch64 --python-version 3.11 --implementation cp --only-binary=:all: \
    "${EDGE_WHEELS[@]}" 2>&1 | { grep -v 'is ignored: it is neither a file' || true; } ||
    die "pip could not fetch the aarch64 wheels"  # (the filter drops noise about this machine's local indexes)
  echo "$WANT" > "$WHEELS/.mridc-ok"
fi

# The project's own code: the edge subset of src/mridc (edge, shared, v1), so that a stray import of the
# cloud side fails here as it would on a camera.
rm -rf "$SHIM" && mkdir -p "$SHIM/mridc"
cp src/mridc/__init__.py "$SHIM/mridc/"
for d in edge shared v1; do ln -s "$REPO/src/mridc/$d" "$SHIM/mridc/$d"; done

# -- 3. encode on arm64 -------------------------------------------------------------------------------
rm -rf "$WORK" && mkdir -p "$WORK"
"$PY" tools/arm64_check.py prepare --out "$WORK" --images "${ARM64_IMAGES:-4}"
step "encoding on arm64 under qemu (LiteRT int8)"
T3=$(date +%s)
(cd "$WORK" && PYTHONPATH="$SHIM:$WHEELS" PYTHONDONTWRITEBYTECODE=1 MRIDC_MODELS="$REPO/models" \
  "${ARMPY[@]}" "$REPO/tools/arm64_check.py" arm --out "$WORK") ||
  die "the arm64 run failed"
ARM_S=$(( $(date +%s) - T3 ))

# -- 4. verify on x86 ---------------------------------------------------------------------------------
step "verifying on x86"
"$PY" tools/arm64_check.py verify --out "$WORK" --arm-seconds "$ARM_S" || die "verification failed (see above)"
step "done in $(( $(date +%s) - T0 ))s (arm64 run ${ARM_S}s); report: $WORK/report.json"
