//! Signing a request batchd sends (a webhook delivery, a push to a worker) with both schemes at
//! once: Standard Webhooks, which current receivers and their libraries verify, and the older
//! `X-Signature` (a hex HMAC of the raw body), which seed clients already check.

use base64::Engine as _;
use base64::prelude::BASE64_STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::header;
use crate::secret::Secret;

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// An HMAC-SHA256 keyed with the secret, before any data.
fn keyed(secret: &Secret) -> HmacSha256 {
    HmacSha256::new_from_slice(secret.key()).expect("HMAC takes a key of any length")
}

/// The Standard Webhooks MAC over `{id}.{timestamp}.{body}`, not yet finalized. `timestamp` is
/// the header's text: what was signed is exactly what was sent.
pub(crate) fn standard_mac(secret: &Secret, webhook_id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
    let mut mac = keyed(secret);
    mac.update(webhook_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `X-Signature` MAC over the raw body, not yet finalized.
pub(crate) fn x_signature_mac(secret: &Secret, body: &[u8]) -> HmacSha256 {
    let mut mac = keyed(secret);
    mac.update(body);
    mac
}

/// Signs a request body.
///
/// `webhook_id` identifies the message and must stay the same across retries, so a receiver
/// can drop duplicates; `timestamp` is the send time in Unix seconds (re-sign on each retry, or
/// a receiver refuses the retry as too old). With a `whsec_` secret both signatures use the
/// decoded key.
pub fn sign(secret: &Secret, webhook_id: &str, timestamp: i64, body: &[u8]) -> Signatures {
    let timestamp_text = timestamp.to_string();
    let standard = standard_mac(secret, webhook_id, &timestamp_text, body).finalize();
    let x_signature = x_signature_mac(secret, body).finalize();
    Signatures {
        webhook_id: webhook_id.to_owned(),
        webhook_timestamp: timestamp_text,
        webhook_signature: format!("v1,{}", BASE64_STANDARD.encode(standard.into_bytes())),
        x_signature: hex::encode(x_signature.into_bytes()),
    }
}

/// The header values that sign one request; see [`sign`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signatures {
    webhook_id: String,
    webhook_timestamp: String,
    webhook_signature: String,
    x_signature: String,
}

impl Signatures {
    /// The `webhook-id` value: the message id as given.
    pub fn webhook_id(&self) -> &str {
        &self.webhook_id
    }

    /// The `webhook-timestamp` value: Unix seconds in decimal.
    pub fn webhook_timestamp(&self) -> &str {
        &self.webhook_timestamp
    }

    /// The `webhook-signature` value: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
    pub fn webhook_signature(&self) -> &str {
        &self.webhook_signature
    }

    /// The `X-Signature` value: the lowercase hex HMAC-SHA256 of the body.
    pub fn x_signature(&self) -> &str {
        &self.x_signature
    }

    /// Every header to set on the request, as (name, value).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        vec![
            (header::WEBHOOK_ID, self.webhook_id.clone()),
            (header::WEBHOOK_TIMESTAMP, self.webhook_timestamp.clone()),
            (header::WEBHOOK_SIGNATURE, self.webhook_signature.clone()),
            (header::X_SIGNATURE, self.x_signature.clone()),
        ]
    }
}

#[cfg(test)]
mod tests {
    //! Expected values come from outside this crate: the Standard Webhooks specification's
    //! published example, and `openssl dgst` for the rest (each command is beside its value).

    use super::*;

    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: i64 = 1_614_265_330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;

    fn secret(text: &str) -> Secret {
        Secret::new(text).expect("valid test secret")
    }

    #[test]
    fn standard_signature_matches_the_specification_example() {
        let signatures = sign(&secret(SPEC_SECRET), SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY);
        assert_eq!(
            signatures.webhook_signature(),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert_eq!(signatures.webhook_id(), SPEC_ID);
        assert_eq!(signatures.webhook_timestamp(), "1614265330");
    }

    #[test]
    fn standard_signature_with_a_plain_secret_uses_its_bytes() {
        // printf %s 'msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330.{"test": 2432232314}' \
        //   | openssl dgst -sha256 -hmac 'my-webhook-secret' -binary | base64
        let signatures = sign(&secret("my-webhook-secret"), SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY);
        assert_eq!(
            signatures.webhook_signature(),
            "v1,prXh7jEBt8VS6eBd1DtwBWJGnsMlX+f+dYKIYckmglM="
        );
    }

    #[test]
    fn x_signature_is_the_hex_hmac_of_the_body() {
        // printf %s '{"test": 2432232314}' | openssl dgst -sha256 -hmac 'my-webhook-secret'
        let signatures = sign(&secret("my-webhook-secret"), SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY);
        assert_eq!(
            signatures.x_signature(),
            "e86c910c6879b1ee15c086a93015d7a0e5fc87165c793cdf30d83536e8c41264"
        );
    }

    #[test]
    fn x_signature_with_a_whsec_secret_uses_the_decoded_key() {
        // printf %s '{"test": 2432232314}' | openssl dgst -sha256 -mac HMAC \
        //   -macopt hexkey:31f290f6bf06298aab4f08d43c3f082cf648a362da2da4b0
        let signatures = sign(&secret(SPEC_SECRET), SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY);
        assert_eq!(
            signatures.x_signature(),
            "e2cb4f5251572539d458bfb8a7adb533b08801e6a794467e06f771debbb0818b"
        );
    }

    #[test]
    fn x_signature_does_not_depend_on_id_or_timestamp() {
        // printf %s '{"type":"item.completed","id":"evt_01"}' | openssl dgst -sha256 -hmac 'my-webhook-secret'
        let body = br#"{"type":"item.completed","id":"evt_01"}"#;
        let first = sign(&secret("my-webhook-secret"), "evt_01", 1, body);
        let second = sign(&secret("my-webhook-secret"), "evt_02", 2, body);
        let expected = "ed0aa8549aec31a8741fc57cbb61cb814a1802667dd2f0327a1b561992c9cb23";
        assert_eq!(first.x_signature(), expected);
        assert_eq!(second.x_signature(), expected);
        assert_ne!(first.webhook_signature(), second.webhook_signature());
    }

    #[test]
    fn headers_carry_every_value_under_its_exact_name() {
        let signatures = sign(&secret(SPEC_SECRET), SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY);
        assert_eq!(
            signatures.headers(),
            vec![
                ("webhook-id", SPEC_ID.to_owned()),
                ("webhook-timestamp", "1614265330".to_owned()),
                (
                    "webhook-signature",
                    "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".to_owned()
                ),
                (
                    "X-Signature",
                    "e2cb4f5251572539d458bfb8a7adb533b08801e6a794467e06f771debbb0818b".to_owned()
                ),
            ]
        );
    }
}
