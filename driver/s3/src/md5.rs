//! MD5 helpers (the `md-5` crate), only to compute the ETag S3 gives a multipart object (the MD5 of its
//! parts' MD5s, then `-<parts>`) and so recognise an object the controller just completed.
//! Not for anything that needs a secure hash.

/// The MD5 digest of `data` (the `md-5` crate).
pub fn digest(data: &[u8]) -> [u8; 16] {
    use md5::Digest;
    md5::Md5::digest(data).into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The MD5 of `data` in lower-case hex (an ETag of a single-part object, unquoted).
pub fn hex_digest(data: &[u8]) -> String {
    hex(&digest(data))
}

/// The bytes of a hex string (`None` if it is not hex of whole bytes).
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_1321_test_suite() {
        for (input, want) in [
            ("", "d41d8cd98f00b204e9800998ecf8427e"),
            ("a", "0cc175b9c0f1b6a831c399e269772661"),
            ("abc", "900150983cd24fb0d6963f7d28e17f72"),
            ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
            ("abcdefghijklmnopqrstuvwxyz", "c3fcd3d76192e4007dfb496cca67e13b"),
            ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", "d174ab98d277d9f5a5611c2c9f419d9f"),
            (
                "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57edf4a22be3c955ac49da2e2107b67a",
            ),
        ] {
            assert_eq!(hex_digest(input.as_bytes()), want, "{input:?}");
        }
        // Lengths around the padding boundary.
        assert_eq!(hex_digest(&[b'x'; 55]).len(), 32);
        assert_ne!(hex_digest(&[b'x'; 56]), hex_digest(&[b'x'; 57]));
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(unhex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(hex(&[0, 255, 16]), "00ff10");
    }
}
