//! Size limits for keys, values and frames (ARCHITECTURE.md §3), shared by client and node.

use crate::WireError;

/// Default maximum key length in bytes.
pub const DEFAULT_MAX_KEY: usize = 1024;
/// Default maximum value length in bytes (4 MiB).
pub const DEFAULT_MAX_VALUE: usize = 4 * 1024 * 1024;
/// Room for everything in a frame that is not key or value (tags, lengths, version).
pub const FRAME_OVERHEAD: usize = 64 * 1024;

/// Size limits. Invariant: `max_frame >= max_key + max_value + FRAME_OVERHEAD`, so that any
/// request that passes [`Limits::check_put`] fits in one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum key length in bytes (keys must also be non-empty).
    pub max_key: usize,
    /// Maximum value length in bytes.
    pub max_value: usize,
    /// Maximum frame payload length in bytes.
    pub max_frame: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_KEY, DEFAULT_MAX_VALUE)
    }
}

impl Limits {
    /// Limits for the given key and value maxima, with a frame maximum that fits both.
    pub fn new(max_key: usize, max_value: usize) -> Self {
        Self {
            max_key,
            max_value,
            max_frame: max_key + max_value + FRAME_OVERHEAD,
        }
    }

    /// Checks that `key` is non-empty and at most `max_key` bytes.
    pub fn check_key(&self, key: &[u8]) -> Result<(), WireError> {
        if key.is_empty() {
            return Err(WireError::EmptyKey);
        }
        if key.len() > self.max_key {
            return Err(WireError::KeyTooLarge {
                len: key.len(),
                max: self.max_key,
            });
        }
        Ok(())
    }

    /// Checks a key and a value for a put.
    pub fn check_put(&self, key: &[u8], value: &[u8]) -> Result<(), WireError> {
        self.check_key(key)?;
        if value.len() > self.max_value {
            return Err(WireError::ValueTooLarge {
                len: value.len(),
                max: self.max_value,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_bounds() {
        let l = Limits::default();
        assert_eq!(l.check_key(b""), Err(WireError::EmptyKey));
        assert!(l.check_key(&[1u8; 1024]).is_ok());
        assert_eq!(
            l.check_key(&[1u8; 1025]),
            Err(WireError::KeyTooLarge {
                len: 1025,
                max: 1024
            })
        );
    }

    #[test]
    fn value_bounds() {
        let l = Limits::new(16, 10);
        assert!(l.check_put(b"k", &[0; 10]).is_ok());
        assert_eq!(
            l.check_put(b"k", &[0; 11]),
            Err(WireError::ValueTooLarge { len: 11, max: 10 })
        );
        assert!(l.max_frame >= 16 + 10 + FRAME_OVERHEAD);
    }
}
