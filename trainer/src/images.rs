//! Image data sets (MNIST, Fashion-MNIST): `trainer prepare mnist|fashion-mnist`
//! turns what `scripts/fetch-data` converted into training splits at 28×28
//! and, by area averaging, 14×14 and 8×8, all uint8 NPY, and measures the
//! simplest density on them: independent per-pixel histograms, in bits/dim.
//!
//! Bits/dim follow `shared/ffjord-spec.md` §7: with uniform dequantization
//! `x̃ = (x + u)/256` a density on `[0, 1)^D` gives `−(log p(x̃)/D − log 256)/log 2`;
//! for a model that is constant within each byte's bin this is exactly the
//! mean of `−log₂ P(byte)` over pixels.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};

/// Single-channel uint8 images, row-major, `[n, height, width]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Images {
    /// Number of images.
    pub n: usize,
    /// Rows per image.
    pub height: usize,
    /// Columns per image.
    pub width: usize,
    /// `n · height · width` bytes.
    pub pixels: Vec<u8>,
}

impl Images {
    /// Reads a `[n, height, width]` uint8 NPY file.
    pub fn load(path: &Path) -> Result<Self> {
        let (shape, pixels) = crate::npy::read_u8(path)?;
        let [n, height, width] = shape[..] else {
            bail!("{}: shape {shape:?}, expected [images, height, width]", path.display())
        };
        Ok(Images { n, height, width, pixels })
    }

    /// Writes them as a `[n, height, width]` uint8 NPY file.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::npy::write(path, "|u1", &[self.n, self.height, self.width], &self.pixels)
    }

    /// The images as one grayscale PNG: a square-ish grid, one dark pixel between cells.
    pub fn save_png(&self, path: &Path) -> Result<()> {
        ensure!(self.n > 0, "no images to draw");
        let cols = (self.n as f64).sqrt().ceil() as usize;
        let rows = self.n.div_ceil(cols);
        let (gw, gh) = (cols * (self.width + 1) + 1, rows * (self.height + 1) + 1);
        let mut grid = vec![40u8; gw * gh];
        for (i, img) in self.pixels.chunks_exact(self.dim()).enumerate() {
            let (top, left) = (1 + (i / cols) * (self.height + 1), 1 + (i % cols) * (self.width + 1));
            for (r, line) in img.chunks_exact(self.width).enumerate() {
                let at = (top + r) * gw + left;
                grid[at..at + self.width].copy_from_slice(line);
            }
        }
        let mut png_bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut png_bytes, u32::try_from(gw)?, u32::try_from(gh)?);
            enc.set_color(png::ColorType::Grayscale);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header()?;
            writer.write_image_data(&grid)?;
        }
        crate::modelfile::write_atomic(path, &png_bytes)
    }

    /// Pixels per image.
    pub fn dim(&self) -> usize {
        self.height * self.width
    }

    /// Images `range` (a contiguous subset).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Images {
        let d = self.dim();
        Images { n: range.len(), pixels: self.pixels[range.start * d..range.end * d].to_vec(), ..*self }
    }

    /// Area averaging to `height × width` (any ratio, as image libraries'
    /// "area" resampling): each output pixel is the mean of the input area it
    /// covers, partial pixels weighted by their overlap, rounded to a byte.
    pub fn downscale(&self, height: usize, width: usize) -> Result<Images> {
        ensure!(
            (1..=self.height).contains(&height) && (1..=self.width).contains(&width),
            "cannot area-average {}×{} images to {height}×{width}",
            self.height,
            self.width
        );
        let wy = area_weights(self.height, height);
        let wx = area_weights(self.width, width);
        let mut pixels = Vec::with_capacity(self.n * height * width);
        let mut rows = vec![0.0f64; height * self.width];
        for img in self.pixels.chunks_exact(self.dim()) {
            rows.fill(0.0);
            for (o, weights) in wy.iter().enumerate() {
                for &(r, w) in weights {
                    for c in 0..self.width {
                        rows[o * self.width + c] += w * f64::from(img[r * self.width + c]);
                    }
                }
            }
            for o in 0..height {
                for weights in &wx {
                    let v: f64 = weights.iter().map(|&(c, w)| w * rows[o * self.width + c]).sum();
                    pixels.push(v.round().clamp(0.0, 255.0) as u8);
                }
            }
        }
        Ok(Images { n: self.n, height, width, pixels })
    }
}

