//! Where a webhook may go. A batch names its own webhook URL, so without a guard any client
//! could make the server send requests into its own network (SSRF): to a metadata service, a
//! database's admin port, a router. Unless `webhooks.allow_private_destinations` is set, a
//! destination is refused when any address its host resolves to is not a public unicast
//! address. The dispatcher then connects only to the addresses it vetted, so a DNS answer that
//! changes between the check and the connection (rebinding) cannot slip through.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Why a destination is refused. Carries no secret; safe to log and to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DestinationError {
    #[error("the webhook URL is not valid: {0}")]
    InvalidUrl(String),
    #[error("the webhook URL must be http:// or https://, not {0}://")]
    Scheme(String),
    #[error("the webhook URL has no host")]
    NoHost,
    #[error(
        "the webhook destination {host} is a private, loopback, link-local or otherwise non-public address \
         ({addr}); set webhooks.allow_private_destinations to allow it"
    )]
    Private { host: String, addr: IpAddr },
    #[error("the webhook host {0} resolves to no address")]
    Unresolved(String),
}

/// Whether an address is one a webhook must not reach by default: anything but public unicast.
/// IPv4: unspecified and "this network" (0/8), loopback (127/8), private (10/8, 172.16/12,
/// 192.168/16), shared CGNAT (100.64/10), link-local (169.254/16), IETF protocol assignments
/// (192.0.0/24), documentation (192.0.2/24, 198.51.100/24, 203.0.113/24), benchmarking
/// (198.18/15), multicast (224/4), reserved and broadcast (240/4). IPv6: unspecified, loopback,
/// unique-local (fc00::/7), link-local (fe80::/10), site-local (fec0::/10), multicast
/// (ff00::/8), documentation (2001:db8::/32), discard (100::/64), and any address that embeds
/// an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64 64:ff9b::/96, 6to4 2002::/16) when
/// that IPv4 address is refused.
pub fn is_non_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_non_public_v4(v4),
        IpAddr::V6(v6) => is_non_public_v6(v6),
    }
}

fn is_non_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    a == 0
        || a == 10
        || a == 127
        || (a == 100 && (64..128).contains(&b))
        || (a == 169 && b == 254)
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 168)
        || (a == 192 && b == 0 && c == 0)
        || (a == 192 && b == 0 && c == 2)
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
        || (a == 198 && (b == 18 || b == 19))
        || a >= 224
}

fn is_non_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_non_public_v4(v4);
    }
    // IPv4-compatible (::a.b.c.d, deprecated) and NAT64 (64:ff9b::a.b.c.d).
    if (s[..6] == [0, 0, 0, 0, 0, 0] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]) && !(s[6] == 0 && s[7] <= 1) {
        return is_non_public_v4(embedded_v4(s[6], s[7]));
    }
    // 6to4: 2002:aabb:ccdd::/48 carries a.b.c.d.
    if s[0] == 0x2002 {
        return is_non_public_v4(embedded_v4(s[1], s[2]));
    }
    ip.is_unspecified()
        || ip.is_loopback()
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] & 0xffc0) == 0xfec0
        || (s[0] & 0xff00) == 0xff00
        || (s[0] == 0x2001 && s[1] == 0x0db8)
        || (s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0)
}

