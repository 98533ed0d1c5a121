// The WASM modules under Node: the same log p, NFE, verdicts and samples as the
// host runtime on the committed models' golden rows (to the bit; the packed
// path, whose tanh is another approximation, 1e-5 relative), and bad
// input raises exceptions carrying the runtime's messages. FFJORD_WASM_BUILD
// picks the build: "simd" (www/pkg, with the packed path) or "small"
// (www/pkg-small, without it); run-tests runs both.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";

const build = process.env.FFJORD_WASM_BUILD ?? "simd";
assert.ok(build === "simd" || build === "small", `FFJORD_WASM_BUILD=${build}: simd or small`);
const pkg = build === "small" ? "../www/pkg-small/" : "../www/pkg/";
const { initSync, Detector } = await import(new URL(`${pkg}ffjord_wasm.js`, import.meta.url));
initSync({ module: readFileSync(new URL(`${pkg}ffjord_wasm_bg.wasm`, import.meta.url)) });

const goldenDir = process.env.FFJORD_GOLDEN_DIR;
assert.ok(goldenDir, "FFJORD_GOLDEN_DIR must point at the golden JSON files (run-tests sets it)");
const goldens = readdirSync(goldenDir).filter((f) => f.endsWith(".json")).map((f) => JSON.parse(readFileSync(join(goldenDir, f))));
assert.ok(goldens.length >= 3, "golden files for the committed models (one with i8 matrices)");

const close = (a, b, rel = 1e-5) => Math.abs(a - b) <= rel * (1 + Math.abs(b));
// The one-row path and sampling are the host's computation in the same order
// (both builds; the small one by the plain products): equal as float32.
const same = (a, b) => Math.fround(a) === Math.fround(b);

// Models with f16 / i8 matrices (format version 3): the small build leaves
// that reader out and must refuse them with the reason.
const quantized = (g) => /\.(f16|i8)\.ffjd$/.test(g.model);
// Image models (format version 4) and models on a kernel density base
// (version 5): likewise for the image stages and the base.
const image = (g) => g.image_stages;
const kde = (g) => g.kde_base;

for (const g of goldens) {
  if (build === "small" && image(g)) {
    test(`${g.model}: the small build refuses image stages, naming why`, () => {
      assert.throws(() => new Detector(readFileSync(g.model)), /no feature `images`/);
    });
    continue;
  }
  if (build === "small" && kde(g)) {
    test(`${g.model}: the small build refuses a kernel density base, naming why`, () => {
      assert.throws(() => new Detector(readFileSync(g.model)), /no feature `kde`/);
    });
    continue;
  }
  if (build === "small" && quantized(g)) {
    test(`${g.model}: the small build refuses f16 / i8 matrices, naming why`, () => {
      assert.throws(() => new Detector(readFileSync(g.model)), /need feature `quantized`/);
    });
    continue;
  }
  test(`${g.model}: log p, NFE and verdicts equal the host's`, () => {
    const det = new Detector(readFileSync(g.model));
    assert.equal(det.dim(), g.dim);
    if (g.threshold !== null) assert.ok(close(det.threshold(), g.threshold, 1e-7));
    for (const row of g.rows) {
      const lp = det.log_density(new Float32Array(row.x));
      assert.ok(same(lp, row.log_p), `log p ${lp} vs host ${row.log_p}`);
      assert.equal(det.last_nfe(), row.nfe);
      if (row.verdict !== "uncalibrated") assert.equal(det.is_anomaly(new Float32Array(row.x)), row.verdict === "anomaly");
    }
    const batch = det.log_density_batch(new Float32Array(g.rows.flatMap((r) => r.x)));
    batch.forEach((lp, i) => assert.ok(same(lp, g.rows[i].log_p)));
    // The file's kind of score (−log p, the latent radius of format version
    // 6, or the base density of version 7), one row at a time and as a batch.
    assert.equal(["neg-log-density", "latent-radius", "latent-base"][det.score_kind()], g.score_kind);
    for (const row of g.rows) assert.ok(same(det.score(new Float32Array(row.x)), row.score));
    const scores = det.score_batch(new Float32Array(g.rows.flatMap((r) => r.x)));
    scores.forEach((s, i) => assert.ok(same(s, g.rows[i].score)));
    det.free();
  });

  test(`${g.model}: the packed path equals the host's packed path (SIMD build; absent from the small one)`, () => {
    const det = new Detector(readFileSync(g.model));
    if (build === "small") {
      assert.equal(det.log_density_packed, undefined, "the small build leaves the packed path out");
      assert.equal(det.score_packed, undefined);
      det.free();
      return;
    }
    const xs = new Float32Array(g.rows.flatMap((r) => r.x));
    // Blocks of 32 rows (the page's setting, the host's too) and of 3:
    // every row keeps its own step control, so the block size does not
    // change its value.
    for (const block of [32, 3]) {
      const lp = det.log_density_packed(xs, block);
      lp.forEach((v, i) => assert.ok(close(v, g.rows[i].log_p_packed), `block ${block} row ${i}: ${v} vs host ${g.rows[i].log_p_packed}`));
      if (block === 32) assert.equal(det.last_nfe(), g.packed_nfe);
      const scores = det.score_packed(xs, block);
      scores.forEach((v, i) => assert.ok(close(v, g.rows[i].score_packed), `block ${block} row ${i}: score ${v} vs host ${g.rows[i].score_packed}`));
    }
    assert.throws(() => det.log_density_packed(xs, 0), /row 0/);
    assert.throws(() => det.log_density_packed(new Float32Array(g.dim + 1), 32), /row 1/);
    det.free();
  });

  test(`${g.model}: seeded samples equal the host's`, () => {
    const det = new Detector(readFileSync(g.model));
    for (const s of g.samples) {
      const x = det.sample(BigInt(s.seed), 1);
      s.x.forEach((v, j) => assert.ok(same(x[j], v), `seed ${s.seed}: ${x[j]} vs ${v}`));
    }
    det.free();
  });
}

test("bad model bytes and bad rows raise the runtime's errors", () => {
  assert.throws(() => new Detector(new Uint8Array([1, 2, 3])), /truncated/);
  assert.throws(() => new Detector(new TextEncoder().encode("PK\u0003\u0004 not a model at all")), /bad magic/);
  const bytes = new Uint8Array(readFileSync(goldens.find((g) => g.dim === 2 && !quantized(g)).model));
  const flipped = bytes.slice();
  flipped[40] ^= 0x10;
  assert.throws(() => new Detector(flipped), /checksum mismatch/);
  const det = new Detector(bytes);
  assert.throws(() => det.log_density(new Float32Array([1, 2, 3])), /input has 3 values, the model's dimension is 2/);
  assert.throws(() => det.log_density(new Float32Array([NaN, 0])), /input value 0 is NaN or infinite/);
  assert.throws(() => det.log_density_batch(new Float32Array([0, 0, 1])), /row 1/);
  assert.throws(() => det.use_rk4(0), /invalid solver/);
  det.free();
});
