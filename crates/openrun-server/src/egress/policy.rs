//! Network policies: what a sandbox may reach through the egress proxy, checked as data.
//!
//! A policy is given as JSON ([`PolicyBody`]), checked and compiled into a [`Policy`] once
//! (on create and on `PUT .../network`), and stored as the checked JSON. Deciding a
//! connection is two pure steps, unit-tested below:
//! 1. [`Policy::check_target`]: the host the client named, *before* any DNS lookup, so a
//!    name outside the allowlist never reaches a resolver (no DNS exfiltration);
//! 2. [`Policy::check_addr`]: each address an allowed name resolved to (or an IP literal),
//!    against the ranges that are never reachable unless a CIDR names them specifically.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hyper::header::{HeaderName, HeaderValue};

/// Most entries of `allow`.
pub(crate) const MAX_ALLOW: usize = 256;
/// Most secrets of one policy.
pub(crate) const MAX_SECRETS: usize = 32;
/// Most hosts one secret is bound to.
pub(crate) const MAX_SECRET_HOSTS: usize = 32;
/// Longest secret value, in bytes.
pub(crate) const MAX_SECRET_VALUE: usize = 8192;
/// Longest secret name.
pub(crate) const MAX_SECRET_NAME: usize = 64;
/// Longest domain name (RFC 1035, without the trailing dot).
const MAX_DOMAIN: usize = 253;
/// Longest label of a domain name.
const MAX_LABEL: usize = 63;
/// Default header a secret is sent in.
const DEFAULT_HEADER: &str = "Authorization";
/// Default format of a secret's header value.
const DEFAULT_FORMAT: &str = "Bearer {value}";
/// Where a secret's value goes in its `format`.
const VALUE_PLACEHOLDER: &str = "{value}";

/// How a sandbox reaches the network.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
#[schema(as = NetworkMode)]
pub(crate) enum Mode {
    /// No network: the proxy refuses every request (the default).
    #[default]
    None,
    /// Only the domains and CIDRs of `allow`, through the egress proxy.
    Allowlist,
    /// Every public address, through the egress proxy (and the runtime's own networking where
    /// the server has it).
    Open,
}

impl Mode {
    /// Its name in the API.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Allowlist => "allowlist",
            Mode::Open => "open",
        }
    }
}

/// A network policy as the API takes it (and as it is stored, checked and normalized).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NetworkPolicy)]
pub(crate) struct PolicyBody {
    /// `none` (the default), `allowlist` or `open`.
    #[serde(default)]
    pub mode: Mode,
    /// Domains (`example.com`; `*.example.com` for its subdomains, not itself) and CIDRs
    /// (`10.0.0.0/8`, `127.0.0.1/32`; a bare address is a /32 or /128): what `allowlist`
    /// reaches. A CIDR lying inside a range that is otherwise never reachable (loopback,
    /// private, link-local, ...) opens that part of it, also in `open` mode. At most 256.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Credentials the proxy adds to requests to their hosts; the value never enters the
    /// sandbox and is never returned. At most 32.
    #[serde(default)]
    pub secrets: Vec<SecretBody>,
}

/// A secret as the API takes it.
#[derive(Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NetworkSecret)]
pub(crate) struct SecretBody {
    /// Name, 1 to 64 characters from `A-Za-z0-9._-`, unique in the policy.
    pub name: String,
    /// The credential (1 to 8192 bytes, no control characters). Write-only.
    pub value: String,
    /// Domains it is sent to (`*.example.com` allowed); each must be allowed by the policy.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Request header it is sent in (default `Authorization`); replaces any the sandbox sent.
    #[serde(default = "default_header")]
    pub header: String,
    /// The header's value, with `{value}` standing for the secret (default `Bearer {value}`).
    #[serde(default = "default_format")]
    pub format: String,
}

impl std::fmt::Debug for SecretBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBody")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .field("hosts", &self.hosts)
            .field("header", &self.header)
            .field("format", &self.format)
            .finish()
    }
}

fn default_header() -> String {
    DEFAULT_HEADER.to_string()
}

fn default_format() -> String {
    DEFAULT_FORMAT.to_string()
}

/// A policy as the API shows it: secrets without their values.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[schema(as = NetworkPolicyView)]
pub(crate) struct PolicyView {
    /// `none`, `allowlist` or `open`.
    pub mode: Mode,
    /// Allowed domains and CIDRs, normalized.
    pub allow: Vec<String>,
    /// Secrets, without their values.
    pub secrets: Vec<SecretView>,
}

/// A secret as the API shows it (never its value).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[schema(as = NetworkSecretView)]
pub(crate) struct SecretView {
    /// Name.
    pub name: String,
    /// Hosts it is sent to.
    pub hosts: Vec<String>,
    /// Header it is sent in.
    pub header: String,
    /// Format of the header's value (`{value}` stands for the secret).
    pub format: String,
}

