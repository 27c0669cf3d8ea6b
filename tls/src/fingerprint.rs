//! A certificate's SHA-256 fingerprint, the one form in which the hub, the
//! registry and an operator's `--ca-fingerprint` name a certificate, so that
//! what one prints the others compare byte for byte.

/// The SHA-256 digest of `der` (a certificate's DER), as 64 lowercase hex
/// digits without separators.
#[must_use]
pub fn fingerprint_sha256(der: &[u8]) -> String {
    use std::fmt::Write as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest
        .as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::fingerprint_sha256;

    #[test]
    fn the_fingerprint_is_lowercase_hex_sha256() {
        // SHA-256 of the empty string and of "abc" (FIPS 180-2 test vectors).
        assert_eq!(
            fingerprint_sha256(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            fingerprint_sha256(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