/// Whether `path` is an 8-bit image array (a uint8 NPY file of shape
/// `[N, H, W]`), which `fit` trains the multiscale image flow on.
pub fn is_image_file(path: &Path) -> bool {
    let is_npy = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    is_npy
        && std::fs::File::open(path).ok().and_then(|f| npyz::NpyFile::new(std::io::BufReader::new(f)).ok()).is_some_and(
            |npy| {
                matches!(npy.dtype(), npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Uint && t.size_field() == 1)
                    && npy.shape().len() == 3
            },
        )
}

/// The images of `path` as rows of pixel bytes (float64 `[N, H·W]`) and their `[C, H, W]`.
pub fn load_rows(path: &Path) -> Result<(tch::Tensor, [i64; 3])> {
    let images = Images::load(path)?;
    let floats: Vec<f64> = images.pixels.iter().map(|&v| f64::from(v)).collect();
    let (n, d) = (i64::try_from(images.n)?, i64::try_from(images.dim())?);
    let shape = [1, i64::try_from(images.height)?, i64::try_from(images.width)?];
    Ok((tch::Tensor::from_slice(&floats).reshape([n, d]), shape))
}

/// For each of `to` output cells along an axis of `from` input cells, the
/// input cells it overlaps and their weights (summing to 1).
fn area_weights(from: usize, to: usize) -> Vec<Vec<(usize, f64)>> {
    let scale = from as f64 / to as f64;
    (0..to)
        .map(|o| {
            let (lo, hi) = (o as f64 * scale, (o + 1) as f64 * scale);
            (lo.floor() as usize..(hi.ceil() as usize).min(from))
                .map(|i| (i, ((i + 1) as f64).min(hi) - (i as f64).max(lo)))
                .filter(|&(_, w)| w > 0.0)
                .map(|(i, w)| (i, w / scale))
                .collect()
        })
        .collect()
}

/// Independent per-pixel distributions over the 256 byte values, with
/// add-`alpha` smoothing: the simplest density on images, a floor any
/// image model must beat.
pub struct PixelHistograms {
    /// Per pixel, `log₂ P(value)` for each of the 256 values.
    log2_p: Vec<[f64; 256]>,
}

impl PixelHistograms {
    /// Counts every pixel's values over `images`.
    pub fn fit(images: &Images, alpha: f64) -> Result<Self> {
        ensure!(images.n > 0 && alpha > 0.0, "need images and a positive smoothing count");
        let d = images.dim();
        let mut counts = vec![[0u32; 256]; d];
        for img in images.pixels.chunks_exact(d) {
            for (c, &v) in counts.iter_mut().zip(img) {
                c[usize::from(v)] += 1;
            }
        }
        let total = images.n as f64 + 256.0 * alpha;
        let log2_p = counts.iter().map(|c| c.map(|k| ((f64::from(k) + alpha) / total).log2())).collect();
        Ok(PixelHistograms { log2_p })
    }

    /// `log p(x)` in nats of one image given as pixel values (each an
    /// integer in 0–255; `None` for anything else or the wrong length).
    pub fn log_prob(&self, pixels: &[f64]) -> Option<f64> {
        if pixels.len() != self.log2_p.len() {
            return None;
        }
        let mut bits = 0.0;
        for (&v, lp) in pixels.iter().zip(&self.log2_p) {
            if !(0.0..=255.0).contains(&v) || v.fract() != 0.0 {
                return None;
            }
            bits += lp[v as usize];
        }
        Some(bits * std::f64::consts::LN_2)
    }

    /// Mean bits per pixel on `images` (their shape must match the fit's).
    pub fn bits_per_dim(&self, images: &Images) -> Result<f64> {
        let d = images.dim();
        ensure!(
            d == self.log2_p.len() && images.n > 0,
            "images of {d} pixels for histograms of {}",
            self.log2_p.len()
        );
        let total: f64 = images
            .pixels
            .chunks_exact(d)
            .map(|img| img.iter().zip(&self.log2_p).map(|(&v, lp)| -lp[usize::from(v)]).sum::<f64>())
            .sum();
        Ok(total / (images.n * d) as f64)
    }
}

/// The smoothing counts the baseline chooses from, by validation bits/dim.
const ALPHAS: [f64; 4] = [0.01, 0.1, 1.0, 10.0];