fn embedded_v4(high: u16, low: u16) -> Ipv4Addr {
    let [a, b] = high.to_be_bytes();
    let [c, d] = low.to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// A URL's scheme, host and port, checked for shape only.
pub(crate) struct Target {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The host when it is an IP literal.
    pub(crate) literal: Option<IpAddr>,
}

pub(crate) fn parse_target(url: &str) -> Result<Target, DestinationError> {
    let parsed = url::Url::parse(url).map_err(|e| DestinationError::InvalidUrl(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(DestinationError::Scheme(parsed.scheme().to_owned()));
    }
    let port = parsed.port_or_known_default().ok_or(DestinationError::NoHost)?;
    let (host, literal) = match parsed.host().ok_or(DestinationError::NoHost)? {
        url::Host::Domain(d) => (d.to_owned(), None),
        url::Host::Ipv4(ip) => (ip.to_string(), Some(IpAddr::V4(ip))),
        url::Host::Ipv6(ip) => (ip.to_string(), Some(IpAddr::V6(ip))),
    };
    Ok(Target { host, port, literal })
}

/// The check a submit can make without DNS: the scheme, and a host that is an IP literal (or
/// `localhost`) in a refused range. The dispatcher checks every resolved address again at
/// send time.
pub fn check_submitted_url(url: &str, allow_private: bool) -> Result<(), DestinationError> {
    let target = parse_target(url)?;
    if allow_private {
        return Ok(());
    }
    let host = target.host.trim_end_matches('.').to_ascii_lowercase();
    if host == "localhost" || host.ends_with(".localhost") {
        return Err(DestinationError::Private {
            host: target.host,
            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        });
    }
    match target.literal {
        Some(addr) if is_non_public(addr) => Err(DestinationError::Private {
            host: target.host,
            addr,
        }),
        _ => Ok(()),
    }
}

/// Resolves a URL's host and vets every address; returns the host and the addresses to
/// connect to.
pub(crate) async fn resolve(url: &str, allow_private: bool) -> Result<(String, Vec<SocketAddr>), DestinationError> {
    let target = parse_target(url)?;
    let addrs: Vec<SocketAddr> = match target.literal {
        Some(ip) => vec![SocketAddr::new(ip, target.port)],
        None => tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|_| DestinationError::Unresolved(target.host.clone()))?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(DestinationError::Unresolved(target.host));
    }
    if !allow_private && let Some(bad) = addrs.iter().find(|a| is_non_public(a.ip())) {
        return Err(DestinationError::Private {
            host: target.host,
            addr: bad.ip(),
        });
    }
    Ok((target.host, addrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> bool {
        is_non_public(text.parse().expect("an address"))
    }

    #[test]
    fn non_public_ipv4_ranges_are_refused() {
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "198.18.0.1",
            "198.19.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(refused(ip), "{ip} should be refused");
        }
    }

    #[test]
    fn public_ipv4_addresses_are_allowed() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "172.15.255.255",
            "172.32.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "169.253.0.1",
            "192.169.0.1",
            "198.20.0.1",
            "223.255.255.255",
        ] {
            assert!(!refused(ip), "{ip} should be allowed");
        }
    }

    #[test]
    fn non_public_ipv6_ranges_are_refused() {
        for ip in [
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "100::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:7f00:1::1",
            "2002:a00:1::",
        ] {
            assert!(refused(ip), "{ip} should be refused");
        }
    }

    #[test]
    fn public_ipv6_addresses_are_allowed() {
        for ip in [
            "2606:4700:4700::1111",
            "2001:4860:4860::8888",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(!refused(ip), "{ip} should be allowed");
        }
    }

    #[test]
    fn submitted_urls_with_private_literals_are_refused_unless_allowed() {
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://10.0.0.1/hook",
            "https://[::1]/hook",
            "http://[::ffff:192.168.0.1]/",
            "http://localhost:9000/",
            "http://api.localhost/",
            "http://0.0.0.0/",
        ] {
            assert!(
                matches!(check_submitted_url(url, false), Err(DestinationError::Private { .. })),
                "{url}"
            );
            assert_eq!(check_submitted_url(url, true), Ok(()), "{url}");
        }
        for url in ["https://example.com/hook", "http://8.8.8.8/", "https://[2606:4700::1]/"] {
            assert_eq!(check_submitted_url(url, false), Ok(()), "{url}");
        }
        assert!(matches!(
            check_submitted_url("ftp://example.com/x", true),
            Err(DestinationError::Scheme(s)) if s == "ftp"
        ));
    }

    #[tokio::test]
    async fn resolving_vets_every_address() {
        let refused = resolve("http://127.0.0.1:1/x", false).await;
        assert!(
            matches!(refused, Err(DestinationError::Private { .. })),
            "{:?}",
            refused.err()
        );
        let (host, addrs) = resolve("http://127.0.0.1:1/x", true).await.expect("allowed");
        assert_eq!(host, "127.0.0.1");
        assert_eq!(addrs, vec!["127.0.0.1:1".parse().expect("an address")]);
        // `localhost` resolves through the system resolver to loopback only.
        let local = resolve("http://localhost:1/x", false).await;
        assert!(
            matches!(
                local,
                Err(DestinationError::Private { .. } | DestinationError::Unresolved(_))
            ),
            "{:?}",
            local.err()
        );
    }
}