/// Why a policy is refused, for the client (never holds a secret's value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct PolicyError(pub String);

fn bad(message: impl Into<String>) -> PolicyError {
    PolicyError(message.into())
}

/// A domain rule: one name, or every name under a suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DomainRule {
    /// Exactly this name.
    Exact(String),
    /// Any name ending in `.suffix` (not `suffix` itself).
    Subdomains(String),
}

impl DomainRule {
    /// Parses `example.com` or `*.example.com` (normalized to lower case, no final dot).
    fn parse(text: &str) -> Result<Self, PolicyError> {
        match text.strip_prefix("*.") {
            Some(rest) => {
                Ok(Self::Subdomains(normalize_domain(rest).map_err(|why| {
                    bad(format!("invalid domain {text:?}: {why}"))
                })?))
            }
            None => {
                Ok(Self::Exact(normalize_domain(text).map_err(|why| {
                    bad(format!("invalid domain {text:?}: {why}"))
                })?))
            }
        }
    }

    /// Whether the (normalized) `host` matches.
    pub(crate) fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(name) => host == name,
            Self::Subdomains(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }

    /// Whether every name `other` matches is matched by `self`.
    fn covers(&self, other: &DomainRule) -> bool {
        match other {
            Self::Exact(host) => self.matches(host),
            Self::Subdomains(suffix) => match self {
                Self::Exact(_) => false,
                Self::Subdomains(mine) => suffix == mine || self.matches(suffix),
            },
        }
    }

    fn text(&self) -> String {
        match self {
            Self::Exact(name) => name.clone(),
            Self::Subdomains(suffix) => format!("*.{suffix}"),
        }
    }
}

/// Checks a domain name (RFC 1123 labels) and returns it in lower case without a final dot.
/// A name whose last label is all digits is refused: it would be an IP address in disguise
/// (`1.2.3.4`, `0x7f.1`), which resolvers treat inconsistently.
pub(crate) fn normalize_domain(text: &str) -> Result<String, &'static str> {
    let name = text.strip_suffix('.').unwrap_or(text);
    if name.is_empty() {
        return Err("empty name");
    }
    if name.len() > MAX_DOMAIN {
        return Err("longer than 253 characters");
    }
    if !name.is_ascii() {
        return Err("not ASCII: write internationalized names in their xn-- form");
    }
    let name = name.to_ascii_lowercase();
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label");
        }
        if label.len() > MAX_LABEL {
            return Err("a label is longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("labels may only hold letters, digits and '-'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starts or ends with '-'");
        }
    }
    let last = name.rsplit('.').next().unwrap_or_default();
    if last.bytes().all(|b| b.is_ascii_digit()) || (last.starts_with("0x") && name.contains('.')) {
        return Err("looks like an IP address: write addresses as CIDRs, e.g. 10.0.0.1/32");
    }
    Ok(name)
}

