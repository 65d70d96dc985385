//! `.npy` files: header parsing (for memory-mapped data and fixtures) and f32 read/write.
//! Only little-endian, C-order float16/float32/float64 arrays are accepted.

use crate::error::{Error, ErrorKind, Result};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpyDtype {
    F16,
    F32,
    F64,
}

impl NpyDtype {
    pub fn size(self) -> usize {
        match self {
            NpyDtype::F16 => 2,
            NpyDtype::F32 => 4,
            NpyDtype::F64 => 8,
        }
    }
}

/// What the header says: element type, shape, and where the data starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NpyHeader {
    pub dtype: NpyDtype,
    pub shape: Vec<usize>,
    pub data_offset: usize,
}

impl NpyHeader {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn data_len(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(self.dtype.size(), |acc, &d| acc.checked_mul(d))
    }
}

const MAX_HEADER: usize = 1 << 16;

fn bad(what: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::InvalidArgument,
        format!("not a supported .npy file: {what}"),
    )
}

/// Parses the header at the start of `bytes` (the whole file, or at least its start) and
/// checks that `file_len` bytes hold all the data it announces.
pub fn parse_header(bytes: &[u8], file_len: usize) -> Result<NpyHeader> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("missing the \\x93NUMPY magic"));
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(format!("format version {v}"))),
    };
    if len > MAX_HEADER || start + len > bytes.len() {
        return Err(bad(format!("header length {len} runs past the file")));
    }
    let text =
        std::str::from_utf8(&bytes[start..start + len]).map_err(|_| bad("header is not text"))?;
    let value_after = |key: &str| -> Result<&str> {
        let at = text
            .find(&format!("'{key}'"))
            .ok_or_else(|| bad(format!("no '{key}' in header")))?;
        let rest = &text[at + key.len() + 2..];
        let colon = rest
            .find(':')
            .ok_or_else(|| bad(format!("no value for '{key}'")))?;
        Ok(rest[colon + 1..].trim_start())
    };
    let descr = value_after("descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or_else(|| bad("descr is not a string"))?;
    let dtype = match descr {
        "<f2" | "|f2" => NpyDtype::F16,
        "<f4" | "|f4" => NpyDtype::F32,
        "<f8" | "|f8" => NpyDtype::F64,
        other => {
            return Err(bad(format!(
                "dtype '{other}' (expected little-endian float16/32/64)"
            )));
        }
    };
    if value_after("fortran_order")?.starts_with("True") {
        return Err(bad("Fortran order (expected C order)"));
    }
    let shape_text = value_after("shape")?;
    let shape_text = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("shape is not a tuple"))?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| bad(format!("shape entry '{s}'")))
        })
        .collect::<Result<Vec<_>>>()?;
    let header = NpyHeader {
        dtype,
        shape,
        data_offset: start + len,
    };
    let need = header
        .data_len()
        .and_then(|n| n.checked_add(header.data_offset))
        .ok_or_else(|| bad(format!("shape {:?} overflows", header.shape)))?;
    if file_len < need {
        return Err(bad(format!(
            "truncated: shape {:?} needs {need} bytes, the file has {file_len}",
            header.shape
        )));
    }
    Ok(header)
}

/// Converts raw little-endian data of `dtype` to f32.
pub fn to_f32(dtype: NpyDtype, raw: &[u8], out: &mut Vec<f32>) {
    match dtype {
        NpyDtype::F16 => out.extend(
            raw.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        NpyDtype::F32 => out.extend(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        NpyDtype::F64 => out.extend(
            raw.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32),
        ),
    }
}

/// Reads a whole (small) `.npy` file as f32: `(shape, data)`.
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let header = parse_header(&bytes, bytes.len()).map_err(|e| e.context(path.display()))?;
    let raw = &bytes[header.data_offset..header.data_offset + header.data_len().unwrap()];
    let mut data = Vec::with_capacity(header.numel());
    to_f32(header.dtype, raw, &mut data);
    Ok((header.shape, data))
}

/// The bytes of a version-1 header for `shape` and `descr` (`'<f4'` or `'<f2'`).
pub fn header_bytes(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut dict =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Pad so that the data starts on a 64-byte boundary, ending the header with '\n'.
    let total = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat((64 - total % 64) % 64));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((dict.len() as u16).to_le_bytes());
    out.extend(dict.as_bytes());
    out
}

/// Writes an f32 array.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    assert_eq!(
        shape.iter().product::<usize>(),
        data.len(),
        "npy shape does not fit the data"
    );
    let mut bytes = header_bytes("<f4", shape);
    bytes.reserve(data.len() * 4);
    for v in data {
        bytes.extend(v.to_le_bytes());
    }
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_rejections() {
        let mut bytes = header_bytes("<f4", &[2, 3]);
        assert_eq!(bytes.len() % 64, 0);
        bytes.extend([0u8; 24]);
        let h = parse_header(&bytes, bytes.len()).unwrap();
        assert_eq!(
            (h.dtype, h.shape.clone(), h.data_offset),
            (NpyDtype::F32, vec![2, 3], bytes.len() - 24)
        );
        let n = bytes.len() - 1;
        let err = parse_header(&bytes[..n], n).unwrap_err();
        assert!(err.message.contains("truncated"), "{err}");
        let big = header_bytes("<f4", &[usize::MAX / 2, 4]);
        assert!(
            parse_header(&big, big.len())
                .unwrap_err()
                .message
                .contains("overflows")
        );
        let ints = header_bytes("<i8", &[2]);
        assert!(
            parse_header(&ints, 100)
                .unwrap_err()
                .message
                .contains("'<i8'")
        );
        assert!(parse_header(b"PK\x03\x04garbage!", 14).is_err());
    }
}
