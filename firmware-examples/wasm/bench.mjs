// Throughput of both WASM builds under Node, one thread: rows per second of
// log p for the one-row batch path and (SIMD build) the packed path, on rows
// sampled from the model itself (seeded). A benchmark, not a test.
// Usage: node bench.mjs [MODEL] [ROWS]   (after ./build.sh)
import { readFileSync } from "node:fs";
import { cpuUsage } from "node:process";

const model = process.argv[2] ?? new URL("../../models/8gaussians-mcu/model.ffjd", import.meta.url);
const n = Number(process.argv[3] ?? 10000);
console.log(`| build | path | rows/s (wall) | rows/s (CPU) | NFE per row |`);
console.log(`|---|---|---|---|---|`);
for (const [build, pkg] of [["SIMD", "pkg"], ["small", "pkg-small"]]) {
  const { initSync, Detector } = await import(new URL(`./www/${pkg}/ffjord_wasm.js`, import.meta.url));
  initSync({ module: readFileSync(new URL(`./www/${pkg}/ffjord_wasm_bg.wasm`, import.meta.url)) });
  const det = new Detector(readFileSync(model));
  const xs = det.sample(1n, n);
  const paths = [["one row at a time (log_density_batch)", () => det.log_density_batch(xs)]];
  if (det.log_density_packed) {
    paths.push(...[8, 32, 64].map((b) => [`packed, ${b} rows at a time`, () => det.log_density_packed(xs, b)]));
  }
  for (const [name, run] of paths) {
    run(); // warm-up
    let best = null;
    for (let r = 0; r < 3; r++) {
      const c0 = cpuUsage(), t0 = performance.now();
      run();
      const wall = (performance.now() - t0) / 1e3, c = cpuUsage(c0), cpu = (c.user + c.system) / 1e6;
      if (best === null || cpu < best.cpu) best = { wall, cpu, nfe: det.last_nfe() };
    }
    console.log(`| ${build} | ${name} | ${(n / best.wall).toFixed(0)} | ${(n / best.cpu).toFixed(0)} | ${(best.nfe / n).toFixed(1)} |`);
  }
  det.free();
}
