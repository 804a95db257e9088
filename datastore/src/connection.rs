//! How every Tessera binary reaches etcd: one configuration with one set of names, read from
//! a file section (`datastore:`), then environment variables, then command-line flags, each
//! overriding the one before. The names are Calico's, so an operator's etcd settings carry
//! over:
//!
//! | file (`datastore:`) | environment          | flag                   |
//! |---------------------|----------------------|------------------------|
//! | `etcdEndpoints`     | `ETCD_ENDPOINTS`     | `--etcd-endpoints`     |
//! | `etcdCACertFile`    | `ETCD_CA_CERT_FILE`  | `--etcd-ca-cert-file`  |
//! | `etcdCertFile`      | `ETCD_CERT_FILE`     | `--etcd-cert-file`     |
//! | `etcdKeyFile`       | `ETCD_KEY_FILE`      | `--etcd-key-file`      |
//! | `etcdUsername`      | `ETCD_USERNAME`      | `--etcd-username`      |
//! | `etcdPassword`      | `ETCD_PASSWORD`      | (environment or file only) |
//! | `timeoutMs`         | `ETCD_TIMEOUT_MS`    | `--etcd-timeout-ms`    |
//!
//! Endpoints are comma separated in the environment and flags. `https://` endpoints use TLS,
//! verified against `etcdCACertFile`; a client certificate and key authenticate us.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::kv::{EtcdKv, KvError};

/// Requests to etcd give up after this long unless `timeoutMs` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatastoreConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub etcd_endpoints: Vec<String>,
    #[serde(
        default,
        rename = "etcdCACertFile",
        skip_serializing_if = "Option::is_none"
    )]
    pub etcd_ca_cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_key_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Debug output (and with it every log line that prints a configuration) never shows the
