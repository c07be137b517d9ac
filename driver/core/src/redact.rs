//! Redaction for logs: requests are never logged with their derived `Debug` (prost prints
//! `secrets` maps in full); adapters log chosen fields, and any map that may hold secrets
//! goes through [`SecretKeys`], which shows the keys and never the values.

use std::collections::HashMap;
use std::fmt;

/// Displays a secrets map as its sorted key names only, e.g. `{accessKeyID: ***}`.
#[derive(Debug, Clone, Copy)]
pub struct SecretKeys<'a>(pub &'a HashMap<String, String>);

impl fmt::Display for SecretKeys<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<&str> = self.0.keys().map(String::as_str).collect();
        keys.sort_unstable();
        f.write_str("{")?;
        for (i, k) in keys.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{k}: ***")?;
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_keys_never_values() {
        let m = HashMap::from([("b".to_string(), "hunter2".to_string()), ("a".to_string(), "x".to_string())]);
        let s = SecretKeys(&m).to_string();
        assert_eq!(s, "{a: ***, b: ***}");
        assert!(!s.contains("hunter2"));
    }
}
