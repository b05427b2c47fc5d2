//! Checking a signed request on the receiving side: batchd's own tests use it on what batchd
//! sent, and a Rust receiver can use it on what it is sent. Comparisons are constant-time
//! (`hmac`'s `verify_slice`), so a timing does not tell how much of a forged signature was
//! right.

use std::time::Duration;

use base64::Engine as _;
use base64::prelude::BASE64_STANDARD;
use hmac::Mac;

use crate::error::VerifyError;
use crate::header;
use crate::secret::Secret;
use crate::sign::{standard_mac, x_signature_mac};

/// How far `webhook-timestamp` may be from the receiver's clock, either way: five minutes, as
/// the Standard Webhooks libraries default to.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// The three Standard Webhooks headers of a request, as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandardHeaders<'a> {
    /// `webhook-id`.
    pub id: &'a str,
    /// `webhook-timestamp`.
    pub timestamp: &'a str,
    /// `webhook-signature`: one or more space-separated `v1,<base64>` entries.
    pub signature: &'a str,
}

/// Verifies a request signed by the Standard Webhooks rules.
///
/// The timestamp must be within `tolerance` of `now` (Unix seconds) either way, which bounds
/// replays; use [`DEFAULT_TOLERANCE`] unless there is a reason not to. The signature header is
/// a space-separated list, so a sender can sign with an old and a new secret while rotating;
/// one `v1` entry that matches is enough, and entries of other versions are ignored.
///
/// # Errors
/// The first [`VerifyError`] found: a missing header, a timestamp that is not an integer or
/// is out of tolerance, no `v1` entry, or no entry that matches.
pub fn verify_standard(
    secret: &Secret,
    headers: &StandardHeaders<'_>,
    body: &[u8],
    now: i64,
    tolerance: Duration,
) -> Result<(), VerifyError> {
    for (name, value) in [
        (header::WEBHOOK_ID, headers.id),
        (header::WEBHOOK_TIMESTAMP, headers.timestamp),
        (header::WEBHOOK_SIGNATURE, headers.signature),
    ] {
        if value.is_empty() {
            return Err(VerifyError::MissingHeader { name });
        }
    }
    let timestamp: i64 = headers.timestamp.parse().map_err(|_| VerifyError::InvalidTimestamp)?;
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if now.saturating_sub(timestamp) > tolerance {
        return Err(VerifyError::TimestampTooOld { timestamp, now });
    }
    if timestamp.saturating_sub(now) > tolerance {
        return Err(VerifyError::TimestampTooNew { timestamp, now });
    }

    let expected = standard_mac(secret, headers.id, headers.timestamp, body);
    let mut saw_v1 = false;
    for entry in headers.signature.split_ascii_whitespace() {
        let Some(("v1", encoded)) = entry.split_once(',') else {
            continue;
        };
        saw_v1 = true;
        // An entry that is not base64 cannot match, but another one still may.
        let Ok(signature) = BASE64_STANDARD.decode(encoded) else {
            continue;
        };
        if expected.clone().verify_slice(&signature).is_ok() {
            return Ok(());
        }
    }
    Err(if saw_v1 {
        VerifyError::Mismatch
    } else {
        VerifyError::NoSignature
    })
}

