//! The witness flags both binaries take: `--witness-url`, `--witness-token-file`,
//! `--witness-ca-file` and `--cluster-name`, flattened into `twosite-agent`'s flags and into
//! `twosite controller`'s. One place checks that they go together, reads the token and names
//! the flag at fault in every error.
//!
//! It sits next to the witness client, behind the `agent` feature, because the controller uses
//! that client too (and so has the feature on).

use super::witness_client::{WitnessClient, WitnessError, read_token_file};
use std::path::PathBuf;
use thiserror::Error;

/// How to reach the witness.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct WitnessFlags {
    /// The witness's base URL (https://host:port, or http:// behind a trusted tunnel). Without
    /// it no witness is used. Needs --cluster-name and --witness-token-file.
    #[arg(long)]
    pub witness_url: Option<String>,

    /// File holding this cluster's bearer token at the witness (a mounted Secret; required with
    /// --witness-url).
    #[arg(long)]
    pub witness_token_file: Option<PathBuf>,

    /// PEM file of the CA certificates that sign the witness's certificate (a private CA)
    /// [default: the system's trusted roots].
    #[arg(long)]
    pub witness_ca_file: Option<PathBuf>,

    /// This cluster's name at the witness (required with --witness-url).
    #[arg(long, env = "CLUSTER_NAME")]
    pub cluster_name: Option<String>,
}

/// The witness flags, checked, with the token read.
#[derive(Clone)]
pub struct WitnessSettings {
    /// The base URL, trimmed, without a trailing `/`.
    pub url: String,
    pub cluster: String,
    pub token: String,
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for WitnessSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("WitnessSettings")
            .field("url", &self.url)
            .field("cluster", &self.cluster)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

/// A witness flag that is missing, does not go with the others, or is unusable: a usage error.
#[derive(Debug, Error)]
pub enum WitnessFlagError {
    /// `what` completes a sentence about `flag` ("needs --witness-url").
    #[error("{flag} {what}")]
    Refused { flag: &'static str, what: String },

    /// What `flag` names cannot be used (an unreadable token file, a bad URL or CA file).
    #[error("{flag}")]
    Unusable {
        flag: &'static str,
        #[source]
        source: WitnessError,
    },
}

impl WitnessFlagError {
    /// A [`WitnessFlagError::Refused`].
    pub fn refused(flag: &'static str, what: impl Into<String>) -> Self {
        WitnessFlagError::Refused {
            flag,
            what: what.into(),
        }
    }

    /// The flag at fault.
    pub fn flag(&self) -> &'static str {
        match self {
            WitnessFlagError::Refused { flag, .. } | WitnessFlagError::Unusable { flag, .. } => {
                flag
            }
        }
    }
}

impl WitnessFlags {
    /// The witness settings, `None` without `--witness-url`. The token file is read now, so a
    /// missing or empty one is a usage error rather than a witness that never answers.
    pub fn check(&self) -> Result<Option<WitnessSettings>, WitnessFlagError> {
        let Some(url) = self.witness_url.as_deref().map(str::trim) else {
            for (given, flag) in [
                (self.witness_token_file.is_some(), "--witness-token-file"),
                (self.witness_ca_file.is_some(), "--witness-ca-file"),
            ] {
                if given {
                    return Err(WitnessFlagError::refused(flag, "needs --witness-url"));
                }
            }
            return Ok(None);
        };
        if url.is_empty() {
            return Err(WitnessFlagError::refused("--witness-url", "is empty"));
        }
        let cluster = self
            .cluster_name
            .as_deref()
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                WitnessFlagError::refused(
                    "--cluster-name",
                    "is required with --witness-url (or set CLUSTER_NAME): this cluster's name \
                     at the witness",
                )
            })?;
        let token_file = self.witness_token_file.as_deref().ok_or_else(|| {
            WitnessFlagError::refused(
                "--witness-token-file",
                "is required with --witness-url: the witness only answers with this cluster's \
                 token",
            )
        })?;
        let token = read_token_file(token_file).map_err(|source| WitnessFlagError::Unusable {
            flag: "--witness-token-file",
            source,
        })?;
        let https = url_scheme_is_https(url)?;
        if !crate::witness::valid_cluster_name(cluster) {
            return Err(WitnessFlagError::refused(
                "--cluster-name",
                format!("{cluster:?} must be 1 to 128 characters of [A-Za-z0-9._-], not . or .."),
            ));
        }
        if self.witness_ca_file.is_some() && !https {
            return Err(WitnessFlagError::refused(
                "--witness-ca-file",
                "needs an https:// --witness-url",
            ));
        }
        Ok(Some(WitnessSettings {
            url: url.trim_end_matches('/').to_string(),
            cluster: cluster.to_string(),
            token,
            ca_file: self.witness_ca_file.clone(),
        }))
    }
}

