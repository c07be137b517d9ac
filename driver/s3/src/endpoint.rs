//! Where and as whom to reach S3, read from a CSI request's secrets. The secret key never
//! reaches a log: `Debug` prints it redacted, and messages name only which key is missing.

use std::collections::HashMap;
use std::fmt;

use ferrovol_core::error::{Error, Result};
use ferrovol_core::ids::printable;

/// The secret keys this driver reads, with what they mean (docs/S3.md lists the same).
pub const SECRET_KEYS: &[(&str, &str)] = &[
    ("accessKeyID", "the access key ID (required)"),
    ("secretAccessKey", "the secret access key (required)"),
    ("endpoint", "the S3 endpoint URL, e.g. https://s3.example.com:9000 (required)"),
    ("region", "the region to sign requests for (default us-east-1)"),
    ("pathStyle", "`true` (the default) for path-style addressing, `false` for virtual-hosted style"),
];

/// The region requests are signed for when the secret names none.
pub const DEFAULT_REGION: &str = "us-east-1";

/// An S3 endpoint with the credentials to use it.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct S3Endpoint {
    /// `http://` or `https://` URL of the server.
    pub endpoint: String,
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`) instead of `bucket.endpoint/key`.
    pub path_style: bool,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl fmt::Debug for S3Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Endpoint")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

impl S3Endpoint {
    /// Reads the endpoint from CSI secrets. `field` names the request field in messages
    /// (`secrets`); a missing or malformed key is INVALID_ARGUMENT naming the key, never
    /// its value.
    pub fn from_secrets(field: &'static str, secrets: &HashMap<String, String>) -> Result<Self> {
        let get = |k: &str| secrets.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let missing: Vec<&str> =
            ["accessKeyID", "secretAccessKey", "endpoint"].into_iter().filter(|k| get(k).is_none()).collect();
        if !missing.is_empty() {
            return Err(Error::invalid(
                field,
                format!(
                    "the S3 secret lacks {} (an s3 volume needs accessKeyID, secretAccessKey and endpoint)",
                    missing.join(", ")
                ),
            ));
        }
        let endpoint = get("endpoint").unwrap_or_default().trim_end_matches('/').to_owned();
        let scheme_ok = endpoint.starts_with("http://") || endpoint.starts_with("https://");
        let host = endpoint.split_once("://").map(|(_, h)| h).unwrap_or_default();
        if !scheme_ok
            || host.is_empty()
            || host.contains(['/', '?', '#', ' ', '@'])
            || endpoint.chars().any(char::is_control)
        {
            return Err(Error::invalid(
                field,
                format!(
                    "the S3 secret's endpoint {:?} is not an http:// or https:// URL of a host (and port)",
                    printable(&endpoint)
                ),
            ));
        }
        let region = get("region").unwrap_or(DEFAULT_REGION).to_owned();
        if !region.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') || region.len() > 64 {
            return Err(Error::invalid(
                field,
                format!("the S3 secret's region {:?} is not a region name", printable(&region)),
            ));
        }
        let path_style = match get("pathStyle") {
            None | Some("true") => true,
            Some("false") => false,
            Some(other) => {
                return Err(Error::invalid(
                    field,
                    format!("the S3 secret's pathStyle {:?} is neither true nor false", printable(other)),
                ))
            }
        };
        for k in secrets.keys() {
            if !SECRET_KEYS.iter().any(|(known, _)| known == k) {
                tracing::debug!(key = %printable(k), "ignoring an unknown key of the S3 secret");
            }
        }
        Ok(S3Endpoint {
            endpoint,
            region,
            path_style,
            access_key_id: get("accessKeyID").unwrap_or_default().to_owned(),
            secret_access_key: get("secretAccessKey").unwrap_or_default().to_owned(),
        })
    }

    /// The endpoint and access key, without the secret: what a message may say.
    pub fn describe(&self) -> String {
        format!("{} as {}", self.endpoint, self.access_key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrovol_core::error::Code;

    fn secrets(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn complete_secrets_parse_with_defaults() {
        let e = S3Endpoint::from_secrets(
            "secrets",
            &secrets(&[("accessKeyID", "AK"), ("secretAccessKey", "SEKRIT"), ("endpoint", "http://127.0.0.1:9000/")]),
        )
        .expect("parse");
        assert_eq!(e.endpoint, "http://127.0.0.1:9000");
        assert_eq!(e.region, DEFAULT_REGION);
        assert!(e.path_style);
        assert!(!format!("{e:?}").contains("SEKRIT"));
    }

    #[test]
    fn missing_keys_are_named_and_values_never_shown() {
        let err = S3Endpoint::from_secrets("secrets", &secrets(&[("secretAccessKey", "SEKRIT")])).expect_err("missing");
        assert_eq!(err.code(), Code::InvalidArgument);
        let msg = err.to_string();
        assert!(msg.contains("accessKeyID") && msg.contains("endpoint"), "{msg}");
        assert!(!msg.contains("SEKRIT"), "{msg}");
    }

    #[test]
    fn malformed_values_are_refused() {
        let base = [("accessKeyID", "AK"), ("secretAccessKey", "S")];
        for (k, v) in
            [("endpoint", "ftp://x"), ("endpoint", "http://"), ("endpoint", "http://a/b"), ("endpoint", "http://u@h")]
        {
            let mut s = secrets(&base);
            s.insert(k.into(), v.into());
            assert_eq!(S3Endpoint::from_secrets("secrets", &s).expect_err(v).code(), Code::InvalidArgument, "{v}");
        }
        let mut s = secrets(&base);
        s.insert("endpoint".into(), "http://h:1".into());
        s.insert("pathStyle".into(), "yes".into());
        assert_eq!(S3Endpoint::from_secrets("secrets", &s).expect_err("pathStyle").code(), Code::InvalidArgument);
    }
}
