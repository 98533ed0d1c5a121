//! NPY files the trainer writes (prepared data sets) and the uint8 image
//! arrays it reads. Float tables are read by [`crate::data`].

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};

/// Writes a C-order NPY file atomically: `descr` is NumPy's type string
/// (`<f4`, `|u1`), `payload` the elements' little-endian bytes.
pub fn write(path: &Path, descr: &str, shape: &[usize], payload: &[u8]) -> Result<()> {
    let dims = match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {dims}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + payload.len());
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&u16::try_from(header.len()).context("NPY header too long")?.to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(payload);
    crate::modelfile::write_atomic(path, &bytes)
}

/// Writes a `[rows, cols]` float32 table.
pub fn write_f32(path: &Path, rows: usize, cols: usize, data: &[f32]) -> Result<()> {
    ensure!(data.len() == rows * cols, "{rows}×{cols} table given {} values", data.len());
    let payload: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    write(path, "<f4", &[rows, cols], &payload)
}

/// Reads a C-order uint8 array: its shape and bytes.
pub fn read_u8(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .with_context(|| format!("{}: not a valid NPY file", path.display()))?;
    if npy.order() == npyz::Order::Fortran {
        bail!("{}: Fortran-ordered arrays are not supported; save with C order", path.display());
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&n| n as usize).collect();
    match npy.dtype() {
        npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Uint && t.size_field() == 1 => {}
        other => bail!("{}: dtype {other:?}, expected uint8", path.display()),
    }
    let data = npy.into_vec::<u8>().with_context(|| format!("{}: reading the array", path.display()))?;
    ensure!(
        data.len() == shape.iter().product::<usize>(),
        "{}: {} bytes for shape {shape:?}",
        path.display(),
        data.len()
    );
    Ok((shape, data))
}