/// Verifies an `X-Signature` header: the hex HMAC-SHA256 of the body (either case).
///
/// This scheme signs neither a timestamp nor an id, so it cannot refuse a replay; prefer
/// [`verify_standard`] where the sender offers both.
///
/// # Errors
/// [`VerifyError::MissingHeader`] when the header is empty, [`VerifyError::Mismatch`] when it
/// is not hex or does not match.
pub fn verify_x_signature(secret: &Secret, signature: &str, body: &[u8]) -> Result<(), VerifyError> {
    if signature.is_empty() {
        return Err(VerifyError::MissingHeader {
            name: header::X_SIGNATURE,
        });
    }
    let signature = hex::decode(signature).map_err(|_| VerifyError::Mismatch)?;
    x_signature_mac(secret, body)
        .verify_slice(&signature)
        .map_err(|_| VerifyError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sign::sign;

    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: i64 = 1_614_265_330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    /// The Standard Webhooks specification's signature of the values above.
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    /// `printf %s '{"test": 2432232314}' | openssl dgst -sha256 -hmac 'my-webhook-secret'`
    const PLAIN_X_SIGNATURE: &str = "e86c910c6879b1ee15c086a93015d7a0e5fc87165c793cdf30d83536e8c41264";

    fn secret(text: &str) -> Secret {
        Secret::new(text).expect("valid test secret")
    }

    fn spec_headers(signature: &str) -> StandardHeaders<'_> {
        StandardHeaders {
            id: SPEC_ID,
            timestamp: "1614265330",
            signature,
        }
    }

    fn verify_spec(headers: &StandardHeaders<'_>, body: &[u8], now: i64) -> Result<(), VerifyError> {
        verify_standard(&secret(SPEC_SECRET), headers, body, now, DEFAULT_TOLERANCE)
    }

    #[test]
    fn accepts_the_specification_example() {
        assert_eq!(
            verify_spec(&spec_headers(SPEC_SIGNATURE), SPEC_BODY, SPEC_TIMESTAMP),
            Ok(())
        );
    }

    #[test]
    fn accepts_what_sign_produces() {
        for text in [SPEC_SECRET, "my-webhook-secret"] {
            let signatures = sign(&secret(text), "evt_1", 1_700_000_000, b"{}");
            let headers = StandardHeaders {
                id: signatures.webhook_id(),
                timestamp: signatures.webhook_timestamp(),
                signature: signatures.webhook_signature(),
            };
            let result = verify_standard(&secret(text), &headers, b"{}", 1_700_000_000, DEFAULT_TOLERANCE);
            assert_eq!(result, Ok(()), "{text}");
            assert_eq!(
                verify_x_signature(&secret(text), signatures.x_signature(), b"{}"),
                Ok(())
            );
        }
    }

    #[test]
    fn refuses_a_tampered_body() {
        let result = verify_spec(
            &spec_headers(SPEC_SIGNATURE),
            br#"{"test": 2432232315}"#,
            SPEC_TIMESTAMP,
        );
        assert_eq!(result, Err(VerifyError::Mismatch));
    }

    #[test]
    fn refuses_a_tampered_timestamp() {
        let headers = StandardHeaders {
            timestamp: "1614265331",
            ..spec_headers(SPEC_SIGNATURE)
        };
        assert_eq!(
            verify_spec(&headers, SPEC_BODY, SPEC_TIMESTAMP),
            Err(VerifyError::Mismatch)
        );
        // The same number spelled differently is not what was signed either.
        let headers = StandardHeaders {
            timestamp: "01614265330",
            ..spec_headers(SPEC_SIGNATURE)
        };
        assert_eq!(
            verify_spec(&headers, SPEC_BODY, SPEC_TIMESTAMP),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn refuses_a_tampered_id() {
        let headers = StandardHeaders {
            id: "msg_p5jXN8AQM9LWM0D4loKWxJeK",
            ..spec_headers(SPEC_SIGNATURE)
        };
        assert_eq!(
            verify_spec(&headers, SPEC_BODY, SPEC_TIMESTAMP),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn refuses_another_secret() {
        let other = secret("whsec_aGVsbG8=");
        let result = verify_standard(
            &other,
            &spec_headers(SPEC_SIGNATURE),
            SPEC_BODY,
            SPEC_TIMESTAMP,
            DEFAULT_TOLERANCE,
        );
        assert_eq!(result, Err(VerifyError::Mismatch));
    }

    #[test]
    fn refuses_an_expired_timestamp() {
        let headers = spec_headers(SPEC_SIGNATURE);
        assert_eq!(verify_spec(&headers, SPEC_BODY, SPEC_TIMESTAMP + 300), Ok(()));
        assert_eq!(
            verify_spec(&headers, SPEC_BODY, SPEC_TIMESTAMP + 301),
            Err(VerifyError::TimestampTooOld {
                timestamp: SPEC_TIMESTAMP,
                now: SPEC_TIMESTAMP + 301
            })
        );
    }

    #[test]
    fn refuses_a_timestamp_from_the_future() {
        let headers = spec_headers(SPEC_SIGNATURE);
        assert_eq!(verify_spec(&headers, SPEC_BODY, SPEC_TIMESTAMP - 300), Ok(()));
        assert_eq!(
            verify_spec(&headers, SPEC_BODY, SPEC_TIMESTAMP - 301),
            Err(VerifyError::TimestampTooNew {
                timestamp: SPEC_TIMESTAMP,
                now: SPEC_TIMESTAMP - 301
            })
        );
    }

    #[test]
    fn tolerance_is_configurable_and_does_not_overflow() {
        let headers = spec_headers(SPEC_SIGNATURE);
        let strict = verify_standard(
            &secret(SPEC_SECRET),
            &headers,
            SPEC_BODY,
            SPEC_TIMESTAMP + 2,
            Duration::from_secs(1),
        );
        assert!(matches!(strict, Err(VerifyError::TimestampTooOld { .. })), "{strict:?}");
        for now in [i64::MIN, i64::MAX] {
            let result = verify_spec(&headers, SPEC_BODY, now);
            assert!(result.is_err(), "{now}: {result:?}");
            let result = verify_standard(&secret(SPEC_SECRET), &headers, SPEC_BODY, now, Duration::MAX);
            assert_eq!(result, Ok(()), "{now}");
        }
    }

    #[test]
    fn one_matching_signature_among_several_is_enough() {
        let wrong = "v1,prXh7jEBt8VS6eBd1DtwBWJGnsMlX+f+dYKIYckmglM=";
        for header in [
            format!("{wrong} {SPEC_SIGNATURE}"),
            format!("{SPEC_SIGNATURE} {wrong}"),
            format!("v1,not-base64! {SPEC_SIGNATURE}"),
            format!("v2,abc {SPEC_SIGNATURE} v1a,xyz"),
            format!("  {wrong}   {SPEC_SIGNATURE}  "),
        ] {
            assert_eq!(
                verify_spec(&spec_headers(&header), SPEC_BODY, SPEC_TIMESTAMP),
                Ok(()),
                "{header}"
            );
        }
        let none_match = format!("{wrong} v1,not-base64!");
        assert_eq!(
            verify_spec(&spec_headers(&none_match), SPEC_BODY, SPEC_TIMESTAMP),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn signatures_of_other_versions_do_not_count() {
        let header = "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE= v1a,abc";
        assert_eq!(
            verify_spec(&spec_headers(header), SPEC_BODY, SPEC_TIMESTAMP),
            Err(VerifyError::NoSignature)
        );
        // A bare signature without its version prefix is not accepted either.
        let bare = "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert_eq!(
            verify_spec(&spec_headers(bare), SPEC_BODY, SPEC_TIMESTAMP),
            Err(VerifyError::NoSignature)
        );
    }

    #[test]
    fn refuses_a_truncated_signature() {
        let truncated = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJE";
        assert_eq!(
            verify_spec(&spec_headers(truncated), SPEC_BODY, SPEC_TIMESTAMP),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn refuses_missing_headers_and_bad_timestamps() {
        let cases = [
            (
                StandardHeaders {
                    id: "",
                    ..spec_headers(SPEC_SIGNATURE)
                },
                VerifyError::MissingHeader { name: "webhook-id" },
            ),
            (
                StandardHeaders {
                    timestamp: "",
                    ..spec_headers(SPEC_SIGNATURE)
                },
                VerifyError::MissingHeader {
                    name: "webhook-timestamp",
                },
            ),
            (
                spec_headers(""),
                VerifyError::MissingHeader {
                    name: "webhook-signature",
                },
            ),
            (
                StandardHeaders {
                    timestamp: "1614265330.5",
                    ..spec_headers(SPEC_SIGNATURE)
                },
                VerifyError::InvalidTimestamp,
            ),
            (
                StandardHeaders {
                    timestamp: "2021-02-25T15:02:10Z",
                    ..spec_headers(SPEC_SIGNATURE)
                },
                VerifyError::InvalidTimestamp,
            ),
        ];
        for (headers, expected) in cases {
            assert_eq!(
                verify_spec(&headers, SPEC_BODY, SPEC_TIMESTAMP),
                Err(expected),
                "{headers:?}"
            );
        }
    }

    #[test]
    fn x_signature_accepts_the_openssl_value() {
        let plain = secret("my-webhook-secret");
        assert_eq!(verify_x_signature(&plain, PLAIN_X_SIGNATURE, SPEC_BODY), Ok(()));
        let upper = PLAIN_X_SIGNATURE.to_ascii_uppercase();
        assert_eq!(verify_x_signature(&plain, &upper, SPEC_BODY), Ok(()));
    }

    #[test]
    fn x_signature_refuses_a_tampered_body_or_a_bad_header() {
        let plain = secret("my-webhook-secret");
        assert_eq!(
            verify_x_signature(&plain, PLAIN_X_SIGNATURE, br#"{"test": 2432232315}"#),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify_x_signature(&secret("another-secret"), PLAIN_X_SIGNATURE, SPEC_BODY),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify_x_signature(&plain, &PLAIN_X_SIGNATURE[..62], SPEC_BODY),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify_x_signature(&plain, "sha256=e86c910c", SPEC_BODY),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify_x_signature(&plain, "", SPEC_BODY),
            Err(VerifyError::MissingHeader { name: "X-Signature" })
        );
    }
}