/// An IP network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix` (host bits must be zero) or a bare address (a single host).
    pub(crate) fn parse(text: &str) -> Result<Self, PolicyError> {
        let invalid = |why: &str| bad(format!("invalid CIDR {text:?}: {why}"));
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| invalid("not an IPv4 or IPv6 address"))?;
        let max = max_prefix(addr);
        let prefix = match prefix {
            None => max,
            Some(p) => {
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid("the prefix length must be a number"));
                }
                p.parse::<u8>()
                    .ok()
                    .filter(|n| *n <= max)
                    .ok_or_else(|| invalid(&format!("the prefix length must be 0 to {max}")))?
            }
        };
        let cidr = Self { addr, prefix };
        if cidr.network() != addr {
            return Err(invalid(&format!(
                "host bits are set (did you mean {}/{prefix}?)",
                cidr.network()
            )));
        }
        Ok(cidr)
    }

    const fn v4(a: [u8; 4], prefix: u8) -> Self {
        Self {
            addr: IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
            prefix,
        }
    }

    const fn v6(segments: [u16; 8], prefix: u8) -> Self {
        let [a, b, c, d, e, f, g, h] = segments;
        Self {
            addr: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)),
            prefix,
        }
    }

    fn bits(addr: IpAddr) -> u128 {
        match addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        }
    }

    fn mask(&self) -> u128 {
        let width = u32::from(max_prefix(self.addr));
        let prefix = u32::from(self.prefix);
        if prefix == 0 {
            0
        } else {
            let ones = u128::MAX << (128 - prefix);
            ones >> (128 - width)
        }
    }

    fn network(&self) -> IpAddr {
        let bits = Self::bits(self.addr) & self.mask();
        match self.addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(bits as u32)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(bits)),
        }
    }

    /// Whether `addr` (already unmapped, see [`canonical`]) is inside.
    pub(crate) fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.addr.is_ipv4()
            && Self::bits(addr) & self.mask() == Self::bits(self.addr) & self.mask()
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) is that IPv4 address: the kernel
/// connects to it as such, so it is judged as such.
pub(crate) fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Ranges never reached unless the policy has a CIDR inside them: the host itself, its
/// private networks, link-local (cloud metadata at 169.254.169.254), and addresses that are
/// not a single unicast peer.
const DENIED_RANGES: &[(Cidr, &str)] = &[
    (Cidr::v4([0, 0, 0, 0], 8), "unspecified"),
    (Cidr::v4([10, 0, 0, 0], 8), "private"),
    (Cidr::v4([100, 64, 0, 0], 10), "shared address space"),
    (Cidr::v4([192, 0, 0, 0], 24), "IETF protocol assignments"),
    (Cidr::v4([198, 18, 0, 0], 15), "benchmarking"),
    (Cidr::v4([127, 0, 0, 0], 8), "loopback"),
    (Cidr::v4([169, 254, 0, 0], 16), "link-local"),
    (Cidr::v4([172, 16, 0, 0], 12), "private"),
    (Cidr::v4([192, 168, 0, 0], 16), "private"),
    (Cidr::v4([224, 0, 0, 0], 4), "multicast"),
    (Cidr::v4([240, 0, 0, 0], 4), "reserved"),
    (Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified"),
    (Cidr::v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback"),
    (Cidr::v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96), "NAT64"),
    (
        Cidr::v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
        "local NAT64",
    ),
    (Cidr::v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32), "Teredo"),
    (Cidr::v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16), "6to4"),
    (Cidr::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), "private"),
    (Cidr::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    (Cidr::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
];

/// The IPv4 address an IPv4-compatible IPv6 address (`::a.b.c.d`, deprecated) embeds;
/// `None` for other addresses, `::` and `::1` included.
fn ipv4_compatible(addr: IpAddr) -> Option<Ipv4Addr> {
    match addr {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = Ipv4Addr::from(u32::from(s[6]) << 16 | u32::from(s[7]));
            (s[..6].iter().all(|x| *x == 0) && u32::from(embedded) > 1).then_some(embedded)
        }
        IpAddr::V4(_) => None,
    }
}

/// The address the never-reached ranges judge `addr` as: [`canonical`], and an
/// IPv4-compatible address (`::a.b.c.d`) as the IPv4 address it embeds, like a mapped one.
fn judged(addr: IpAddr) -> IpAddr {
    let addr = canonical(addr);
    ipv4_compatible(addr).map_or(addr, IpAddr::V4)
}

