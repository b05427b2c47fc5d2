//! Code batchd did not write checks what batchd-webhook signs: the Standard Webhooks reference
//! library for Python verifies `webhook-signature`, and Python's own `hmac` module recomputes
//! `X-Signature`. Needs `python3` with `pip install standardwebhooks`; without it the tests are
//! skipped with a note, unless `CI` is set, where they fail.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use batchd_webhook::{Secret, Signatures, sign};

const INSTALL_HINT: &str = "python3 -m pip install standardwebhooks";

/// Reads the secret, the body and the headers from the environment, and prints one
/// `<scheme>=ok` or `<scheme>=rejected: <why>` line per scheme. The `standardwebhooks` package
/// reads every string secret as base64, so a secret without the `whsec_` prefix goes to it as
/// bytes: that is how a Python receiver of batchd's webhooks must construct it too.
const VERIFY_PY: &str = r#"
import base64, hashlib, hmac, os
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

secret = os.environ["BATCHD_TEST_SECRET"]
body = os.environ["BATCHD_TEST_BODY"].encode("utf-8")
headers = dict(line.split(": ", 1) for line in os.environ["BATCHD_TEST_HEADERS"].splitlines())

if secret.startswith("whsec_"):
    webhook = Webhook(secret)
    key = base64.b64decode(secret[len("whsec_"):])
else:
    webhook = Webhook(secret.encode("utf-8"))
    key = secret.encode("utf-8")

try:
    webhook.verify(body, headers)
    print("standard=ok")
except WebhookVerificationError as error:
    print(f"standard=rejected: {error}")

expected = hmac.new(key, body, hashlib.sha256).hexdigest()
if hmac.compare_digest(expected, headers["X-Signature"]):
    print("x_signature=ok")
else:
    print("x_signature=rejected")
"#;

/// Whether `standardwebhooks` can be imported; panics under CI when it cannot.
fn python_library_available() -> bool {
    let probe = Command::new("python3")
        .args(["-c", "import standardwebhooks.webhooks"])
        .output();
    let why = match probe {
        Ok(output) if output.status.success() => return true,
        // The last line of a traceback is the error itself.
        Ok(output) => String::from_utf8_lossy(&output.stderr)
            .lines()
            .last()
            .unwrap_or("python3 failed")
            .to_owned(),
        Err(error) => format!("cannot run python3: {error}"),
    };
    assert!(
        std::env::var_os("CI").is_none(),
        "the Python package `standardwebhooks` is needed for this test under CI ({why}); \
         install it with `{INSTALL_HINT}`"
    );
    eprintln!("note: skipping the standardwebhooks cross-check, `{INSTALL_HINT}` to run it ({why})");
    false
}

fn unix_now() -> i64 {
    let elapsed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    i64::try_from(elapsed.as_secs()).expect("the clock fits in i64 seconds")
}

/// Runs the Python verifier over what a receiver would get, and returns its report.
fn python_verdict(secret: &str, body: &str, signatures: &Signatures) -> String {
    let headers: Vec<String> = signatures
        .headers()
        .into_iter()
        .map(|(name, value)| format!("{name}: {value}"))
        .collect();
    let output = Command::new("python3")
        .args(["-c", VERIFY_PY])
        .env("BATCHD_TEST_SECRET", secret)
        .env("BATCHD_TEST_BODY", body)
        .env("BATCHD_TEST_HEADERS", headers.join("\n"))
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "the Python verifier failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("the verifier prints UTF-8")
}

fn signed(secret: &str, id: &str, timestamp: i64, body: &str) -> Signatures {
    let secret = Secret::new(secret).expect("valid test secret");
    sign(&secret, id, timestamp, body.as_bytes())
}

const WHSEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const PLAIN_SECRET: &str = "my-webhook-secret";
const BODY: &str = r#"{"type":"item.completed","id":"01JZ8Q3W6Y","batch_id":"batch_1","item_index":0,"custom_id":"café-42","status":"completed","result":{"text":"ok ✓"}}"#;

#[test]
fn python_accepts_a_whsec_signature() {
    if !python_library_available() {
        return;
    }
    let signatures = signed(WHSEC_SECRET, "01JZ8Q3W6Y", unix_now(), BODY);
    assert_eq!(
        python_verdict(WHSEC_SECRET, BODY, &signatures),
        "standard=ok\nx_signature=ok\n"
    );
}

#[test]
fn python_accepts_a_plain_secret_signature() {
    if !python_library_available() {
        return;
    }
    let signatures = signed(PLAIN_SECRET, "01JZ8Q3W6Y", unix_now(), BODY);
    assert_eq!(
        python_verdict(PLAIN_SECRET, BODY, &signatures),
        "standard=ok\nx_signature=ok\n"
    );
}

#[test]
fn python_rejects_a_tampered_body() {
    if !python_library_available() {
        return;
    }
    let tampered = BODY.replace("café-42", "café-43");
    for secret in [WHSEC_SECRET, PLAIN_SECRET] {
        let signatures = signed(secret, "01JZ8Q3W6Y", unix_now(), BODY);
        assert_eq!(
            python_verdict(secret, &tampered, &signatures),
            "standard=rejected: No matching signature found\nx_signature=rejected\n",
            "{secret}"
        );
    }
}

#[test]
fn python_rejects_an_old_timestamp() {
    if !python_library_available() {
        return;
    }
    let signatures = signed(WHSEC_SECRET, "01JZ8Q3W6Y", unix_now() - 600, BODY);
    assert_eq!(
        python_verdict(WHSEC_SECRET, BODY, &signatures),
        "standard=rejected: Message timestamp too old\nx_signature=ok\n"
    );
}