/// The per-pixel baseline with its smoothing chosen on `valid`: `(alpha,
/// validation bits/dim, test bits/dim)`.
pub fn pixel_baseline(train: &Images, valid: &Images, test: &Images) -> Result<(f64, f64, f64)> {
    let mut best: Option<(f64, f64, PixelHistograms)> = None;
    for alpha in ALPHAS {
        let h = PixelHistograms::fit(train, alpha)?;
        let v = h.bits_per_dim(valid)?;
        if best.as_ref().is_none_or(|b| v < b.1) {
            best = Some((alpha, v, h));
        }
    }
    let (alpha, v, h) = best.context("no smoothing count")?;
    Ok((alpha, v, h.bits_per_dim(test)?))
}

/// The resolutions `prepare` writes: the source's and two area-averaged ones.
const SIDES: [usize; 3] = [28, 14, 8];

/// `trainer prepare mnist|fashion-mnist --raw DIR`: `DIR` is what
/// `scripts/fetch-data` printed. MNIST keeps its classic 50,000 / 10,000 /
/// 10,000 split; Fashion-MNIST's last 10,000 training images become the
/// validation split. Writes `<split>-images.npy` and `<split>-labels.npy` at
/// 28×28 in `out_dir` and the images at 14×14 and 8×8 in `out_dir/14x14`
/// and `out_dir/8x8`, with a README.txt that records the baseline.
pub fn prepare(name: &str, raw: &Path, out_dir: &Path) -> Result<()> {
    let load = |split: &str| -> Result<(Images, Vec<u8>)> {
        let images = Images::load(&raw.join(format!("{split}-images.npy")))?;
        let (shape, labels) = crate::npy::read_u8(&raw.join(format!("{split}-labels.npy")))?;
        ensure!(shape == [images.n], "{split}: {} images but labels of shape {shape:?}", images.n);
        Ok((images, labels))
    };
    let splits: Vec<(&str, Images, Vec<u8>)> = match name {
        "mnist" => ["train", "valid", "test"]
            .into_iter()
            .map(|s| load(s).map(|(i, l)| (s, i, l)))
            .collect::<Result<_>>()?,
        "fashion-mnist" => {
            let (train, labels) = load("train")?;
            ensure!(train.n > 10_000, "fashion-mnist: {} training images, expected 60,000", train.n);
            let cut = train.n - 10_000;
            let (test, test_labels) = load("test")?;
            vec![
                ("train", train.slice(0..cut), labels[..cut].to_vec()),
                ("valid", train.slice(cut..train.n), labels[cut..].to_vec()),
                ("test", test, test_labels),
            ]
        }
        other => bail!("unknown image set '{other}' (mnist, fashion-mnist)"),
    };
    for (split, images, _) in &splits {
        ensure!(
            images.height == 28 && images.width == 28,
            "{name} {split}: {}×{} images, expected 28×28",
            images.height,
            images.width
        );
    }
    let mut readme = format!("{name} prepared by `trainer prepare {name}` from {}\n", raw.display());
    for side in SIDES {
        let dir = if side == 28 { out_dir.to_path_buf() } else { out_dir.join(format!("{side}x{side}")) };
        let scaled: Vec<Images> =
            splits.iter().map(|(_, images, _)| images.downscale(side, side)).collect::<Result<_>>()?;
        for ((split, _, labels), images) in splits.iter().zip(&scaled) {
            images.save(&dir.join(format!("{split}-images.npy")))?;
            crate::npy::write(&dir.join(format!("{split}-labels.npy")), "|u1", &[labels.len()], labels)?;
        }
        let (alpha, valid_bpd, test_bpd) = pixel_baseline(&scaled[0], &scaled[1], &scaled[2])?;
        let line = format!(
            "{side}×{side}: train {}, validation {}, test {} images in {}; independent per-pixel histograms \
             (add-{alpha} smoothing, chosen on validation): validation {valid_bpd:.4}, test {test_bpd:.4} bits/dim",
            scaled[0].n,
            scaled[1].n,
            scaled[2].n,
            dir.display()
        );
        println!("{name} {line}");
        readme.push_str(&line);
        readme.push('\n');
    }
    let mut f = std::fs::File::create(out_dir.join("README.txt"))
        .with_context(|| format!("writing {}", out_dir.join("README.txt").display()))?;
    f.write_all(readme.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(height: usize, width: usize, pixels: Vec<u8>) -> Images {
        Images { n: pixels.len() / (height * width), height, width, pixels }
    }

    #[test]
    fn area_averaging_by_two_takes_block_means() {
        let src = images(2, 4, vec![0, 2, 10, 20, 4, 6, 30, 40]);
        let out = src.downscale(1, 2).unwrap();
        assert_eq!(out.pixels, vec![3, 25]);
    }

    /// A non-integer ratio (28 → 8: 3.5 pixels per cell) weights the shared
    /// pixels by their overlap; weights sum to one, so a constant stays itself
    /// and the mean of a ramp is kept.
    #[test]
    fn area_averaging_by_a_fractional_ratio_keeps_means() {
        for w in area_weights(28, 8) {
            assert!((w.iter().map(|p| p.1).sum::<f64>() - 1.0).abs() < 1e-12);
        }
        let flat = images(28, 28, vec![77; 2 * 784]);
        assert_eq!(flat.downscale(8, 8).unwrap().pixels, vec![77; 2 * 64]);
        // A horizontal ramp 0, 7, 14, …: cell j is the mean of the ramp over
        // columns [3.5j, 3.5j + 3.5), here by a fine midpoint sum instead.
        let ramp = images(28, 28, (0..784).map(|i| (i % 28 * 7) as u8).collect());
        let out = ramp.downscale(8, 8).unwrap();
        for j in 0..8 {
            let samples = 7000;
            let mean = (0..samples)
                .map(|s| 7.0 * (3.5 * j as f64 + 3.5 * (s as f64 + 0.5) / samples as f64).floor())
                .sum::<f64>()
                / samples as f64;
            assert_eq!(out.pixels[j], mean.round() as u8, "cell {j}: mean {mean}");
        }
        assert!(ramp.downscale(0, 8).is_err() && ramp.downscale(8, 29).is_err());
    }

    /// Uniform bytes cost 8 bits; a pixel that never changes costs almost
    /// nothing; the value follows −log₂ of the smoothed frequency exactly.
    #[test]
    fn per_pixel_histograms_give_the_entropy_they_should() {
        let uniform = images(1, 1, (0..=255).collect());
        let h = PixelHistograms::fit(&uniform, 1.0).unwrap();
        assert!((h.bits_per_dim(&uniform).unwrap() - 8.0).abs() < 1e-12);
        let constant = images(1, 2, [5, 9].repeat(100));
        let h = PixelHistograms::fit(&constant, 0.01).unwrap();
        let want = -((100.0 + 0.01) / (100.0 + 2.56f64)).log2();
        assert!((h.bits_per_dim(&constant).unwrap() - want).abs() < 1e-12);
        assert!(h.bits_per_dim(&uniform).is_err(), "shape mismatch is an error");
    }

    /// `prepare` on a tiny MNIST-shaped folder: every split at every side,
    /// labels kept; images of the wrong size are named in the error.
    #[test]
    fn prepare_writes_every_split_at_every_side() {
        let raw = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        for (split, n) in [("train", 5), ("valid", 3), ("test", 2)] {
            let imgs = images(28, 28, (0..n * 784).map(|i| (i * 31 % 256) as u8).collect());
            imgs.save(&raw.path().join(format!("{split}-images.npy"))).unwrap();
            let labels: Vec<u8> = (0..n as u8).collect();
            crate::npy::write(&raw.path().join(format!("{split}-labels.npy")), "|u1", &[n], &labels).unwrap();
        }
        prepare("mnist", raw.path(), out.path()).unwrap();
        for (dir, side) in [(out.path().to_path_buf(), 28), (out.path().join("8x8"), 8)] {
            let test = Images::load(&dir.join("test-images.npy")).unwrap();
            assert_eq!((test.n, test.height, test.width), (2, side, side));
            let (shape, labels) = crate::npy::read_u8(&dir.join("test-labels.npy")).unwrap();
            assert_eq!((shape, labels), (vec![2], vec![0, 1]));
        }
        assert_eq!(Images::load(&out.path().join("14x14/train-images.npy")).unwrap().n, 5);
        images(14, 14, vec![0; 3 * 196]).save(&raw.path().join("valid-images.npy")).unwrap();
        let err = format!("{:#}", prepare("mnist", raw.path(), out.path()).unwrap_err());
        assert!(err.contains("valid") && err.contains("14×14"), "{err}");
        assert!(prepare("cifar", raw.path(), out.path()).is_err());
    }
}
