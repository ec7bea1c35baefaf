//! NBD URIs in the NBD project's format (`doc/uri.md` of the NBD protocol):
//! `nbd://host[:port]/export` over TCP (port 10809 by default) and
//! `nbd+unix:///export?socket=/path` over a Unix socket. TLS forms (`nbds`) are refused.

use std::path::PathBuf;

/// The default NBD TCP port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddress {
    /// TCP: a host name or address (IPv6 without brackets) and a port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix socket.
    Unix(PathBuf),
}

impl std::fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddress::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdAddress::Tcp { host, port } => write!(f, "{host}:{port}"),
            NbdAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A parsed NBD URI: the server and the export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    /// The server.
    pub address: NbdAddress,
    /// The export name (may be empty: the server's default export).
    pub export: String,
}

/// Whether `path` is meant as an NBD URI (starts with an NBD scheme), right or wrong.
pub fn is_nbd_uri(path: &str) -> bool {
    ["nbd:", "nbd+", "nbds:", "nbds+"]
        .iter()
        .any(|s| path.starts_with(s))
}

/// Decodes `%XX` escapes.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad %-escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// Escapes what a URI component cannot hold as is (`%XX`), keeping `/` where `slash`.
fn percent_encode(s: &str, slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let keep = b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (slash && b == b'/');
        if keep {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl NbdUri {
    /// The same URI with another Unix socket path (a TCP URI is returned as it is).
    pub fn with_socket(&self, socket: PathBuf) -> NbdUri {
        match self.address {
            NbdAddress::Unix(_) => NbdUri {
                address: NbdAddress::Unix(socket),
                export: self.export.clone(),
            },
            NbdAddress::Tcp { .. } => self.clone(),
        }
    }
}

impl std::fmt::Display for NbdUri {
    /// The URI in its canonical form (what parsing it gives back).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let export = percent_encode(&self.export, true);
        match &self.address {
            NbdAddress::Tcp { .. } => write!(f, "nbd://{}/{export}", self.address),
            NbdAddress::Unix(p) => write!(
                f,
                "nbd+unix:///{export}?socket={}",
                percent_encode(&p.to_string_lossy(), true)
            ),
        }
    }
}

impl std::str::FromStr for NbdUri {
    type Err = String;

    /// Parses `nbd://host[:port]/export` or `nbd+unix:///export?socket=/path`.
    fn from_str(uri: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("NBD URI {uri:?}: {why}");
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| {
            bad("expected nbd://host[:port]/export or nbd+unix:///export?socket=PATH")
        })?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, export) = match rest.split_once('/') {
            Some((a, e)) => (a, percent_decode(e).map_err(|e| bad(&e))?),
            None => (rest, String::new()),
        };
        let params: Vec<(&str, &str)> = query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').unwrap_or((p, "")))
            .collect();
        let address = match scheme {
            "nbd" | "nbd+tcp" => {
                if let Some((k, _)) = params.first() {
                    return Err(bad(&format!("unknown parameter {k:?} for TCP")));
                }
                let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                    let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
                    (h, after.strip_prefix(':'))
                } else {
                    match authority.rsplit_once(':') {
                        Some((h, p)) => (h, Some(p)),
                        None => (authority, None),
                    }
                };
                if host.is_empty() {
                    return Err(bad("no host"));
                }
                let port = match port {
                    Some(p) => p
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| bad(&format!("bad port {p:?}")))?,
                    None => DEFAULT_PORT,
                };
                NbdAddress::Tcp {
                    host: host.to_string(),
                    port,
                }
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad(
                        "a Unix socket URI has no host (nbd+unix:///export?socket=PATH)",
                    ));
                }
                let mut socket = None;
                for (k, v) in params {
                    match k {
                        "socket" => socket = Some(percent_decode(v).map_err(|e| bad(&e))?),
                        other => return Err(bad(&format!("unknown parameter {other:?}"))),
                    }
                }
                let socket = socket
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| bad("missing ?socket=PATH"))?;
                NbdAddress::Unix(PathBuf::from(socket))
            }
            s if s.starts_with("nbds") => return Err(bad("TLS (nbds) is not supported")),
            other => return Err(bad(&format!("unknown scheme {other:?}"))),
        };
        if export.len() > 4096 {
            return Err(bad("export name longer than 4096 bytes"));
        }
        Ok(NbdUri { address, export })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NbdUri, String> {
        s.parse()
    }

    #[test]
    fn tcp_and_unix_forms() {
        assert_eq!(
            parse("nbd://10.0.0.2/disk0").unwrap(),
            NbdUri {
                address: NbdAddress::Tcp {
                    host: "10.0.0.2".into(),
                    port: DEFAULT_PORT
                },
                export: "disk0".into()
            }
        );
        let u = parse("nbd://storage.example:10900/a%20b").unwrap();
        assert_eq!(u.export, "a b");
        assert_eq!(u.address.to_string(), "storage.example:10900");
        let u = parse("nbd://[::1]:4000/").unwrap();
        assert_eq!(
            u.address,
            NbdAddress::Tcp {
                host: "::1".into(),
                port: 4000
            }
        );
        assert_eq!(u.export, "");
        assert_eq!(u.address.to_string(), "[::1]:4000");
        let u = parse("nbd+unix:///exp?socket=/run/nbd%2B1.sock").unwrap();
        assert_eq!(u.address, NbdAddress::Unix("/run/nbd+1.sock".into()));
        assert_eq!(u.export, "exp");
        assert_eq!(parse("nbd://host").unwrap().export, "");
    }

    #[test]
    fn uris_print_back_in_a_form_that_parses_the_same() {
        for u in [
            "nbd://example.com/disk",
            "nbd://[::1]:10810/a%20b",
            "nbd+unix:///exp?socket=/run/nbd%2B1.sock",
            "nbd+unix:///?socket=/tmp/s",
        ] {
            let parsed = parse(u).unwrap();
            let again = parse(&parsed.to_string()).unwrap();
            assert_eq!(parsed, again, "{u} -> {parsed}");
        }
        assert_eq!(
            parse("nbd://h/e").unwrap().to_string(),
            "nbd://h:10809/e",
            "the default port is spelt out"
        );
    }

    #[test]
    fn malformed_uris_say_why() {
        for (uri, why) in [
            ("nbd:/x", "expected"),
            ("nbd:///x", "no host"),
            ("nbd://h:0/x", "bad port"),
            ("nbd://h:99999/x", "bad port"),
            ("nbd://h/x?socket=/s", "unknown parameter"),
            ("nbd+unix://host/x?socket=/s", "no host"),
            ("nbd+unix:///x", "missing ?socket"),
            ("nbd+unix:///x?sock=/s", "unknown parameter"),
            ("nbds://h/x", "TLS"),
            ("nbd+vsock:///x", "unknown scheme"),
            ("nbd://h/%zz", "bad %-escape"),
            ("nbd://[::1/x", "unclosed"),
        ] {
            let err = parse(uri).unwrap_err();
            assert!(err.contains(why), "{uri}: {err}");
        }
        assert!(is_nbd_uri("nbd://h/x") && is_nbd_uri("nbd+unix:///x?socket=/s"));
        assert!(!is_nbd_uri("/var/lib/nbd.raw") && !is_nbd_uri("null"));
    }
}
