//! The signing secret of a webhook or of a push queue, read once into the HMAC key it stands
//! for. The secret never prints: `Debug` shows `***`, and there is no way to get it back out.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use crate::error::SecretError;

/// The prefix of a Standard Webhooks secret: what follows it is the key in base64.
const WHSEC_PREFIX: &str = "whsec_";

/// Standard base64 with or without the trailing `=`, as the Standard Webhooks libraries read
/// secrets (several generators leave the padding off).
const SECRET_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A webhook's or a queue's signing secret.
///
/// A secret that starts with `whsec_` is a Standard Webhooks secret: the key is the standard
/// base64 after the prefix (padding optional). Any other secret is used as its UTF-8 bytes,
/// exactly as given (no trimming).
#[derive(Clone)]
pub struct Secret {
    key: Vec<u8>,
}

impl Secret {
    /// Reads a secret into its key.
    ///
    /// # Errors
    /// [`SecretError::NotBase64`] when the secret starts with `whsec_` and the rest is not
    /// standard base64, and [`SecretError::Empty`] when there is no key at all (`""` or
    /// `"whsec_"`). Check secrets when they are configured or submitted, not when they are
    /// first used to sign.
    pub fn new(secret: impl Into<String>) -> Result<Self, SecretError> {
        let secret = secret.into();
        let key = match secret.strip_prefix(WHSEC_PREFIX) {
            Some(encoded) => SECRET_BASE64.decode(encoded).map_err(|_| SecretError::NotBase64)?,
            None => secret.into_bytes(),
        };
        if key.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Self { key })
    }

    /// The HMAC key.
    pub(crate) fn key(&self) -> &[u8] {
        &self.key
    }
}

impl FromStr for Secret {
    type Err = SecretError;

    fn from_str(secret: &str) -> Result<Self, Self::Err> {
        Self::new(secret)
    }
}

impl TryFrom<String> for Secret {
    type Error = SecretError;

    fn try_from(secret: String) -> Result<Self, Self::Error> {
        Self::new(secret)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whsec_secret_is_base64_after_the_prefix() {
        let secret = Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid base64");
        // `printf %s MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw | base64 -d | xxd -p`
        assert_eq!(
            hex::encode(secret.key()),
            "31f290f6bf06298aab4f08d43c3f082cf648a362da2da4b0"
        );
    }

    #[test]
    fn whsec_padding_is_optional() {
        let padded = Secret::new("whsec_aGVsbG8=").expect("padded base64");
        let unpadded = Secret::new("whsec_aGVsbG8").expect("unpadded base64");
        assert_eq!(padded.key(), b"hello");
        assert_eq!(unpadded.key(), b"hello");
    }

    #[test]
    fn other_secrets_are_their_bytes() {
        let secret = Secret::new("my-webhook-secret").expect("any non-empty string");
        assert_eq!(secret.key(), b"my-webhook-secret");
        // Valid base64 without the prefix is still taken literally.
        let secret = Secret::new("aGVsbG8=").expect("any non-empty string");
        assert_eq!(secret.key(), b"aGVsbG8=");
        // The prefix is case-sensitive, as in the Standard Webhooks libraries.
        let secret = Secret::new("WHSEC_aGVsbG8=").expect("any non-empty string");
        assert_eq!(secret.key(), b"WHSEC_aGVsbG8=");
    }

    #[test]
    fn invalid_base64_after_the_prefix_is_refused() {
        for bad in ["whsec_not base64!", "whsec_a", "whsec_aGVsbG8===", "whsec_aGVs-G8_"] {
            assert_eq!(Secret::new(bad).map(|_| ()), Err(SecretError::NotBase64), "{bad}");
        }
    }

    #[test]
    fn empty_secrets_are_refused() {
        assert_eq!(Secret::new("").map(|_| ()), Err(SecretError::Empty));
        assert_eq!(Secret::new("whsec_").map(|_| ()), Err(SecretError::Empty));
    }

    #[test]
    fn parses_from_str_and_string() {
        let parsed: Secret = "whsec_aGVsbG8=".parse().expect("valid secret");
        assert_eq!(parsed.key(), b"hello");
        let converted = Secret::try_from(String::from("s3cret")).expect("valid secret");
        assert_eq!(converted.key(), b"s3cret");
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let raw = Secret::new("my-webhook-secret").expect("valid secret");
        let whsec = Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid secret");
        assert_eq!(format!("{raw:?}"), "***");
        assert_eq!(format!("{whsec:#?}"), "***");

        #[derive(Debug)]
        #[expect(dead_code, reason = "only read through Debug")]
        struct Webhook {
            url: &'static str,
            secret: Secret,
        }
        let shown = format!(
            "{:?}",
            Webhook {
                url: "https://example.com/hook",
                secret: whsec,
            }
        );
        assert!(shown.contains("secret: ***"), "{shown}");
        for needle in ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_", "31f290f6", "49, 242"] {
            assert!(!shown.contains(needle), "{shown} shows {needle}");
        }

        // An error about a bad secret does not repeat it either.
        let error = Secret::new("whsec_Top$ecret!").map(|_| ()).expect_err("not base64");
        let shown = format!("{error} {error:?}");
        assert!(!shown.contains("Top$ecret"), "{shown}");
    }
}
