#!/usr/bin/env bash
# Builds the WASM module and the static page into www/ (pkg/ and models/):
# cargo → wasm-bindgen (pinned to the crate's version, installed once into
# ~/.cache/ffjord) → wasm-opt -Oz (npm binaryen). Prints the module's size and gzip size.
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
RUSTFLAGS="-C target-feature=+simd128" cargo build --quiet --profile wasm-release --target wasm32-unknown-unknown -p ffjord-wasm
rm -rf www/pkg
wasm-bindgen --target web --no-typescript --out-dir www/pkg "$here/../target/wasm32-unknown-unknown/wasm-release/ffjord_wasm.wasm"
node_modules/.bin/wasm-opt -Oz --strip-debug --strip-producers --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext --enable-mutable-globals --enable-reference-types --enable-multivalue --enable-simd \
  www/pkg/ffjord_wasm_bg.wasm -o www/pkg/ffjord_wasm_bg.opt.wasm
mv www/pkg/ffjord_wasm_bg.opt.wasm www/pkg/ffjord_wasm_bg.wasm
mkdir -p www/models
cp "$root/models/8gaussians-mcu/model.ffjd" www/models/8gaussians-mcu.ffjd
cp "$root/models/shuttle/model.ffjd" www/models/shuttle.ffjd
size=$(stat -c %s www/pkg/ffjord_wasm_bg.wasm)
gz=$(gzip -9 -c www/pkg/ffjord_wasm_bg.wasm | wc -c)
echo "ffjord_wasm_bg.wasm: $size bytes, $gz bytes gzipped (wasm-opt -Oz)"
