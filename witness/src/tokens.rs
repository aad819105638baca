//! Per-cluster bearer tokens: the tokens file and constant-time checks.
//!
//! The file holds one `CLUSTER_NAME TOKEN` pair per line; blank lines and lines starting with
//! `#` are ignored. Any other line that is not exactly such a pair refuses the whole file, with
//! the line named: a witness that silently skipped a cluster would leave that cluster's rooms
//! without arbitration.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;
use subtle::ConstantTimeEq;

/// The shortest token accepted: 16 characters (for example `openssl rand -hex 16` gives 32).
pub const MIN_TOKEN_LEN: usize = 16;

/// Cluster names as they appear in the URL (the rule the agent and the controller share).
pub use node_health::witness::valid_cluster_name as valid_cluster;

/// Every cluster this witness serves, with its bearer token.
#[derive(Clone)]
pub struct Tokens {
    by_cluster: BTreeMap<String, Vec<u8>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a token.
        f.debug_struct("Tokens")
            .field("clusters", &self.by_cluster.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Tokens {
    /// Reads and checks the tokens file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::TokensRead {
            path: path.to_path_buf(),
            source,
        })?;
        let tokens = Self::parse(&text).map_err(|(line, reason)| Error::TokensLine {
            path: path.to_path_buf(),
            line,
            reason,
        })?;
        if tokens.by_cluster.is_empty() {
            return Err(Error::TokensEmpty(path.to_path_buf()));
        }
        warn_if_readable_by_others(path);
        Ok(tokens)
    }

    /// Parses the file's text; an error names the (1-based) line and what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut by_cluster = BTreeMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = trimmed.split_whitespace().collect();
            let [cluster, token] = fields[..] else {
                return Err((
                    line,
                    format!(
                        "expected `CLUSTER_NAME TOKEN`, found {} field(s)",
                        fields.len()
                    ),
                ));
            };
            if !valid_cluster(cluster) {
                return Err((
                    line,
                    format!(
                        "cluster name {cluster:?} must be 1 to 128 characters of [A-Za-z0-9._-], not . or .."
                    ),
                ));
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err((
                    line,
                    format!(
                        "the token of cluster {cluster:?} is shorter than {MIN_TOKEN_LEN} characters"
                    ),
                ));
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err((
                    line,
                    format!("the token of cluster {cluster:?} must be printable ASCII"),
                ));
            }
            if by_cluster
                .insert(cluster.to_string(), token.as_bytes().to_vec())
                .is_some()
            {
                return Err((line, format!("cluster {cluster:?} is listed twice")));
            }
        }
        Ok(Tokens { by_cluster })
    }

    pub fn clusters(&self) -> impl Iterator<Item = &str> {
        self.by_cluster.keys().map(String::as_str)
    }

    /// Whether `presented` is `cluster`'s token. Compared in constant time; an unknown cluster
    /// costs a comparison too and fails like a wrong token.
    pub fn check(&self, cluster: &str, presented: &[u8]) -> bool {
        match self.by_cluster.get(cluster) {
            Some(token) => bool::from(token.as_slice().ct_eq(presented)),
            None => {
                let _ = presented.ct_eq(presented);
                false
            }
        }
    }

    /// Whether `presented` is any cluster's token (every token is compared, no early exit).
    pub fn check_any(&self, presented: &[u8]) -> bool {
        self.by_cluster
            .values()
            .fold(subtle::Choice::from(0), |acc, token| {
                acc | token.as_slice().ct_eq(presented)
            })
            .into()
    }
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o004 != 0
    {
        tracing::warn!(path = %path.display(), "the tokens file is readable by every user");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_comments_and_blank_lines() {
        let t = Tokens::parse(
            "# site tokens\n\nfactory  0123456789abcdef\n  # x\nhospital\tfedcba9876543210fe\n",
        )
        .expect("valid");
        assert_eq!(t.clusters().collect::<Vec<_>>(), ["factory", "hospital"]);
        assert!(t.check("factory", b"0123456789abcdef"));
        assert!(!t.check("factory", b"0123456789abcdeF"));
        assert!(!t.check("factory", b"fedcba9876543210fe"));
        assert!(!t.check("nowhere", b"0123456789abcdef"));
        assert!(t.check_any(b"fedcba9876543210fe"));
        assert!(!t.check_any(b"nope"));
    }

    #[test]
    fn malformed_lines_are_named() {
        let cases = [
            ("a 0123456789abcdef\nonlyone\n", 2, "found 1 field"),
            ("a 0123456789abcdef extra\n", 1, "found 3 field"),
            ("# c\n\nbad/name 0123456789abcdef\n", 3, "cluster name"),
            ("a short\n", 1, "shorter than 16"),
            (
                "a 0123456789abcdef\na 0123456789abcdef\n",
                2,
                "listed twice",
            ),
        ];
        for (text, line, what) in cases {
            let err = Tokens::parse(text).map(|_| ()).expect_err(text);
            assert_eq!(err.0, line, "{text:?}");
            assert!(err.1.contains(what), "{text:?}: {}", err.1);
        }
    }

    #[test]
    fn debug_never_shows_a_token() {
        let t = Tokens::parse("a 0123456789abcdef\n").expect("valid");
        assert!(!format!("{t:?}").contains("0123456789abcdef"));
    }
}