/// The host's own addresses from the text of `/proc/net/fib_trie` (IPv4: the `/32 host
/// LOCAL` entries) and `/proc/net/if_inet6` (IPv6: the first field of each line).
pub(crate) fn parse_host_addresses(fib_trie: &str, if_inet6: &str) -> Vec<IpAddr> {
    let mut found: Vec<IpAddr> = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in fib_trie.lines() {
        let line = line.trim();
        if let Some(ip) = line.strip_prefix("|-- ") {
            last = ip.trim().parse().ok();
        } else if line.starts_with("/32 host LOCAL") {
            if let Some(ip) = last.take() {
                found.push(IpAddr::V4(ip));
            }
        }
    }
    for line in if_inet6.lines() {
        let Some(hex) = line.split_whitespace().next() else {
            continue;
        };
        if hex.len() == 32 {
            if let Ok(bits) = u128::from_str_radix(hex, 16) {
                found.push(IpAddr::V6(Ipv6Addr::from(bits)));
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// The never-reached range holding `addr`, if any.
pub(crate) fn denied_range(addr: IpAddr) -> Option<(Cidr, &'static str)> {
    let addr = judged(addr);
    DENIED_RANGES
        .iter()
        .find(|(range, _)| range.contains(addr))
        .copied()
}

/// A secret, compiled: the ready header.
#[derive(Clone)]
pub(crate) struct Secret {
    hosts: Vec<DomainRule>,
    header: HeaderName,
    value: HeaderValue,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("hosts", &self.hosts)
            .field("header", &self.header)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// Headers a secret may not be sent in: they frame or route the request.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "expect",
];

/// Where a connection goes, as the client named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A domain name (normalized).
    Name(String),
    /// An IP literal.
    Ip(IpAddr),
}

impl Target {
    /// Parses the host of a request (`example.com`, `1.2.3.4`, `[::1]`, `::1`).
    pub(crate) fn parse(host: &str) -> Result<Self, String> {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(Self::Ip(canonical(ip)));
        }
        normalize_domain(host)
            .map(Self::Name)
            .map_err(|why| format!("invalid host name {host:?}: {why}"))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Name(name) => f.write_str(name),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// A checked policy, ready to decide connections.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    mode: Mode,
    domains: Vec<DomainRule>,
    nets: Vec<Cidr>,
    secrets: Vec<Secret>,
    /// The normalized body (values included: this is what is stored).
    body: PolicyBody,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            mode: Mode::None,
            domains: Vec::new(),
            nets: Vec::new(),
            secrets: Vec::new(),
            body: PolicyBody::default(),
        }
    }
}

impl Policy {
    /// Checks and compiles `body`; every refusal names what is wrong (never a secret value).
    pub(crate) fn compile(body: PolicyBody) -> Result<Self, PolicyError> {
        if body.allow.len() > MAX_ALLOW {
            return Err(bad(format!(
                "too many allow rules: {} given, at most {MAX_ALLOW}",
                body.allow.len()
            )));
        }
        if body.secrets.len() > MAX_SECRETS {
            return Err(bad(format!(
                "too many secrets: {} given, at most {MAX_SECRETS}",
                body.secrets.len()
            )));
        }
        if body.mode == Mode::None && !body.allow.is_empty() {
            return Err(bad(
                "allow rules need mode \"allowlist\" (or \"open\" for CIDRs): mode \"none\" allows nothing",
            ));
        }
        let mut domains = Vec::new();
        let mut nets = Vec::new();
        let mut allow = Vec::new();
        for rule in &body.allow {
            let looks_like_address =
                rule.contains('/') || rule.contains(':') || rule.parse::<IpAddr>().is_ok();
            if looks_like_address {
                let cidr = Cidr::parse(rule)?;
                allow.push(cidr.to_string());
                nets.push(cidr);
            } else {
                let domain = DomainRule::parse(rule)?;
                allow.push(domain.text());
                domains.push(domain);
            }
        }
        if body.mode == Mode::Open && !domains.is_empty() {
            return Err(bad(
                "domain rules have no use in mode \"open\" (every public name is reachable): give only CIDRs there",
            ));
        }
        let mut secrets = Vec::new();
        let mut stored = Vec::new();
        for secret in &body.secrets {
            let (compiled, normalized) = compile_secret(secret, body.mode, &domains)?;
            if stored
                .iter()
                .any(|s: &SecretBody| s.name == normalized.name)
            {
                return Err(bad(format!("two secrets are named {:?}", secret.name)));
            }
            secrets.push(compiled);
            stored.push(normalized);
        }
        Ok(Self {
            mode: body.mode,
            domains,
            nets,
            secrets,
            body: PolicyBody {
                mode: body.mode,
                allow,
                secrets: stored,
            },
        })
    }

    /// Its mode.
    pub(crate) fn mode(&self) -> Mode {
        self.mode
    }

    /// The checked body, secret values included: for storage only.
    pub(crate) fn stored(&self) -> &PolicyBody {
        &self.body
    }

    /// Whether it has any secret.
    pub(crate) fn has_secrets(&self) -> bool {
        !self.secrets.is_empty()
    }

    /// What the API shows: no secret values.
    pub(crate) fn view(&self) -> PolicyView {
        PolicyView {
            mode: self.body.mode,
            allow: self.body.allow.clone(),
            secrets: self
                .body
                .secrets
                .iter()
                .map(|s| SecretView {
                    name: s.name.clone(),
                    hosts: s.hosts.clone(),
                    header: s.header.clone(),
                    format: s.format.clone(),
                })
                .collect(),
        }
    }

    /// Step 1: may the client's named target be reached at all? Decided on the name alone.
    pub(crate) fn check_target(&self, target: &Target) -> Result<(), String> {
        match (self.mode, target) {
            (Mode::None, _) => Err("network policy is none".into()),
            (Mode::Open, _) => Ok(()),
            (Mode::Allowlist, Target::Name(name)) => {
                if self.domains.iter().any(|rule| rule.matches(name)) {
                    Ok(())
                } else {
                    Err(format!("host {name} is not in the allowlist"))
                }
            }
            (Mode::Allowlist, Target::Ip(ip)) => {
                if self.nets.iter().any(|net| net.contains(*ip)) {
                    Ok(())
                } else {
                    Err(format!("address {ip} is not in the allowlist"))
                }
            }
        }
    }

    /// Step 2: may this address be connected to? `pinned`: the operator fixed it for the name
    /// (`--egress-resolve`), so the never-reached ranges and the host's addresses do not
    /// apply. `server`: the openrun server's own address, never reachable. `host`: the host's
    /// own interface addresses, reached (on any port) only when a CIDR of that one address
    /// (`/32`, `/128`) allows it.
    pub(crate) fn check_addr(
        &self,
        addr: SocketAddr,
        pinned: bool,
        server: Option<SocketAddr>,
        host: &[IpAddr],
    ) -> Result<(), String> {
        let ip = canonical(addr.ip());
        if let Some(server) = server {
            let server_ip = canonical(server.ip());
            if server.port() == addr.port() && (server_ip == ip || server_ip.is_unspecified()) {
                return Err(format!(
                    "{ip} port {} is the openrun server itself",
                    addr.port()
                ));
            }
        }
        if pinned {
            return Ok(());
        }
        let judged = judged(ip);
        if let Some((range, what)) = denied_range(judged) {
            // Only a CIDR inside the range opens it: `0.0.0.0/0` means "the internet", not
            // "and the metadata service too".
            let opened = self
                .nets
                .iter()
                .any(|net| net.contains(judged) && net.prefix >= range.prefix);
            if !opened {
                return Err(format!(
                    "address {ip} is {what} ({range}): allow it with a CIDR inside that range"
                ));
            }
        }
        if host.contains(&judged) || host.contains(&ip) {
            let opened = self
                .nets
                .iter()
                .any(|net| net.contains(judged) && net.prefix == max_prefix(judged));
            if !opened {
                return Err(format!(
                    "address {ip} is one of the host's own addresses: allow it with a CIDR of that address alone ({judged}/{})",
                    max_prefix(judged)
                ));
            }
        }
        Ok(())
    }

    /// The headers to set on a request to `host` (a normalized name): `(name, value)`, later
    /// ones replacing earlier ones of the same name.
    pub(crate) fn secrets_for(&self, host: &str) -> Vec<(HeaderName, HeaderValue)> {
        self.secrets
            .iter()
            .filter(|s| s.hosts.iter().any(|rule| rule.matches(host)))
            .map(|s| (s.header.clone(), s.value.clone()))
            .collect()
    }

    /// Names of the secrets bound to `host` (for events: never the values).
    pub(crate) fn secret_names_for(&self, host: &str) -> Vec<String> {
        self.secrets
            .iter()
            .zip(&self.body.secrets)
            .filter(|(s, _)| s.hosts.iter().any(|rule| rule.matches(host)))
            .map(|(_, body)| body.name.clone())
            .collect()
    }
}

/// Checks one secret against the policy's `mode` and `domains`; returns it compiled and
/// normalized.
fn compile_secret(
    secret: &SecretBody,
    mode: Mode,
    domains: &[DomainRule],
) -> Result<(Secret, SecretBody), PolicyError> {
    let name = &secret.name;
    let name_ok = (1..=MAX_SECRET_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !name_ok {
        return Err(bad(format!(
            "invalid secret name {name:?}: expected 1 to {MAX_SECRET_NAME} characters from A-Za-z0-9._-"
        )));
    }
    if mode == Mode::None {
        return Err(bad(format!(
            "secret {name} can never be sent: mode \"none\" allows no connection"
        )));
    }
    if secret.value.is_empty() || secret.value.len() > MAX_SECRET_VALUE {
        return Err(bad(format!(
            "secret {name}: the value must be 1 to {MAX_SECRET_VALUE} bytes"
        )));
    }
    if secret.value.chars().any(char::is_control) {
        return Err(bad(format!(
            "secret {name}: the value must not hold control characters"
        )));
    }
    if secret.hosts.is_empty() {
        return Err(bad(format!(
            "secret {name} is bound to no host: give the hosts it is sent to"
        )));
    }
    if secret.hosts.len() > MAX_SECRET_HOSTS {
        return Err(bad(format!(
            "secret {name}: at most {MAX_SECRET_HOSTS} hosts"
        )));
    }
    let mut hosts = Vec::new();
    for host in &secret.hosts {
        if host.parse::<IpAddr>().is_ok() || host.contains(['/', ':', '[']) {
            return Err(bad(format!(
                "secret {name}: host {host:?} must be a domain name, not an address"
            )));
        }
        let rule = DomainRule::parse(host).map_err(|e| bad(format!("secret {name}: {e}")))?;
        if mode == Mode::Allowlist && !domains.iter().any(|d| d.covers(&rule)) {
            return Err(bad(format!(
                "secret {name} is bound to {}, which the allowlist does not allow: add it to allow",
                rule.text()
            )));
        }
        hosts.push(rule);
    }
    let header = HeaderName::from_bytes(secret.header.as_bytes()).map_err(|_| {
        bad(format!(
            "secret {name}: invalid header name {:?}",
            secret.header
        ))
    })?;
    if RESERVED_HEADERS.contains(&header.as_str()) || header.as_str().starts_with("proxy-") {
        return Err(bad(format!(
            "secret {name}: header {header} frames or routes the request and cannot carry a secret"
        )));
    }
    if secret.format.matches(VALUE_PLACEHOLDER).count() != 1 {
        return Err(bad(format!(
            "secret {name}: format must hold {VALUE_PLACEHOLDER} exactly once"
        )));
    }
    let formatted = secret.format.replace(VALUE_PLACEHOLDER, &secret.value);
    let mut value = HeaderValue::from_str(&formatted).map_err(|_| {
        bad(format!(
            "secret {name}: format and value do not make a valid header value (visible ASCII and spaces only)"
        ))
    })?;
    value.set_sensitive(true);
    let normalized = SecretBody {
        name: name.clone(),
        value: secret.value.clone(),
        hosts: hosts.iter().map(DomainRule::text).collect(),
        header: header.as_str().to_string(),
        format: secret.format.clone(),
    };
    Ok((
        Secret {
            hosts,
            header,
            value,
        },
        normalized,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: serde_json::Value) -> Result<Policy, PolicyError> {
        Policy::compile(serde_json::from_value(json).expect("policy JSON"))
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("socket address")
    }

    #[test]
    fn domains_are_checked_and_normalized() {
        assert_eq!(normalize_domain("Example.COM.").unwrap(), "example.com");
        assert_eq!(
            normalize_domain("xn--bcher-kva.de").unwrap(),
            "xn--bcher-kva.de"
        );
        assert_eq!(normalize_domain("localhost").unwrap(), "localhost");
        for bad in [
            "",
            ".",
            "a..b",
            "-a.com",
            "a-.com",
            "a_b.com",
            "bücher.de",
            "a b.com",
            "1.2.3.4",
            "999.1.1.1",
            "a.0x7f",
            "example.com/x",
            "*.com",
        ] {
            assert!(normalize_domain(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("{}.com", "a".repeat(64));
        assert!(normalize_domain(&long).is_err());
        let total = vec!["a".repeat(60); 5].join(".");
        assert!(normalize_domain(&total).is_err());
    }

    #[test]
    fn cidrs_are_checked() {
        assert_eq!(Cidr::parse("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(
            Cidr::parse("127.0.0.1").unwrap().to_string(),
            "127.0.0.1/32"
        );
        assert_eq!(Cidr::parse("::1").unwrap().to_string(), "::1/128");
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
        assert_eq!(Cidr::parse("fd00::/8").unwrap().to_string(), "fd00::/8");
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0.1/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0/8",
            "300.0.0.0/8",
            "10.0.0.0/8/8",
            "fe80::1%eth0/64",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?} accepted");
        }
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.255.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(!net.contains("::ffff:10.1.0.1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn none_denies_everything_before_looking_at_the_host() {
        let p = Policy::default();
        assert_eq!(
            p.check_target(&Target::Name("example.com".into())),
            Err("network policy is none".into())
        );
        assert!(p
            .check_target(&Target::Ip("8.8.8.8".parse().unwrap()))
            .is_err());
    }

    #[test]
    fn allowlist_matches_names_and_wildcards_on_label_boundaries() {
        let p = policy(serde_json::json!({
            "mode": "allowlist",
            "allow": ["Example.com", "*.pypi.org", "10.0.0.0/8"]
        }))
        .unwrap();
        let ok = |h: &str| p.check_target(&Target::parse(h).unwrap()).is_ok();
        assert!(ok("example.com"));
        assert!(ok("EXAMPLE.com."));
        assert!(!ok("www.example.com"), "an exact rule is not a wildcard");
        assert!(ok("files.pypi.org"));
        assert!(ok("a.b.pypi.org"));
        assert!(!ok("pypi.org"), "*.x does not match x itself");
        assert!(
            !ok("evilpypi.org"),
            "the wildcard stops at a label boundary"
        );
        assert!(!ok("pypi.org.evil.com"));
        assert!(ok("10.2.3.4"));
        assert!(!ok("11.0.0.1"));
        assert!(ok("[::ffff:10.0.0.1]"), "mapped IPv6 is the IPv4 address");
        assert_eq!(p.view().allow, ["example.com", "*.pypi.org", "10.0.0.0/8"]);
    }

    #[test]
    fn private_loopback_and_metadata_addresses_need_a_cidr_inside_their_range() {
        let p = policy(serde_json::json!({"mode": "open", "allow": ["0.0.0.0/0"]})).unwrap();
        assert!(p
            .check_addr(addr("93.184.216.34:443"), false, None, &[])
            .is_ok());
        for denied in [
            "127.0.0.1:80",
            "127.8.9.1:80",
            "169.254.169.254:80",
            "10.1.2.3:80",
            "192.168.1.1:80",
            "172.20.0.1:80",
            "0.0.0.0:80",
            "224.0.0.1:80",
            "[::1]:80",
            "[::]:80",
            "[fe80::1]:80",
            "[fd00::1]:80",
            "[::ffff:127.0.0.1]:80",
            "[::ffff:169.254.169.254]:80",
            "[64:ff9b::7f00:1]:80",
            "192.0.0.8:80",
            "198.18.0.1:80",
            "198.19.255.254:80",
            "[64:ff9b:1::a00:1]:80",
            "[2002:a9fe:a9fe::1]:80",
            "[2001:0:4136:e378::1]:80",
            "[::127.0.0.1]:80",
            "[::169.254.169.254]:80",
            "[::10.0.0.1]:80",
        ] {
            assert!(
                p.check_addr(addr(denied), false, None, &[]).is_err(),
                "{denied} allowed by 0.0.0.0/0"
            );
        }
        let p =
            policy(serde_json::json!({"mode": "allowlist", "allow": ["127.0.0.1/32", "x.test"]}))
                .unwrap();
        assert!(p
            .check_addr(addr("127.0.0.1:8080"), false, None, &[])
            .is_ok());
        assert!(p
            .check_addr(addr("127.0.0.2:8080"), false, None, &[])
            .is_err());
        assert!(p
            .check_addr(addr("[::ffff:127.0.0.1]:8080"), false, None, &[])
            .is_ok());
        // A pinned resolution is the operator's choice, but the server itself stays out.
        assert!(p.check_addr(addr("127.0.0.5:1"), true, None, &[]).is_ok());
        let server = Some(addr("127.0.0.1:7878"));
        assert!(p
            .check_addr(addr("127.0.0.1:7878"), true, server, &[])
            .is_err());
        assert!(p
            .check_addr(addr("127.0.0.1:7879"), false, server, &[])
            .is_ok());
        let any = Some(addr("0.0.0.0:7878"));
        assert!(p
            .check_addr(addr("127.0.0.1:7878"), false, any, &[])
            .is_err());
        // Public addresses outside the new ranges stay reachable.
        let open = policy(serde_json::json!({"mode": "open"})).unwrap();
        for ok in [
            "198.20.0.1:80",
            "192.0.1.1:80",
            "[2001:db9::1]:80",
            "[2003::1]:80",
        ] {
            assert!(open.check_addr(addr(ok), false, None, &[]).is_ok(), "{ok}");
        }
    }

    #[test]
    fn the_hosts_own_addresses_need_a_cidr_of_that_address_alone() {
        let host: Vec<IpAddr> = ["203.0.113.7", "2001:db8::7", "127.0.0.1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let open = policy(serde_json::json!({"mode": "open", "allow": ["0.0.0.0/0"]})).unwrap();
        for port in [22, 80, 7878, 65535] {
            let err = open
                .check_addr(SocketAddr::new(host[0], port), false, None, &host)
                .unwrap_err();
            assert!(err.contains("host's own addresses"), "{err}");
        }
        assert!(open
            .check_addr(addr("[2001:db8::7]:443"), false, None, &host)
            .is_err());
        assert!(open
            .check_addr(addr("[::ffff:203.0.113.7]:443"), false, None, &host)
            .is_err());
        assert!(open
            .check_addr(addr("203.0.113.8:443"), false, None, &host)
            .is_ok());
        let wide =
            policy(serde_json::json!({"mode": "open", "allow": ["203.0.113.0/24"]})).unwrap();
        assert!(wide
            .check_addr(addr("203.0.113.7:443"), false, None, &host)
            .is_err());
        let exact =
            policy(serde_json::json!({"mode": "open", "allow": ["203.0.113.7/32"]})).unwrap();
        assert!(exact
            .check_addr(addr("203.0.113.7:443"), false, None, &host)
            .is_ok());
        // Pinned by the operator: taken as given.
        assert!(open
            .check_addr(addr("203.0.113.7:443"), true, None, &host)
            .is_ok());
    }

    #[test]
    fn host_addresses_are_read_from_proc() {
        let fib_trie = "Main:
  +-- 0.0.0.0/0 3 0 5
        +-- 10.213.138.0/30 2 0 1
           |-- 10.213.138.0
              /30 link UNICAST
           |-- 10.213.138.1
              /32 host LOCAL
           |-- 10.213.138.3
              /32 link BROADCAST
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
Local:
           |-- 10.213.138.1
              /32 host LOCAL
";
        let if_inet6 = "00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000002 04 40 00 82     eth0
";
        let found: Vec<String> = parse_host_addresses(fib_trie, if_inet6)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(found, ["10.213.138.1", "127.0.0.1", "::1", "fd00::2"]);
    }

    #[test]
    fn bad_policies_are_refused_naming_the_problem() {
        let cases = [
            (
                serde_json::json!({"mode": "allowlist", "allow": ["exa mple.com"]}),
                "exa mple.com",
            ),
            (
                serde_json::json!({"mode": "allowlist", "allow": ["10.0.0.0/40"]}),
                "10.0.0.0/40",
            ),
            (
                serde_json::json!({"mode": "allowlist", "allow": ["1.2.3.4.5"]}),
                "1.2.3.4.5",
            ),
            (
                serde_json::json!({"allow": ["example.com"]}),
                "mode \"none\"",
            ),
            (
                serde_json::json!({"mode": "open", "allow": ["example.com"]}),
                "open",
            ),
            (
                serde_json::json!({"mode": "allowlist", "allow": ["a.test"],
                    "secrets": [{"name": "GH", "value": "v", "hosts": []}]}),
                "bound to no host",
            ),
            (
                serde_json::json!({"mode": "allowlist", "allow": ["a.test"],
                    "secrets": [{"name": "GH", "value": "v", "hosts": ["b.test"]}]}),
                "b.test",
            ),
            (
                serde_json::json!({"mode": "allowlist", "allow": ["a.test"],
                    "secrets": [{"name": "GH", "value": "v", "hosts": ["a.test"], "header": "Host"}]}),
                "host",
            ),
            (
                serde_json::json!({"mode": "allowlist", "allow": ["a.test"],
                    "secrets": [{"name": "GH", "value": "v", "hosts": ["a.test"], "format": "x"}]}),
                "{value}",
            ),
            (
                serde_json::json!({"mode": "allowlist", "allow": ["a.test"],
                    "secrets": [{"name": "GH", "value": "line\nbreak", "hosts": ["a.test"]}]}),
                "control",
            ),
            (
                serde_json::json!({"mode": "allowlist", "allow": ["a.test"],
                    "secrets": [{"name": "GH", "value": "", "hosts": ["a.test"]}]}),
                "1 to",
            ),
            (
                serde_json::json!({"mode": "none",
                    "secrets": [{"name": "GH", "value": "v", "hosts": ["a.test"]}]}),
                "none",
            ),
            (
                serde_json::json!({"mode": "allowlist", "allow": ["a.test"],
                    "secrets": [{"name": "A", "value": "v", "hosts": ["a.test"]},
                                {"name": "A", "value": "w", "hosts": ["a.test"]}]}),
                "two secrets",
            ),
        ];
        for (json, needle) in cases {
            let err = policy(json.clone()).expect_err(&json.to_string());
            assert!(err.0.contains(needle), "{json}: {err}");
            assert!(!err.0.contains("line\nbreak"), "a value leaked: {err}");
        }
        let many: Vec<String> = (0..=MAX_ALLOW).map(|i| format!("h{i}.test")).collect();
        let err = policy(serde_json::json!({"mode": "allowlist", "allow": many})).unwrap_err();
        assert!(err.0.contains("too many allow rules"), "{err}");
        assert!(serde_json::from_value::<PolicyBody>(serde_json::json!({"mode": "some"})).is_err());
    }

    #[test]
    fn secrets_bind_to_their_hosts_and_never_show_their_value() {
        let p = policy(serde_json::json!({
            "mode": "allowlist",
            "allow": ["api.github.com", "*.example.com"],
            "secrets": [
                {"name": "GH", "value": "s3cret", "hosts": ["api.github.com"]},
                {"name": "EX", "value": "k", "hosts": ["*.example.com"], "header": "X-Api-Key", "format": "{value}"}
            ]
        }))
        .unwrap();
        let gh = p.secrets_for("api.github.com");
        assert_eq!(gh.len(), 1);
        assert_eq!(gh[0].0, "authorization");
        assert_eq!(gh[0].1, "Bearer s3cret");
        assert!(gh[0].1.is_sensitive());
        assert!(p.secrets_for("github.com").is_empty());
        assert_eq!(p.secrets_for("a.example.com")[0].1, "k");
        assert_eq!(p.secret_names_for("a.example.com"), ["EX"]);
        let shown = serde_json::to_string(&p.view()).unwrap();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("\"GH\""));
        assert!(!format!("{p:?}").contains("s3cret"));
        let stored = serde_json::to_string(p.stored()).unwrap();
        let again = Policy::compile(serde_json::from_str(&stored).unwrap()).unwrap();
        assert_eq!(again.secrets_for("api.github.com")[0].1, "Bearer s3cret");
    }
}
