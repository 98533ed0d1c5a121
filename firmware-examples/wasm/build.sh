#!/usr/bin/env bash
# Builds the WASM modules and the static page into www/ (pkg/, pkg-small/ and
# models/): cargo (two builds, below) → wasm-bindgen (pinned to the crate's
# version, installed once into ~/.cache/ffjord) → wasm-opt -Oz (npm binaryen).
# Prints each module's size and gzip size; fails if the small one exceeds 64 KiB.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
version=0.2.130   # = the wasm-bindgen crate version in Cargo.toml
tools="${FFJORD_CACHE:-$HOME/.cache/ffjord}/wasm-bindgen-$version"
if [ ! -x "$tools/bin/wasm-bindgen" ]; then
  echo "installing wasm-bindgen-cli $version into $tools (once, several minutes)" >&2
  # Not --locked: its published lockfile pins webpki-roots 1.0.11, which the
  # crate registry reachable here does not serve (tried 2026-12-02).
  cargo install --quiet wasm-bindgen-cli --version "$version" --root "$tools"
fi
export PATH="$tools/bin:$PATH"
# wasm-opt from npm's binaryen 132 (package-lock.json): Debian's binaryen 108
# breaks wasm-bindgen's externref table.
[ -x "$here/node_modules/.bin/wasm-opt" ] || (cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
rustup target add wasm32-unknown-unknown >/dev/null
cd "$here"
# Two builds of the same crate; the page picks one with WebAssembly.validate:
#   www/pkg        SIMD (+simd128), opt-level 3, with the packed path (speed);
#   www/pkg-small  no SIMD, opt-level "s", the runtime's plain products
#                  (`compact`: same bits), no packed path — at most 64 KiB.
# Paths in panic locations are remapped (short, and the size does not depend
# on where the checkout lives).
rustc_src="/rustc/$(rustc -vV | sed -n 's/^commit-hash: //p')"
remap="--remap-path-prefix=$root=. --remap-path-prefix=$rustc_src=rustc"
for index in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/; do remap="$remap --remap-path-prefix=${index%/}=crates"; done
build() { # PROFILE OUT-DIR RUSTFLAGS [cargo feature flags]
  local profile=$1 out=$2 flags=$3
  shift 3
  RUSTFLAGS="$flags $remap" cargo build --quiet --profile "$profile" --target wasm32-unknown-unknown -p ffjord-wasm "$@"
  rm -rf "www/$out"
  wasm-bindgen --target web --no-typescript --out-dir "www/$out" "$here/../target/wasm32-unknown-unknown/$profile/ffjord_wasm.wasm"
  node_modules/.bin/wasm-opt -Oz --converge --strip-debug --strip-producers --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext --enable-mutable-globals --enable-reference-types --enable-multivalue --enable-simd \
    "www/$out/ffjord_wasm_bg.wasm" -o "www/$out/ffjord_wasm_bg.opt.wasm"
  mv "www/$out/ffjord_wasm_bg.opt.wasm" "www/$out/ffjord_wasm_bg.wasm"
}
build wasm-release pkg "-C target-feature=+simd128"   # default features: packed, quantized
build wasm-small pkg-small "" --no-default-features --features compact
mkdir -p www/models
cp "$root/models/8gaussians-mcu/model.ffjd" www/models/8gaussians-mcu.ffjd
cp "$root/models/shuttle/model.ffjd" www/models/shuttle.ffjd
cp "$root/models/cardio/model.ffjd" www/models/cardio.ffjd
[ ! -f "$root/models/mnist-8x8/model.ffjd" ] || cp "$root/models/mnist-8x8/model.ffjd" www/models/mnist-8x8.ffjd
for out in pkg pkg-small; do
  size=$(stat -c %s "www/$out/ffjord_wasm_bg.wasm")
  gz=$(gzip -9 -c "www/$out/ffjord_wasm_bg.wasm" | wc -c)
  echo "$out/ffjord_wasm_bg.wasm: $size bytes, $gz bytes gzipped (wasm-opt -Oz)"
done
# The small build is the one every browser can run: it must stay within 64 KiB.
limit=65536
if [ "$size" -gt "$limit" ]; then
  echo "error: pkg-small/ffjord_wasm_bg.wasm is $size bytes, over the $limit-byte budget" >&2
  exit 1
fi
