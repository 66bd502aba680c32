//! The client's address when the server sits behind proxies it trusts.
//!
//! Behind the zoo's load balancer every request comes from the balancer's address, so
//! per-address limits (failed logins) would put every visitor in one bucket. With
//! `CMZ_TRUSTED_PROXIES` set (addresses or CIDR ranges, comma-separated), the client is the
//! right-most address in `Forwarded` (or, without it, `X-Forwarded-For`) that is not a
//! trusted proxy: the first hop no trusted proxy vouches for. A peer that is not trusted is
//! the client whatever headers it sends, so spoofed headers change nothing.
//!
//! ```
//! use std::net::IpAddr;
//! use axum::http::HeaderMap;
//! use cmz_tower::TrustedProxies;
//!
//! let proxies = TrustedProxies::parse("10.0.0.0/8")?;
//! let mut headers = HeaderMap::new();
//! headers.insert("x-forwarded-for", "203.0.113.9, 10.0.0.7".parse()?);
//! let peer: IpAddr = "10.0.0.2".parse()?;
//! assert_eq!(proxies.client_address(peer, &headers).to_string(), "203.0.113.9");
//! // From an untrusted peer the header is ignored.
//! let stranger: IpAddr = "198.51.100.4".parse()?;
//! assert_eq!(proxies.client_address(stranger, &headers), stranger);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use cmz_core::{Error, Result};
use ipnet::IpNet;

/// The proxies whose forwarding headers are believed (none by default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

/// The most forwarding hops read from one request (a longer chain is cut at the left).
const MAX_HOPS: usize = 32;

impl TrustedProxies {
    /// No trusted proxies: the client is always the peer.
    pub fn none() -> Self {
        Self::default()
    }

    /// Parses `CMZ_TRUSTED_PROXIES`: addresses or CIDR ranges, comma- or space-separated.
    pub fn parse(list: &str) -> Result<Self> {
        list.split([',', ' '])
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| {
                item.parse::<IpNet>()
                    .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        Error::validation(
                            "CMZ_TRUSTED_PROXIES",
                            format!(
                                "CMZ_TRUSTED_PROXIES: {item:?} is not an address or a CIDR range \
                                 (for example 10.0.0.0/8, 192.0.2.7)"
                            ),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()
            .map(Self)
    }

    /// Whether any proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn trusts(&self, address: IpAddr) -> bool {
        let address = canonical(address);
        self.0.iter().any(|net| net.contains(&address))
    }

    /// The client's address for a request from `peer` with these `headers`.
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.trusts(peer) {
            return peer;
        }
        let hops = forwarded_hops(headers);
        let mut client = peer;
        for hop in hops.iter().rev() {
            if !self.trusts(client) {
                break;
            }
            match hop {
                Some(address) => client = *address,
                // An unreadable hop (`unknown`, garbage): nothing left of it can be believed.
                None => break,
            }
        }
        client
    }
}

/// IPv4-mapped IPv6 addresses as plain IPv4, so `::ffff:10.0.0.1` matches `10.0.0.0/8`.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The forwarding chain, client first: `Forwarded: for=` values when that header is
/// present, else `X-Forwarded-For`. `None` marks a hop that is not an address.
fn forwarded_hops(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let forwarded: Vec<Option<IpAddr>> = headers
        .get_all("forwarded")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (name, value) = pair.split_once('=')?;
                name.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| address(value.trim().trim_matches('"')))
            })
        })
        .collect();
    let hops = if forwarded.is_empty() {
        headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|hop| address(hop.trim()))
            .collect()
    } else {
        forwarded
    };
    let skip = hops.len().saturating_sub(MAX_HOPS);
    hops.into_iter().skip(skip).collect()
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:4711`, `[2001:db8::1]:4711`,
/// `2001:db8::1`.
fn address(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(socket) = text.parse::<SocketAddr>() {
        return Some(canonical(socket.ip()));
    }
    text.strip_prefix('[')
        .and_then(|rest| rest.split(']').next())
        .and_then(|inner| inner.parse::<IpAddr>().ok())
        .map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client() {
        let h = headers(&[("x-forwarded-for", "1.2.3.4"), ("forwarded", "for=5.6.7.8")]);
        assert_eq!(
            TrustedProxies::none().client_address(ip("10.0.0.1"), &h),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn spoofed_headers_from_an_untrusted_peer_are_ignored() {
        let proxies = TrustedProxies::parse("10.0.0.0/8").unwrap();
        let h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(
            proxies.client_address(ip("198.51.100.7"), &h),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let proxies = TrustedProxies::parse("10.0.0.0/8, 192.0.2.7").unwrap();
        // A client that writes its own X-Forwarded-For cannot choose its address: the
        // proxy appends the real one, and that is the right-most untrusted hop.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.9, 192.0.2.7")]);
        assert_eq!(
            proxies.client_address(ip("10.1.2.3"), &h),
            ip("203.0.113.9")
        );
        // Several header lines are one list, in order.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "203.0.113.10, 10.0.0.5"),
        ]);
        assert_eq!(
            proxies.client_address(ip("10.1.2.3"), &h),
            ip("203.0.113.10")
        );
        // Everything trusted: the left-most hop.
        let h = headers(&[("x-forwarded-for", "10.9.9.9, 10.0.0.5")]);
        assert_eq!(proxies.client_address(ip("10.1.2.3"), &h), ip("10.9.9.9"));
        // An unreadable hop stops the walk at the last trusted address.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, unknown, 10.0.0.5")]);
        assert_eq!(proxies.client_address(ip("10.1.2.3"), &h), ip("10.0.0.5"));
    }

    #[test]
    fn forwarded_wins_over_x_forwarded_for_and_ports_and_brackets_are_read() {
        let proxies = TrustedProxies::parse("10.0.0.0/8,2001:db8:ffff::/48").unwrap();
        let h = headers(&[
            (
                "forwarded",
                "for=\"[2001:db8:cafe::17]:4711\";proto=https, for=10.0.0.4:80",
            ),
            ("x-forwarded-for", "6.6.6.6"),
        ]);
        assert_eq!(
            proxies.client_address(ip("10.0.0.1"), &h),
            ip("2001:db8:cafe::17")
        );
        let h = headers(&[("forwarded", "For=203.0.113.43;by=10.0.0.1")]);
        assert_eq!(
            proxies.client_address(ip("::ffff:10.0.0.1"), &h),
            ip("203.0.113.43"),
            "an IPv4-mapped peer matches its IPv4 range"
        );
    }

    #[test]
    fn bad_settings_name_the_variable() {
        let err = TrustedProxies::parse("10.0.0.0/8, lb.internal").unwrap_err();
        assert_eq!(err.code(), "validation_error");
        assert!(err.to_string().contains("CMZ_TRUSTED_PROXIES"));
        assert!(TrustedProxies::parse("").unwrap().is_empty());
        assert_eq!(
            TrustedProxies::parse("192.0.2.7 10.0.0.0/8")
                .unwrap()
                .0
                .len(),
            2
        );
    }
}
