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
  PIP_ARGS=(--no-deps "torch==$TORCH_VERSION" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85)
fi
if [ ! -f "$LIBTORCH_DIR/torch/lib/libtorch_cpu.so" ]; then
  echo "installing libtorch $TORCH_VERSION into $LIBTORCH_DIR (once)" >&2
  rm -rf "$LIBTORCH_DIR.partial"
  mkdir -p "$FFJORD_CACHE"
  python3 -m pip install --quiet --disable-pip-version-check --target "$LIBTORCH_DIR.partial" "${PIP_ARGS[@]}" >&2
  rm -rf "$LIBTORCH_DIR"
  mv "$LIBTORCH_DIR.partial" "$LIBTORCH_DIR"
fi
export LIBTORCH="$LIBTORCH_DIR/torch"
unset LIBTORCH_USE_PYTORCH
