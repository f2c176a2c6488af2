//! The metadata of a GGUF file (`tokenizer.ggml.*`, the chat template), read without the
//! tensors: the header, then every key/value pair (GGUF v1–v3, little-endian), as the
//! format's specification lays them out. What the tokenizer needs, and nothing that
//! pulls in a tensor library.

use std::collections::HashMap;
use std::io::Read;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn to_string(&self) -> Result<&String, String> {
        match self {
            Value::String(s) => Ok(s),
            v => Err(format!("not a string: {v:?}")),
        }
    }

    pub fn to_bool(&self) -> Result<bool, String> {
        match self {
            Value::Bool(b) => Ok(*b),
            v => Err(format!("not a bool: {v:?}")),
        }
    }

    pub fn to_vec(&self) -> Result<&Vec<Value>, String> {
        match self {
            Value::Array(a) => Ok(a),
            v => Err(format!("not an array: {v:?}")),
        }
    }
}

/// Longest string or array the reader accepts (a vocabulary is ~10⁵ entries).
const MAX_LEN: u64 = 1 << 28;

struct Reader<R> {
    r: R,
    /// GGUF v1 writes lengths and counts as u32, later versions as u64.
    v1: bool,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|e| e.to_string())?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.bytes().map(u32::from_le_bytes)
    }

    fn len(&mut self) -> Result<u64, String> {
        let n = if self.v1 {
            u64::from(self.u32()?)
        } else {
            self.bytes().map(u64::from_le_bytes)?
        };
        if n > MAX_LEN {
            return Err(format!("a length of {n} is not plausible"));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String, String> {
        let n = self.len()? as usize;
        let mut b = vec![0u8; n];
        self.r.read_exact(&mut b).map_err(|e| e.to_string())?;
        String::from_utf8(b).map_err(|e| e.to_string())
    }

    fn value(&mut self, kind: u32) -> Result<Value, String> {
        Ok(match kind {
            0 => Value::U8(self.bytes::<1>()?[0]),
            1 => Value::I8(self.bytes::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                let inner = self.u32()?;
                let n = self.len()?;
                let mut items = Vec::with_capacity(n.min(1 << 20) as usize);
                for _ in 0..n {
                    items.push(self.value(inner)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.bytes()?)),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            k => return Err(format!("unknown metadata value type {k}")),
        })
    }
}

/// Reads the metadata of the GGUF file `r` is positioned at the start of.
pub fn read_metadata(r: impl Read) -> Result<HashMap<String, Value>, String> {
    let mut reader = Reader { r, v1: false };
    if &reader.bytes::<4>()? != b"GGUF" {
        return Err("no GGUF magic".into());
    }
    let version = reader.u32()?;
    if !(1..=3).contains(&version) {
        return Err(format!("unsupported GGUF version {version}"));
    }
    reader.v1 = version == 1;
    let _tensors = reader.len()?;
    let entries = reader.len()?;
    let mut md = HashMap::new();
    for _ in 0..entries {
        let key = reader.string()?;
        let kind = reader.u32()?;
        let value = reader.value(kind)?;
        md.insert(key, value);
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(s.as_bytes());
        b
    }

    #[test]
    fn reads_scalars_strings_and_arrays_and_refuses_garbage() {
        let mut f = b"GGUF".to_vec();
        f.extend(3u32.to_le_bytes());
        f.extend(0u64.to_le_bytes());
        f.extend(3u64.to_le_bytes());
        f.extend(string("a.u32"));
        f.extend(4u32.to_le_bytes());
        f.extend(7u32.to_le_bytes());
        f.extend(string("a.s"));
        f.extend(8u32.to_le_bytes());
        f.extend(string("hi"));
        f.extend(string("a.arr"));
        f.extend(9u32.to_le_bytes());
        f.extend(5u32.to_le_bytes());
        f.extend(2u64.to_le_bytes());
        f.extend((-1i32).to_le_bytes());
        f.extend(2i32.to_le_bytes());
        let md = read_metadata(&f[..]).unwrap();
        assert_eq!(md["a.u32"], Value::U32(7));
        assert_eq!(md["a.s"].to_string().unwrap(), "hi");
        assert_eq!(
            md["a.arr"].to_vec().unwrap(),
            &vec![Value::I32(-1), Value::I32(2)]
        );
        assert!(read_metadata(&b"GGML"[..]).is_err());
        assert!(read_metadata(&f[..f.len() - 2]).is_err(), "truncated");
    }
}