/// Whether the witness URL is https (else http); any other scheme, or no host, is refused. A
/// path is allowed: the witness may sit behind a reverse proxy under a prefix.
fn url_scheme_is_https(url: &str) -> Result<bool, WitnessFlagError> {
    let refused = |what: String| WitnessFlagError::refused("--witness-url", what);
    let uri: http::Uri = url
        .parse()
        .map_err(|e| refused(format!("{url:?} is not a URL: {e}")))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(refused(format!(
                "{url:?} must start with https:// or http://"
            )));
        }
    };
    if uri.host().is_none_or(str::is_empty) {
        return Err(refused(format!("{url:?} has no host")));
    }
    Ok(https)
}

impl WitnessSettings {
    /// A client of the witness (the CA file is read now); an error names the flag at fault.
    pub fn client(&self) -> Result<WitnessClient, WitnessFlagError> {
        WitnessClient::new(
            &self.url,
            &self.cluster,
            &self.token,
            self.ca_file.as_deref(),
        )
        .map_err(|source| WitnessFlagError::Unusable {
            flag: flag_of(&source),
            source,
        })
    }
}

/// The flag whose value a client set-up error is about.
fn flag_of(err: &WitnessError) -> &'static str {
    match err {
        WitnessError::BadCluster(_) => "--cluster-name",
        WitnessError::CaFile { .. } | WitnessError::BadCa { .. } => "--witness-ca-file",
        WitnessError::TokenFile { .. } | WitnessError::BadToken { .. } => "--witness-token-file",
        _ => "--witness-url",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report;

    fn flags(url: Option<&str>, token_file: Option<&std::path::Path>) -> WitnessFlags {
        WitnessFlags {
            witness_url: url.map(str::to_string),
            witness_token_file: token_file.map(std::path::Path::to_path_buf),
            witness_ca_file: None,
            cluster_name: Some(" prod ".into()),
        }
    }

    #[test]
    fn checks_name_the_flag_and_read_the_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, " s3cret\n").expect("write");

        assert!(flags(None, None).check().expect("no witness").is_none());
        let err = flags(None, Some(&token)).check().expect_err("no url");
        assert_eq!(err.to_string(), "--witness-token-file needs --witness-url");
        let err = flags(Some(" "), Some(&token)).check().expect_err("empty");
        assert_eq!(err.flag(), "--witness-url");
        let err = flags(Some("https://w"), None)
            .check()
            .expect_err("no token");
        assert_eq!(err.flag(), "--witness-token-file");
        let mut no_cluster = flags(Some("https://w"), Some(&token));
        no_cluster.cluster_name = Some("  ".into());
        let err = no_cluster.check().expect_err("no cluster");
        assert_eq!(err.flag(), "--cluster-name");

        let missing = dir.path().join("missing");
        let err = flags(Some("https://w"), Some(&missing))
            .check()
            .expect_err("unreadable");
        assert_eq!(err.flag(), "--witness-token-file");
        assert!(report(&err).contains(&*missing.to_string_lossy()), "{err}");

        let settings = flags(Some(" https://w:8443/ "), Some(&token))
            .check()
            .expect("valid")
            .expect("a witness");
        assert_eq!(settings.url, "https://w:8443");
        assert_eq!(settings.cluster, "prod");
        assert_eq!(settings.token, "s3cret");
        assert!(!format!("{settings:?}").contains("s3cret"));
    }

    #[test]
    fn client_errors_name_the_flag() {
        let settings = |url: &str, cluster: &str, ca: Option<&str>| WitnessSettings {
            url: url.into(),
            cluster: cluster.into(),
            token: "s3cret".into(),
            ca_file: ca.map(PathBuf::from),
        };
        let flag = |s: WitnessSettings| s.client().map(|_| ()).expect_err("refused").flag();
        assert_eq!(flag(settings("w:8443", "prod", None)), "--witness-url");
        assert_eq!(flag(settings("http://w", "a/b", None)), "--cluster-name");
        assert_eq!(
            flag(settings("https://w", "prod", Some("/nonexistent/ca.crt"))),
            "--witness-ca-file"
        );
        assert!(settings("http://w:8080", "prod", None).client().is_ok());
    }
}
