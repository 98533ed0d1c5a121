# Sourced by scripts/trainer and scripts/test: installs libtorch for tch once
# (the lean recipe: the PyTorch wheel's libraries plus the two small CUDA runtime
# wheels libtorch_cpu needs at load time; no Python torch), then exports LIBTORCH.
# The trainer's build.rs bakes an rpath, so the built binary needs no variables.
# FFJORD_CUDA=1 installs the full CUDA wheel set instead (~4.7 GB), for
# `cargo build --features cuda` on a GPU machine.
TORCH_VERSION=2.13.0   # what tch 0.26.0 expects
FFJORD_CACHE=${FFJORD_CACHE:-$HOME/.cache/ffjord}
if [ "${FFJORD_CUDA:-0}" = 1 ]; then
  LIBTORCH_DIR="$FFJORD_CACHE/libtorch-$TORCH_VERSION-cuda"
  PIP_ARGS=("torch==$TORCH_VERSION")
else
  LIBTORCH_DIR="$FFJORD_CACHE/libtorch-$TORCH_VERSION"
  # Pinned by version and sha256 (CPython 3.11, x86-64 Linux: this machine
  # kind); pip refuses any other file. Another Python or platform needs its
  # own hashes (`pip download --no-deps --only-binary=:all: …; sha256sum`).
  PIP_ARGS=(--no-deps --require-hashes -r /dev/stdin)
  PIP_REQUIREMENTS="torch==$TORCH_VERSION --hash=sha256:60fcdcb2f3876e21146cb4524ef06397d727ca9ad5f020818547e25075fe3cb7
nvidia-cuda-runtime==13.0.96 --hash=sha256:7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548
nvidia-cuda-cupti==13.0.85 --hash=sha256:4eb01c08e859bf924d222250d2e8f8b8ff6d3db4721288cf35d14252a4d933c8"
fi
if [ ! -f "$LIBTORCH_DIR/torch/lib/libtorch_cpu.so" ]; then
  echo "installing libtorch $TORCH_VERSION into $LIBTORCH_DIR (once)" >&2
  rm -rf "$LIBTORCH_DIR.partial"
  mkdir -p "$FFJORD_CACHE"
  python3 -m pip install --quiet --disable-pip-version-check --only-binary=:all: \
    --target "$LIBTORCH_DIR.partial" "${PIP_ARGS[@]}" <<<"${PIP_REQUIREMENTS:-}" >&2
  rm -rf "$LIBTORCH_DIR"
  mv "$LIBTORCH_DIR.partial" "$LIBTORCH_DIR"
fi
export LIBTORCH="$LIBTORCH_DIR/torch"
unset LIBTORCH_USE_PYTORCH