/// etcd password.
impl std::fmt::Debug for DatastoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatastoreConfig")
            .field("etcd_endpoints", &self.etcd_endpoints)
            .field("etcd_ca_cert_file", &self.etcd_ca_cert_file)
            .field("etcd_cert_file", &self.etcd_cert_file)
            .field("etcd_key_file", &self.etcd_key_file)
            .field("etcd_username", &self.etcd_username)
            .field(
                "etcd_password",
                &self.etcd_password.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error("no etcd endpoint: set etcdEndpoints, ETCD_ENDPOINTS or --etcd-endpoints")]
    NoEndpoints,
    #[error("{var}: {message}")]
    Env { var: &'static str, message: String },
    #[error("{field} {}: {source}", path.display())]
    File {
        field: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{field} {}: {reason}", path.display())]
    BadFile {
        field: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{0}")]
    Inconsistent(String),
    #[error("cannot reach etcd at {endpoints}: {reason}")]
    Unreachable { endpoints: String, reason: String },
    #[error("etcd at {endpoints} refused us: {reason}")]
    Refused { endpoints: String, reason: String },
}

impl DatastoreError {
    /// Worth retrying (etcd down or unreachable), as opposed to a configuration to fix.
    pub fn is_transient(&self) -> bool {
        matches!(self, DatastoreError::Unreachable { .. })
    }
}

/// The same settings as command-line flags, for the binaries' `clap` parsers.
#[cfg(feature = "cli")]
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DatastoreFlags {
    /// etcd endpoints, comma separated (overrides ETCD_ENDPOINTS and the file)
    #[arg(long = "etcd-endpoints", alias = "etcd", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// CA certificate (PEM) that signed etcd's server certificate
    #[arg(long = "etcd-ca-cert-file")]
    pub etcd_ca_cert_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate authentication
    #[arg(long = "etcd-cert-file")]
    pub etcd_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM)
    #[arg(long = "etcd-key-file")]
    pub etcd_key_file: Option<PathBuf>,
    /// etcd user (its password from ETCD_PASSWORD or the file: never on a command line)
    #[arg(long = "etcd-username")]
    pub etcd_username: Option<String>,
    /// Timeout of each etcd request, in milliseconds
    #[arg(long = "etcd-timeout-ms")]
    pub etcd_timeout_ms: Option<u64>,
}

#[cfg(feature = "cli")]
impl DatastoreFlags {
    /// The flags given, over `cfg`.
    pub fn apply(&self, cfg: &mut DatastoreConfig) {
        if !self.etcd_endpoints.is_empty() {
            cfg.etcd_endpoints = self.etcd_endpoints.clone();
        }
        let paths = [
            (&self.etcd_ca_cert_file, &mut cfg.etcd_ca_cert_file),
            (&self.etcd_cert_file, &mut cfg.etcd_cert_file),
            (&self.etcd_key_file, &mut cfg.etcd_key_file),
        ];
        for (flag, field) in paths {
            if flag.is_some() {
                field.clone_from(flag);
            }
        }
        if self.etcd_username.is_some() {
            cfg.etcd_username.clone_from(&self.etcd_username);
        }
        if self.etcd_timeout_ms.is_some() {
            cfg.timeout_ms = self.etcd_timeout_ms;
        }
    }
}

impl DatastoreConfig {
    /// The environment's settings over these (`env` looks a variable up: `std::env::var`
    /// in the binaries, a map in tests).
    pub fn apply_env(
        &mut self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(), DatastoreError> {
        let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        if let Some(v) = set("ETCD_ENDPOINTS") {
            self.etcd_endpoints = split_endpoints(&v);
        }
        for (var, field) in [
            ("ETCD_CA_CERT_FILE", &mut self.etcd_ca_cert_file),
            ("ETCD_CERT_FILE", &mut self.etcd_cert_file),
            ("ETCD_KEY_FILE", &mut self.etcd_key_file),
        ] {
            if let Some(v) = set(var) {
                *field = Some(PathBuf::from(v));
            }
        }
        if let Some(v) = set("ETCD_USERNAME") {
            self.etcd_username = Some(v);
        }
        if let Some(v) = env("ETCD_PASSWORD") {
            self.etcd_password = Some(v);
        }
        if let Some(v) = set("ETCD_TIMEOUT_MS") {
            self.timeout_ms = Some(v.trim().parse().map_err(|_| DatastoreError::Env {
                var: "ETCD_TIMEOUT_MS",
                message: format!("{v:?} is not a number of milliseconds"),
            })?);
        }
        Ok(())
    }

    /// [`DatastoreConfig::apply_env`] with the process environment.
    pub fn apply_process_env(&mut self) -> Result<(), DatastoreError> {
        self.apply_env(|k| std::env::var(k).ok())
    }

    pub fn timeout(&self) -> Duration {
        self.timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_TIMEOUT)
    }

    /// Whether the settings make sense together, without touching files or the network.
    pub fn validate(&self) -> Result<(), DatastoreError> {
        if self.etcd_endpoints.is_empty() {
            return Err(DatastoreError::NoEndpoints);
        }
        if self.etcd_cert_file.is_some() != self.etcd_key_file.is_some() {
            return Err(DatastoreError::Inconsistent(
                "etcdCertFile and etcdKeyFile go together: a client certificate needs its key"
                    .into(),
            ));
        }
        if self.etcd_password.is_some() && self.etcd_username.is_none() {
            return Err(DatastoreError::Inconsistent(
                "etcdPassword without etcdUsername".into(),
            ));
        }
        let tls = self.etcd_ca_cert_file.is_some() || self.etcd_cert_file.is_some();
        for e in &self.etcd_endpoints {
            match e.split_once("://") {
                Some(("https", _)) if !tls => {
                    return Err(DatastoreError::Inconsistent(format!(
                        "endpoint {e} is https but no etcdCACertFile is set to verify it"
                    )))
                }
                Some(("http", _)) if tls => {
                    return Err(DatastoreError::Inconsistent(format!(
                        "endpoint {e} is plain http while TLS files are set: use https://"
                    )))
                }
                Some(("http" | "https", _)) => {}
                _ => {
                    return Err(DatastoreError::Inconsistent(format!(
                        "endpoint {e:?} is not http://HOST:PORT or https://HOST:PORT"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Connects and makes one request, so that a wrong certificate, a refused login or an
    /// unreachable etcd is an error here, naming the cause, rather than on first use.
    pub async fn connect(&self) -> Result<EtcdKv, DatastoreError> {
        let kv = self.connect_unprobed().await?;
        // The cheapest request that proves the TLS handshake, the login and the permission
        // to read Tessera's prefix.
        kv.probe(crate::keys::PREFIX)
            .await
            .map_err(|e| self.classify(&self.etcd_endpoints.join(","), e))?;
        Ok(kv)
    }

    /// [`DatastoreConfig::connect`] without its request: for a client that makes one at
    /// once and, when it fails, calls `connect` to say why (the CNI plugin, for which the
    /// probe was a third of its requests).
    pub async fn connect_unprobed(&self) -> Result<EtcdKv, DatastoreError> {
        self.validate()?;
        let timeout = self.timeout();
        let mut opts = etcd_client::ConnectOptions::new()
            .with_timeout(timeout)
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(5), timeout);
        if let (Some(user), Some(password)) = (&self.etcd_username, &self.etcd_password) {
            opts = opts.with_user(user.clone(), password.clone());
        }
        if let Some(tls) = self.tls()? {
            opts = opts.with_tls(tls);
        }
        let endpoints = self.etcd_endpoints.join(",");
        EtcdKv::connect_with(&self.etcd_endpoints, opts)
            .await
            .map_err(|e| self.classify(&endpoints, e))
    }

    fn tls(&self) -> Result<Option<etcd_client::TlsOptions>, DatastoreError> {
        if self.etcd_ca_cert_file.is_none() && self.etcd_cert_file.is_none() {
            return Ok(None);
        }
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &self.etcd_ca_cert_file {
            let pem = read_pem("etcdCACertFile", ca, "CERTIFICATE")?;
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
        }
        if let (Some(cert), Some(key)) = (&self.etcd_cert_file, &self.etcd_key_file) {
            let cert = read_pem("etcdCertFile", cert, "CERTIFICATE")?;
            let key = read_pem("etcdKeyFile", key, "PRIVATE KEY")?;
            tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
        }
        Ok(Some(tls))
    }

    /// An error from etcd-client, said in terms of this configuration.
    fn classify(&self, endpoints: &str, e: KvError) -> DatastoreError {
        let reason = e.to_string();
        let tls = self.etcd_ca_cert_file.is_some() || self.etcd_cert_file.is_some();
        let lower = reason.to_lowercase();
        let refused = [
            "certificate",
            "handshake",
            "tls",
            "authentication",
            "permission denied",
            "unauthenticated",
            "invalid auth",
        ]
        .iter()
        .any(|w| lower.contains(w));
        // Our certificate rejected (or missing): a TLS alert, or, since TLS 1.3 finishes the
        // client's side of the handshake before the server checks our certificate, the
        // connection closing, reset or broken at the first request. (etcd down is a refused
        // TCP connection instead.)
        let dropped = [
            "connection closed",
            "broken pipe",
            "connection reset",
            "unexpected eof",
            "early eof",
        ]
        .iter()
        .any(|w| lower.contains(w))
            || (lower.contains("transport error")
                && !lower.contains("tcp connect error")
                && !lower.contains("timed out"));
        let ours_rejected =
            tls && ((lower.contains("alert") && lower.contains("certificate")) || dropped);
        if ours_rejected {
            let why = if self.etcd_cert_file.is_some() {
                "etcd did not accept our client certificate (check etcdCertFile and etcdKeyFile: \
                 signed by the CA etcd trusts?)"
            } else {
                "etcd ended the TLS connection: it wants a client certificate (set etcdCertFile \
                 and etcdKeyFile)"
            };
            return DatastoreError::Refused {
                endpoints: endpoints.into(),
                reason: format!("{why} [{reason}]"),
            };
        }
        if tls && lower.contains("invalid peer certificate") {
            return DatastoreError::Refused {
                endpoints: endpoints.into(),
                reason: format!(
                    "etcd's certificate does not verify against etcdCACertFile [{reason}]"
                ),
            };
        }
        if refused {
            let hint = if tls {
                " (check etcdCACertFile, etcdCertFile and etcdKeyFile against etcd's CA)"
            } else {
                ""
            };
            DatastoreError::Refused {
                endpoints: endpoints.into(),
                reason: format!("{reason}{hint}"),
            }
        } else {
            DatastoreError::Unreachable {
                endpoints: endpoints.into(),
                reason,
            }
        }
    }
}

/// `a,b , c` -> the endpoints, blanks dropped.
pub fn split_endpoints(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// A PEM file that must hold a block of `kind` ("CERTIFICATE", "PRIVATE KEY" also matching
/// "EC PRIVATE KEY" and "RSA PRIVATE KEY").
fn read_pem(field: &'static str, path: &Path, kind: &str) -> Result<Vec<u8>, DatastoreError> {
    let bytes = std::fs::read(path).map_err(|source| DatastoreError::File {
        field,
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let has_block = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{kind}-----")));
    if !has_block {
        return Err(DatastoreError::BadFile {
            field,
            path: path.to_path_buf(),
            reason: format!("holds no PEM {kind}"),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_password() {
        let cfg = DatastoreConfig {
            etcd_endpoints: vec!["http://198.18.0.2:2379".into()],
            etcd_username: Some("tessera".into()),
            etcd_password: Some("pw-never-logged".into()),
            ..Default::default()
        };
        let shown = format!("{cfg:?} {cfg:#?}");
        assert!(!shown.contains("pw-never-logged"), "{shown}");
        assert!(
            shown.contains("tessera") && shown.contains("<redacted>"),
            "{shown}"
        );
    }
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn the_environment_overrides_the_file_and_reads_like_it() {
        let mut c: DatastoreConfig = serde_saphyr::from_str(
            "etcdEndpoints: [\"http://198.18.0.2:2379\"]\ntimeoutMs: 2000\netcdCACertFile: /etc/ca.pem\n",
        )
        .expect("yaml");
        assert_eq!(
            c.etcd_ca_cert_file.as_deref(),
            Some(Path::new("/etc/ca.pem"))
        );
        c.apply_env(env(&[
            (
                "ETCD_ENDPOINTS",
                "https://198.18.0.2:2379, https://198.18.0.3:2379",
            ),
            ("ETCD_CERT_FILE", "/etc/cert.pem"),
            ("ETCD_KEY_FILE", "/etc/key.pem"),
        ]))
        .expect("env");
        assert_eq!(
            c.etcd_endpoints,
            ["https://198.18.0.2:2379", "https://198.18.0.3:2379"]
        );
        assert_eq!(c.timeout(), Duration::from_millis(2000));
        c.validate().expect("consistent");
        let e = c
            .clone()
            .apply_env(env(&[("ETCD_TIMEOUT_MS", "soon")]))
            .unwrap_err();
        assert!(e.to_string().contains("ETCD_TIMEOUT_MS"), "{e}");
    }

    #[test]
    fn inconsistent_settings_are_refused_naming_what_to_fix() {
        let base = DatastoreConfig {
            etcd_endpoints: vec!["https://198.18.0.2:2379".into()],
            ..Default::default()
        };
        let e = base.validate().unwrap_err().to_string();
        assert!(e.contains("etcdCACertFile"), "{e}");
        let mut c = base.clone();
        c.etcd_ca_cert_file = Some("/ca.pem".into());
        c.etcd_cert_file = Some("/cert.pem".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("etcdKeyFile"), "{e}");
        let e = DatastoreConfig::default()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("ETCD_ENDPOINTS"), "{e}");
        let mut c = base;
        c.etcd_endpoints = vec!["198.18.0.2:2379".into()];
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_missing_or_wrong_file_is_named_with_its_field() {
        let dir = std::env::temp_dir().join(format!("tessera-ds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let not_pem = dir.join("ca.pem");
        std::fs::write(&not_pem, "hello").expect("write");
        let mut c = DatastoreConfig {
            etcd_endpoints: vec!["https://127.0.0.1:1".into()],
            etcd_ca_cert_file: Some(dir.join("missing.pem")),
            ..Default::default()
        };
        let Err(e) = c.tls() else {
            panic!("a missing file was accepted")
        };
        let e = e.to_string();
        assert!(
            e.contains("etcdCACertFile") && e.contains("missing.pem"),
            "{e}"
        );
        c.etcd_ca_cert_file = Some(not_pem);
        let Err(e) = c.tls() else {
            panic!("a file without PEM was accepted")
        };
        let e = e.to_string();
        assert!(
            e.contains("etcdCACertFile") && e.contains("no PEM CERTIFICATE"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
