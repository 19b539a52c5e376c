//! Configuration: the TOML file, its defaults, and validation.
//!
//! Every key is documented in the README. Unknown keys are errors, so a typo
//! never silently falls back to a default.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("no upstream directory: set proxy.upstream in the config file or pass --upstream")]
    NoUpstream,
    #[error("no listener: set proxy.listen in the config file or pass --listen")]
    NoListener,
    #[error("proxy.{key} must be greater than zero")]
    Zero { key: &'static str },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("{url:?} is not a URL: {reason}")]
    Syntax { url: String, reason: String },
    #[error("{url:?}: scheme {scheme:?} is not supported (use ldap://)")]
    Scheme { url: String, scheme: String },
    #[error("{url:?} names no host")]
    NoHost { url: String },
    #[error("{url:?}: an LDAP URL here is only scheme://host:port; remove {extra:?}")]
    Extra { url: String, extra: String },
}

/// An `ldap://host:port` address of a listener or a directory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct LdapUrl {
    host: String,
    port: u16,
}

impl LdapUrl {
    /// `host:port`, as `TcpStream::connect` and `TcpListener::bind` take it.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for LdapUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ldap://{}", self.authority())
    }
}

impl FromStr for LdapUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, UrlError> {
        let parsed = url::Url::parse(s).map_err(|e| UrlError::Syntax {
            url: s.to_owned(),
            reason: e.to_string(),
        })?;
        if parsed.scheme() != "ldap" {
            return Err(UrlError::Scheme {
                url: s.to_owned(),
                scheme: parsed.scheme().to_owned(),
            });
        }
        let host = match parsed.host() {
            Some(url::Host::Ipv6(addr)) => addr.to_string(),
            Some(host) => host.to_string(),
            None => return Err(UrlError::NoHost { url: s.to_owned() }),
        };
        if host.is_empty() {
            return Err(UrlError::NoHost { url: s.to_owned() });
        }
        let extra = format!(
            "{}{}{}",
            parsed.path().trim_start_matches('/'),
            parsed.query().map(|q| format!("?{q}")).unwrap_or_default(),
            parsed
                .fragment()
                .map(|f| format!("#{f}"))
                .unwrap_or_default()
        );
        if !extra.is_empty() || !parsed.username().is_empty() {
            return Err(UrlError::Extra {
                url: s.to_owned(),
                extra,
            });
        }
        Ok(LdapUrl {
            host,
            port: parsed.port().unwrap_or(389),
        })
    }
}

impl TryFrom<String> for LdapUrl {
    type Error = UrlError;
    fn try_from(s: String) -> Result<Self, UrlError> {
        s.parse()
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub log: LogConfig,
}

/// `[proxy]`: the listeners, the directory behind them, and the relay's limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub listen: Vec<LdapUrl>,
    pub upstream: Vec<LdapUrl>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub io_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    pub max_client_pdu: usize,
    pub max_upstream_pdu: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            upstream: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(15 * 60),
            shutdown_grace: Duration::from_secs(10),
            max_connections: 4096,
            max_client_pdu: 256 * 1024,
            max_upstream_pdu: 16 * 1024 * 1024,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter directive: `info`, `ldapsync=debug`, …
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
        }
    }
}

impl Config {
    /// Parses a TOML document; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Checks what serde cannot: the settings the relay cannot run without.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.proxy;
        if p.upstream.is_empty() {
            return Err(ConfigError::NoUpstream);
        }
        if p.listen.is_empty() {
            return Err(ConfigError::NoListener);
        }
        let nonzero = [
            ("max_connections", p.max_connections),
            ("max_client_pdu", p.max_client_pdu),
            ("max_upstream_pdu", p.max_upstream_pdu),
            ("connect_timeout", p.connect_timeout.as_millis() as usize),
            ("io_timeout", p.io_timeout.as_millis() as usize),
            ("idle_timeout", p.idle_timeout.as_millis() as usize),
        ];
        match nonzero.iter().find(|(_, v)| *v == 0) {
            Some((key, _)) => Err(ConfigError::Zero { key }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldap_urls() {
        let ok = [
            ("ldap://127.0.0.1:3890", "127.0.0.1:3890"),
            ("ldap://localhost", "localhost:389"),
            ("ldap://[::1]:3389/", "[::1]:3389"),
        ];
        for (input, authority) in ok {
            assert_eq!(
                input.parse::<LdapUrl>().unwrap().authority(),
                authority,
                "{input}"
            );
        }
        let bad = [
            "127.0.0.1:389",
            "http://x",
            "ldap://h/dc=example",
            "ldap://",
        ];
        for input in bad {
            assert!(
                input.parse::<LdapUrl>().is_err(),
                "{input} should be refused"
            );
        }
    }

    #[test]
    fn full_file_parses_with_durations() {
        let cfg = Config::parse(
            r#"
            [proxy]
            listen = ["ldap://127.0.0.1:3389"]
            upstream = ["ldap://127.0.0.1:3890", "ldap://127.0.0.1:3891"]
            connect_timeout = "2s"
            idle_timeout = "1h"
            max_client_pdu = 1048576
            [log]
            level = "debug"
            "#,
            Path::new("t.toml"),
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.proxy.upstream.len(), 2);
        assert_eq!(cfg.proxy.connect_timeout, Duration::from_secs(2));
        assert_eq!(cfg.proxy.idle_timeout, Duration::from_secs(3600));
        assert_eq!(cfg.proxy.io_timeout, ProxyConfig::default().io_timeout);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[proxy]\nlisten_on = []", "listen_on"),
            ("[proxy]\nupstream = [\"ldaps://x\"]", "ldaps"),
            ("[proxy]\nconnect_timeout = \"soon\"", "connect_timeout"),
            ("[prxy]\n", "prxy"),
        ];
        for (text, needle) in cases {
            let err = Config::parse(text, Path::new("c.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
            assert!(err.contains("c.toml"), "{err:?} should name the file");
        }
        let missing =
            Config::parse("[proxy]\nlisten = [\"ldap://h\"]", Path::new("c.toml")).unwrap();
        assert!(matches!(missing.validate(), Err(ConfigError::NoUpstream)));
    }
}
