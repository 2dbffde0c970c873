//! The EC2-044 rule itself: what a security-group rule is once read from any input form, and how
//! one is judged.
//!
//! Every reader (AWS API JSON, CloudFormation, Terraform HCL, Terraform plan) turns its input into
//! [`SecurityGroupRule`]s with exactly one source each, so that each permission and each source is
//! judged on its own. Combining conditions across the rules of one group is what makes the AWS
//! CLI's `--filters` report false positives (ICMP from 10/8 in one permission plus TCP from 0/0 in
//! another is not ICMP from anywhere).

use std::{fmt, net::IpAddr, str::FromStr};

use serde::Serialize;

/// The Conformity rule id this audit implements.
pub const RULE_ID: &str = "EC2-044";
/// Conformity's name for the rule.
pub const RULE_NAME: &str = "Unrestricted ICMP access";
/// Conformity's risk level for the rule.
pub const SEVERITY: &str = "Medium";

/// Placeholder ranges used in remedies when the user gave no `--trusted-cidr`: documentation
/// ranges (RFC 5737, RFC 3849) that never route, so a copied command cannot open anything real.
pub const PLACEHOLDER_TRUSTED_V4: &str = "203.0.113.0/24";
pub const PLACEHOLDER_TRUSTED_V6: &str = "2001:db8::/32";

/// Where something was written: file as given on the command line and 1-based line (0 when not
/// known, e.g. for stdin without structure).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SourceLocation {
    pub file: String,
    pub line: usize,
}

impl fmt::Display for SourceLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file)
        } else {
            write!(f, "{}:{}", self.file, self.line)
        }
    }
}

/// An input that could not be read (syntax) or does not have the expected shape. The file's
/// other resources are still audited, and so are the other files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InputError {
    pub file: String,
    /// 1-based; 0 when not known.
    pub line: usize,
    /// 1-based; 0 when not known.
    pub column: usize,
    pub message: String,
    /// What to do about it.
    pub hint: String,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
            if self.column > 0 {
                write!(f, ":{}", self.column)?;
            }
        }
        write!(f, ": {}", self.message)?;
        if !self.hint.is_empty() {
            write!(f, " ({})", self.hint)?;
        }
        Ok(())
    }
}

/// What a reader got out of one input.
#[derive(Clone, Debug, Default)]
pub struct ReadOutcome {
    pub rules: Vec<SecurityGroupRule>,
    pub errors: Vec<InputError>,
}

impl ReadOutcome {
    pub fn error(&mut self, file: &str, line: usize, message: String, hint: &str) {
        self.errors.push(InputError {
            file: file.to_string(),
            line,
            column: 0,
            message,
            hint: hint.to_string(),
        });
    }
}

/// A value read from an input that may not be knowable before deployment.
#[derive(Clone, Debug, PartialEq)]
pub enum Resolved<T> {
    Known(T),
    /// Why the value cannot be known statically, phrased for the user ("Ref to parameter
    /// `AdminCidr`, which has no Default").
    Unknown(String),
}

impl<T> Resolved<T> {
    pub fn known(&self) -> Option<&T> {
        match self {
            Resolved::Known(v) => Some(v),
            Resolved::Unknown(_) => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

/// What a rule belongs to, in the terms of the input it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Resource {
    /// A live security group from `aws ec2 describe-security-groups` / `-rules`.
    AwsSecurityGroup {
        group_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        group_name: Option<String>,
        /// `sgr-…` when the input was `describe-security-group-rules`.
        #[serde(skip_serializing_if = "Option::is_none")]
        security_group_rule_id: Option<String>,
    },
    /// A CloudFormation resource by logical id.
    #[serde(rename = "cloudformation")]
    CloudFormation {
        logical_id: String,
        resource_type: String,
    },
    /// A Terraform resource by address (from HCL or from a plan).
    Terraform {
        address: String,
        resource_type: String,
        /// True when read from `terraform show -json` output rather than from `.tf` files.
        from_plan: bool,
    },
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::AwsSecurityGroup {
                group_id,
                group_name,
                security_group_rule_id,
            } => {
                write!(f, "{group_id}")?;
                if let Some(name) = group_name {
                    write!(f, " ({name})")?;
                }
                if let Some(rule) = security_group_rule_id {
                    write!(f, " {rule}")?;
                }
                Ok(())
            }
            Resource::CloudFormation { logical_id, .. } => write!(f, "{logical_id}"),
            Resource::Terraform { address, .. } => write!(f, "{address}"),
        }
    }
}

/// The IP protocol of a rule, normalised from the many spellings AWS accepts (`icmp`, `"1"`, `1`,
/// `icmpv6`, `"58"`, `58`, `-1`, `"-1"`, `all`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protocol {
    Icmp,
    Icmpv6,
    /// `-1`: every protocol, ICMP and ICMPv6 included.
    All,
    /// Anything else (tcp, udp, 50, …), kept as written for messages.
    Other(String),
}

impl Protocol {
    /// Interprets a protocol written as a name or a number, as AWS does (case-insensitively).
    pub fn from_spelling(raw: &str) -> Protocol {
        match raw.trim().to_ascii_lowercase().as_str() {
            "icmp" | "1" => Protocol::Icmp,
            "icmpv6" | "58" => Protocol::Icmpv6,
            "-1" | "all" => Protocol::All,
            other => Protocol::Other(other.to_string()),
        }
    }

    pub fn from_number(n: i64) -> Protocol {
        match n {
            1 => Protocol::Icmp,
            58 => Protocol::Icmpv6,
            -1 => Protocol::All,
            other => Protocol::Other(other.to_string()),
        }
    }

    /// The spelling AWS uses in `--ip-permissions`.
    pub fn aws_name(&self) -> &str {
        match self {
            Protocol::Icmp => "icmp",
            Protocol::Icmpv6 => "icmpv6",
            Protocol::All => "-1",
            Protocol::Other(s) => s,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::All => write!(f, "-1 (all traffic)"),
            other => write!(f, "{}", other.aws_name()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum IpFamily {
    #[serde(rename = "ipv4")]
    V4,
    #[serde(rename = "ipv6")]
    V6,
}

/// A CIDR source, kept as written (for messages and for revoke commands, which must name the
/// range exactly) with what matters for the rule: family and prefix length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub text: String,
    pub family: IpFamily,
    pub prefix_len: u8,
}

impl Cidr {
    /// A prefix length of 0 covers every address whatever the address bits are: `0.0.0.0/0`,
    /// `10.1.2.3/0`, `::/0`, `::0/0` and `0:0:0:0:0:0:0:0/0` all mean "anywhere".
    pub fn is_anywhere(&self) -> bool {
        self.prefix_len == 0
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Cidr, String> {
        let trimmed = text.trim();
        let Some((addr, len)) = trimmed.split_once('/') else {
            return Err(format!(
                "`{trimmed}` is not a CIDR block (expected address/prefix-length such as 10.0.0.0/8)"
            ));
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!("`{trimmed}` is not a CIDR block: `{addr}` is not an IP address")
        })?;
        let (family, max) = match addr {
            IpAddr::V4(_) => (IpFamily::V4, 32),
            IpAddr::V6(_) => (IpFamily::V6, 128),
        };
        let prefix_len: u8 = len.parse().ok().filter(|l| *l <= max).ok_or_else(|| {
            format!("`{trimmed}` is not a CIDR block: prefix length must be 0..={max}")
        })?;
        Ok(Cidr {
            text: trimmed.to_string(),
            family,
            prefix_len,
        })
    }
}

/// Where an ingress rule lets traffic come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Cidr(Cidr),
    /// Another security group (id, name or the group itself). Never "anywhere".
    SecurityGroup(String),
    /// A managed prefix list. Never "anywhere": it holds the ranges someone chose.
    PrefixList(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Cidr(c) => write!(f, "{}", c.text),
            Source::SecurityGroup(g) => write!(f, "security group {g}"),
            Source::PrefixList(p) => write!(f, "prefix list {p}"),
        }
    }
}

/// One permission with one source, in or out, from any input form.
#[derive(Clone, Debug, PartialEq)]
pub struct SecurityGroupRule {
    pub resource: Resource,
    pub location: SourceLocation,
    /// Where inside the resource, e.g. `IpPermissions[0].IpRanges[1]`, `SecurityGroupIngress[2]`,
    /// `ingress[0].cidr_blocks[1]`.
    pub rule_path: String,
    pub direction: Direction,
    pub protocol: Resolved<Protocol>,
    /// `None` when the input does not set it (normal for `-1` and for icmpv6 "all").
    pub from_port: Option<Resolved<i64>>,
    pub to_port: Option<Resolved<i64>>,
    pub source: Resolved<Source>,
    pub description: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum IcmpFamily {
    #[serde(rename = "icmp")]
    V4,
    #[serde(rename = "icmpv6")]
    V6,
}

impl fmt::Display for IcmpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IcmpFamily::V4 => "icmp",
            IcmpFamily::V6 => "icmpv6",
        })
    }
}

/// Which ICMP messages a rule opens. For ICMP, AWS stores the type in FromPort and the code in
/// ToPort, `-1` meaning "all"; these are not ports and are never compared as a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpSelector {
    AllTypes,
    Type(u8),
    TypeCode(u8, u8),
    /// Values AWS would reject (type 300, code -5); still reported, never exempt.
    Invalid {
        from: i64,
        to: i64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpRange {
    pub family: IcmpFamily,
    pub selector: IcmpSelector,
}

impl IcmpRange {
    /// From FromPort (type) and ToPort (code) as stored by AWS. A missing FromPort means all
    /// types (icmpv6 rules without ports allow every type); a missing ToPort means all codes.
    pub fn from_type_code(family: IcmpFamily, from: Option<i64>, to: Option<i64>) -> IcmpRange {
        let from = from.unwrap_or(-1);
        let to = to.unwrap_or(-1);
        let selector = match (from, to) {
            (-1, _) => IcmpSelector::AllTypes,
            (t @ 0..=255, -1) => IcmpSelector::Type(t as u8),
            (t @ 0..=255, c @ 0..=255) => IcmpSelector::TypeCode(t as u8, c as u8),
            (from, to) => IcmpSelector::Invalid { from, to },
        };
        IcmpRange { family, selector }
    }

    pub fn all(family: IcmpFamily) -> IcmpRange {
        IcmpRange {
            family,
            selector: IcmpSelector::AllTypes,
        }
    }

    /// FromPort/ToPort as AWS wants them back in `--ip-permissions`.
    pub fn aws_ports(&self) -> (i64, i64) {
        match self.selector {
            IcmpSelector::AllTypes => (-1, -1),
            IcmpSelector::Type(t) => (i64::from(t), -1),
            IcmpSelector::TypeCode(t, c) => (i64::from(t), i64::from(c)),
            IcmpSelector::Invalid { from, to } => (from, to),
        }
    }

    /// Whether the messages this rule opens include `(type, code)`.
    pub fn includes(&self, icmp_type: u8, code: u8) -> bool {
        match self.selector {
            IcmpSelector::AllTypes => true,
            IcmpSelector::Type(t) => t == icmp_type,
            IcmpSelector::TypeCode(t, c) => t == icmp_type && c == code,
            IcmpSelector::Invalid { .. } => false,
        }
    }
}

impl fmt::Display for IcmpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.selector {
            IcmpSelector::AllTypes => write!(f, "all types"),
            IcmpSelector::Type(t) => match icmp_type_name(self.family, t) {
                Some(name) => write!(f, "type {t} ({name}), all codes"),
                None => write!(f, "type {t}, all codes"),
            },
            IcmpSelector::TypeCode(t, c) => {
                match icmp_code_name(self.family, t, c).or_else(|| icmp_type_name(self.family, t)) {
                    Some(name) => write!(f, "type {t} code {c} ({name})"),
                    None => write!(f, "type {t} code {c}"),
                }
            }
            IcmpSelector::Invalid { from, to } => write!(
                f,
                "FromPort {from} / ToPort {to} (not a valid ICMP type/code; AWS rejects it)"
            ),
        }
    }
}

fn icmp_type_name(family: IcmpFamily, t: u8) -> Option<&'static str> {
    Some(match (family, t) {
        (IcmpFamily::V4, 0) => "echo reply",
        (IcmpFamily::V4, 3) => "destination unreachable",
        (IcmpFamily::V4, 4) => "source quench",
        (IcmpFamily::V4, 5) => "redirect",
        (IcmpFamily::V4, 8) => "echo request",
        (IcmpFamily::V4, 9) => "router advertisement",
        (IcmpFamily::V4, 10) => "router solicitation",
        (IcmpFamily::V4, 11) => "time exceeded",
        (IcmpFamily::V4, 12) => "parameter problem",
        (IcmpFamily::V4, 13) => "timestamp",
        (IcmpFamily::V4, 14) => "timestamp reply",
        (IcmpFamily::V6, 1) => "destination unreachable",
        (IcmpFamily::V6, 2) => "packet too big",
        (IcmpFamily::V6, 3) => "time exceeded",
        (IcmpFamily::V6, 4) => "parameter problem",
        (IcmpFamily::V6, 128) => "echo request",
        (IcmpFamily::V6, 129) => "echo reply",
        (IcmpFamily::V6, 133) => "router solicitation",
        (IcmpFamily::V6, 134) => "router advertisement",
        (IcmpFamily::V6, 135) => "neighbor solicitation",
        (IcmpFamily::V6, 136) => "neighbor advertisement",
        (IcmpFamily::V6, 137) => "redirect",
        _ => return None,
    })
}

fn icmp_code_name(family: IcmpFamily, t: u8, c: u8) -> Option<&'static str> {
    match (family, t, c) {
        (IcmpFamily::V4, 3, 4) => Some("fragmentation needed"),
        (IcmpFamily::V4, 3, 3) => Some("port unreachable"),
        _ => None,
    }
}

/// ICMP messages that may stay open from anywhere. By default those Path MTU Discovery needs:
/// blocking them breaks TCP over paths with a smaller MTU, and Kubernetes load balancers add
/// exactly these rules from 0.0.0.0/0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Exemption {
    pub family: IcmpFamily,
    pub icmp_type: u8,
    /// `None`: every code of the type.
    pub code: Option<u8>,
}

impl Exemption {
    /// ICMPv4 type 3 code 4 (fragmentation needed) and ICMPv6 type 2 (packet too big).
    pub fn path_mtu_discovery() -> [Exemption; 2] {
        [
            Exemption {
                family: IcmpFamily::V4,
                icmp_type: 3,
                code: Some(4),
            },
            Exemption {
                family: IcmpFamily::V6,
                icmp_type: 2,
                code: None,
            },
        ]
    }

    /// Whether this exemption alone covers every message `range` opens.
    pub fn covers(&self, range: &IcmpRange) -> bool {
        if self.family != range.family {
            return false;
        }
        match range.selector {
            IcmpSelector::AllTypes | IcmpSelector::Invalid { .. } => false,
            IcmpSelector::Type(t) => t == self.icmp_type && self.code.is_none(),
            IcmpSelector::TypeCode(t, c) => {
                t == self.icmp_type && self.code.is_none_or(|code| code == c)
            }
        }
    }
}

impl fmt::Display for Exemption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(c) => write!(f, "{}:{}:{c}", self.family, self.icmp_type),
            None => write!(f, "{}:{}", self.family, self.icmp_type),
        }
    }
}

impl FromStr for Exemption {
    type Err = String;

    /// `icmp:TYPE[:CODE]` or `icmpv6:TYPE[:CODE]`, e.g. `icmp:3:4`, `icmpv6:2`.
    fn from_str(s: &str) -> Result<Exemption, String> {
        let usage = "expected icmp:TYPE[:CODE] or icmpv6:TYPE[:CODE], e.g. icmp:3:4 or icmpv6:2";
        let mut parts = s.split(':');
        let family = match parts.next().map(str::to_ascii_lowercase).as_deref() {
            Some("icmp" | "icmpv4") => IcmpFamily::V4,
            Some("icmpv6") => IcmpFamily::V6,
            _ => return Err(format!("`{s}`: unknown ICMP family; {usage}")),
        };
        let number = |what: &str, v: Option<&str>| -> Result<Option<u8>, String> {
            match v {
                None => Ok(None),
                Some(v) => v
                    .parse::<u8>()
                    .map(Some)
                    .map_err(|_| format!("`{s}`: {what} `{v}` is not a number 0..=255; {usage}")),
            }
        };
        let icmp_type = number("type", parts.next())?
            .ok_or_else(|| format!("`{s}`: missing ICMP type; {usage}"))?;
        let code = number("code", parts.next())?;
        if parts.next().is_some() {
            return Err(format!("`{s}`: too many fields; {usage}"));
        }
        Ok(Exemption {
            family,
            icmp_type,
            code,
        })
    }
}

/// How a rule is judged, and how remedies are written.
#[derive(Clone, Debug)]
pub struct RuleOptions {
    pub exemptions: Vec<Exemption>,
    pub trusted_v4: String,
    pub trusted_v6: String,
    /// True when the user gave `--trusted-cidr`: remedies then need no placeholder warning.
    pub trusted_given: bool,
    pub region: Option<String>,
}

impl Default for RuleOptions {
    fn default() -> Self {
        RuleOptions {
            exemptions: Exemption::path_mtu_discovery().to_vec(),
            trusted_v4: PLACEHOLDER_TRUSTED_V4.to_string(),
            trusted_v6: PLACEHOLDER_TRUSTED_V6.to_string(),
            trusted_given: false,
            region: None,
        }
    }
}

impl RuleOptions {
    fn exempt(&self, range: &IcmpRange) -> Option<&Exemption> {
        self.exemptions.iter().find(|e| e.covers(range))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// ICMP is open from anywhere, beyond the exemptions.
    Fail,
    /// A value that decides it cannot be known statically; it may be open from anywhere.
    Unknown,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Fail => "FAIL",
            Status::Unknown => "UNKNOWN",
        })
    }
}

/// How to fix one finding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Remedy {
    pub summary: String,
    /// Shell commands (AWS API input only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
    /// The rule rewritten in the input's own language (templates only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snippet: Option<String>,
    /// Set when the commands or snippet use a placeholder range that must be replaced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placeholder: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub rule_id: &'static str,
    pub severity: &'static str,
    pub status: Status,
    pub resource: Resource,
    /// `resource` as one line, for people.
    pub resource_name: String,
    #[serde(flatten)]
    pub location: SourceLocation,
    pub rule_path: String,
    /// As normalised: `icmp`, `icmpv6`, `-1 (all traffic)`, or `unknown`.
    pub protocol: String,
    /// Which ICMP messages are open, e.g. "all types", "type 8 (echo request), all codes".
    pub opens: String,
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_description: Option<String>,
    pub reason: String,
    pub remedy: Remedy,
}

/// What judging one rule gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not EC2-044's business (egress, not ICMP, not from anywhere).
    Pass,
    /// ICMP from anywhere, but only messages that are exempt.
    Exempt(Exemption),
    Finding(Box<Finding>),
}

/// "Anywhere", as far as the source tells.
enum Reach<'a> {
    Anywhere(&'a Cidr),
    Maybe(&'a str),
}

/// Judges one rule against EC2-044.
pub fn evaluate(rule: &SecurityGroupRule, options: &RuleOptions) -> Verdict {
    if rule.direction == Direction::Egress {
        return Verdict::Pass;
    }
    let reach = match &rule.source {
        Resolved::Known(Source::Cidr(c)) if c.is_anywhere() => Reach::Anywhere(c),
        Resolved::Known(_) => return Verdict::Pass,
        Resolved::Unknown(why) => Reach::Maybe(why),
    };
    let source_family = match &rule.source {
        Resolved::Known(Source::Cidr(c)) => Some(c.family),
        _ => None,
    };
    let protocol = match &rule.protocol {
        Resolved::Known(Protocol::Other(_)) => return Verdict::Pass,
        Resolved::Known(p) => p,
        Resolved::Unknown(why) => {
            let why = format!("the protocol cannot be known statically: {why}");
            return Verdict::Finding(Box::new(unknown_finding(
                rule,
                "unknown".into(),
                "unknown".into(),
                why,
                options,
            )));
        }
    };
    // Which ICMP family the rule's types/codes are read in: the protocol's own, or for -1 the
    // source's (an IPv4 source lets ICMP in, an IPv6 source ICMPv6).
    let family = match protocol {
        Protocol::Icmp => IcmpFamily::V4,
        Protocol::Icmpv6 => IcmpFamily::V6,
        _ => match source_family {
            Some(IpFamily::V6) => IcmpFamily::V6,
            _ => IcmpFamily::V4,
        },
    };
    let range: Resolved<IcmpRange> = if *protocol == Protocol::All {
        // Ports are ignored for -1: everything is open.
        Resolved::Known(IcmpRange::all(family))
    } else {
        let port = |p: &Option<Resolved<i64>>, name: &str| match p {
            None => Ok(None),
            Some(Resolved::Known(v)) => Ok(Some(*v)),
            Some(Resolved::Unknown(why)) => {
                Err(format!("{name} cannot be known statically: {why}"))
            }
        };
        match (
            port(&rule.from_port, "the ICMP type (FromPort)"),
            port(&rule.to_port, "the ICMP code (ToPort)"),
        ) {
            (Ok(from), Ok(to)) => Resolved::Known(IcmpRange::from_type_code(family, from, to)),
            (Err(why), _) | (_, Err(why)) => Resolved::Unknown(why),
        }
    };
    let protocol_text = protocol.to_string();
    match (range, reach) {
        (Resolved::Known(range), reach) => {
            if let Some(exemption) = options.exempt(&range) {
                return Verdict::Exempt(*exemption);
            }
            match reach {
                Reach::Anywhere(cidr) => Verdict::Finding(Box::new(fail_finding(
                    rule, protocol, &range, cidr, options,
                ))),
                Reach::Maybe(why) => {
                    let why = format!(
                        "the source cannot be known statically: {why}; if it is a /0 range, this \
                         rule allows {protocol_text} {range} from anywhere"
                    );
                    Verdict::Finding(Box::new(unknown_finding(
                        rule,
                        protocol_text,
                        range.to_string(),
                        why,
                        options,
                    )))
                }
            }
        }
        (Resolved::Unknown(why), reach) => {
            // Unknown types matter only if an exemption could cover them; with none for this
            // family, ICMP from anywhere is a finding whatever the type is.
            let could_be_exempt = options.exemptions.iter().any(|e| e.family == family);
            match reach {
                Reach::Anywhere(cidr) if !could_be_exempt => {
                    let range = IcmpRange::all(family);
                    let mut f = fail_finding(rule, protocol, &range, cidr, options);
                    f.opens = format!("unknown types/codes ({why})");
                    Verdict::Finding(Box::new(f))
                }
                Reach::Anywhere(cidr) => {
                    let why = format!(
                        "{protocol_text} from {} (anywhere), but {why}, so whether it opens more \
                         than the exempt messages ({}) is unknown",
                        cidr.text,
                        exemption_list(options)
                    );
                    Verdict::Finding(Box::new(unknown_finding(
                        rule,
                        protocol_text,
                        "unknown".into(),
                        why,
                        options,
                    )))
                }
                Reach::Maybe(src_why) => {
                    let why =
                        format!("the source cannot be known statically ({src_why}), and {why}");
                    Verdict::Finding(Box::new(unknown_finding(
                        rule,
                        protocol_text,
                        "unknown".into(),
                        why,
                        options,
                    )))
                }
            }
        }
    }
}

fn exemption_list(options: &RuleOptions) -> String {
    if options.exemptions.is_empty() {
        "none".into()
    } else {
        options
            .exemptions
            .iter()
            .map(Exemption::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn source_text(rule: &SecurityGroupRule) -> String {
    match &rule.source {
        Resolved::Known(s) => s.to_string(),
        Resolved::Unknown(_) => "unknown".into(),
    }
}

fn fail_finding(
    rule: &SecurityGroupRule,
    protocol: &Protocol,
    range: &IcmpRange,
    cidr: &Cidr,
    options: &RuleOptions,
) -> Finding {
    let family_word = match cidr.family {
        IpFamily::V4 => "every IPv4 address",
        IpFamily::V6 => "every IPv6 address",
    };
    let mut reason = format!(
        "inbound {protocol} from {} (prefix length 0: {family_word}, i.e. anywhere) opens {} {range}",
        cidr.text, range.family
    );
    if *protocol == Protocol::All {
        reason.push_str(&format!(
            "; protocol -1 allows all traffic, which includes {}",
            range.family
        ));
    }
    if !options.exemptions.is_empty() {
        reason.push_str(&format!(
            "; that is more than the exempt messages ({})",
            exemption_list(options)
        ));
    }
    Finding {
        rule_id: RULE_ID,
        severity: SEVERITY,
        status: Status::Fail,
        resource: rule.resource.clone(),
        resource_name: rule.resource.to_string(),
        location: rule.location.clone(),
        rule_path: rule.rule_path.clone(),
        protocol: protocol.to_string(),
        opens: range.to_string(),
        source: cidr.text.clone(),
        source_description: rule.description.clone(),
        reason,
        remedy: remedy_for_fail(rule, protocol, range, cidr, options),
    }
}

fn unknown_finding(
    rule: &SecurityGroupRule,
    protocol: String,
    opens: String,
    reason: String,
    options: &RuleOptions,
) -> Finding {
    let summary = match &rule.resource {
        Resource::Terraform {
            from_plan: true, ..
        } => "The plan cannot tell this value before apply. Make the source a literal trusted \
             range or a security-group reference in the configuration, or audit the state after \
             apply (`aws ec2 describe-security-groups`)."
            .to_string(),
        Resource::Terraform { .. } => format!(
            "Give the value a static trusted range (e.g. {} or {}), a variable `default`, or \
             audit the plan instead (`terraform plan -out p && terraform show -json p > \
             plan.json`).",
            options.trusted_v4, options.trusted_v6
        ),
        Resource::CloudFormation { .. } => format!(
            "Give the value a static trusted range (e.g. {} or {}) or a parameter `Default`, \
             restrict the parameter with `AllowedPattern`, or audit the deployed group with \
             `aws ec2 describe-security-groups`.",
            options.trusted_v4, options.trusted_v6
        ),
        Resource::AwsSecurityGroup { .. } => {
            "Check this rule in the console or with `aws ec2 describe-security-group-rules`."
                .to_string()
        }
    };
    Finding {
        rule_id: RULE_ID,
        severity: SEVERITY,
        status: Status::Unknown,
        resource: rule.resource.clone(),
        resource_name: rule.resource.to_string(),
        location: rule.location.clone(),
        rule_path: rule.rule_path.clone(),
        protocol,
        opens,
        source: source_text(rule),
        source_description: rule.description.clone(),
        reason,
        remedy: Remedy {
            summary,
            commands: vec![],
            snippet: None,
            placeholder: (!options.trusted_given).then(|| placeholder_note(options, None)),
        },
    }
}

fn placeholder_note(options: &RuleOptions, family: Option<IpFamily>) -> String {
    let ranges = match family {
        Some(IpFamily::V4) => format!("{} is a placeholder", options.trusted_v4),
        Some(IpFamily::V6) => format!("{} is a placeholder", options.trusted_v6),
        None => format!(
            "{} and {} are placeholders",
            options.trusted_v4, options.trusted_v6
        ),
    };
    format!(
        "{ranges} (documentation ranges route nowhere): put your trusted range there, or pass \
         --trusted-cidr"
    )
}

/// The replacement rule keeps the ICMP messages the original opened (all ICMP for a `-1` rule,
/// whose non-ICMP traffic needs rules of its own) but only from a trusted range.
fn replacement(protocol: &Protocol, range: &IcmpRange) -> (&'static str, i64, i64) {
    let name = match range.family {
        IcmpFamily::V4 => "icmp",
        IcmpFamily::V6 => "icmpv6",
    };
    if *protocol == Protocol::All {
        (name, -1, -1)
    } else {
        let (from, to) = range.aws_ports();
        (name, from, to)
    }
}

fn remedy_for_fail(
    rule: &SecurityGroupRule,
    protocol: &Protocol,
    range: &IcmpRange,
    cidr: &Cidr,
    options: &RuleOptions,
) -> Remedy {
    let trusted = match cidr.family {
        IpFamily::V4 => &options.trusted_v4,
        IpFamily::V6 => &options.trusted_v6,
    };
    let (new_proto, new_from, new_to) = replacement(protocol, range);
    // Revoking a rule that opened Path MTU Discovery would break TCP over small-MTU paths unless
    // the exempt messages are re-opened on their own.
    let keep_open: Vec<&Exemption> = options
        .exemptions
        .iter()
        .filter(|e| e.family == range.family && range.includes(e.icmp_type, e.code.unwrap_or(0)))
        .collect();
    let mut summary = format!(
        "Allow {new_proto} only from trusted ranges (or from a security group) instead of {}",
        cidr.text
    );
    if *protocol == Protocol::All {
        summary.push_str(
            "; this -1 rule also opens every other protocol from anywhere, so add rules for the \
             ports you need from their own sources",
        );
    }
    if !keep_open.is_empty() {
        summary.push_str(&format!(
            "; keep {} open from anywhere so Path MTU Discovery keeps working",
            keep_open
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    summary.push('.');
    let placeholder =
        (!options.trusted_given).then(|| placeholder_note(options, Some(cidr.family)));
    match &rule.resource {
        Resource::AwsSecurityGroup {
            group_id,
            security_group_rule_id,
            ..
        } => {
            let region = options
                .region
                .as_ref()
                .map(|r| format!(" --region {r}"))
                .unwrap_or_default();
            let ranges = |c: &str, family: IpFamily, desc: Option<&str>| {
                let desc = desc
                    .map(|d| format!(",Description=\"{d}\""))
                    .unwrap_or_default();
                match family {
                    IpFamily::V4 => format!("IpRanges=[{{CidrIp={c}{desc}}}]"),
                    IpFamily::V6 => format!("Ipv6Ranges=[{{CidrIpv6={c}{desc}}}]"),
                }
            };
            let perm = |proto: &str, from: Option<(i64, i64)>, src: String| match from {
                Some((f, t)) => format!("IpProtocol={proto},FromPort={f},ToPort={t},{src}"),
                None => format!("IpProtocol={proto},{src}"),
            };
            let revoke = match security_group_rule_id {
                Some(sgr) => format!(
                    "aws ec2 revoke-security-group-ingress{region} --group-id {group_id} \
                     --security-group-rule-ids {sgr}"
                ),
                None => {
                    let ports = match protocol {
                        Protocol::All => None,
                        _ => Some(raw_ports(rule)),
                    };
                    format!(
                        "aws ec2 revoke-security-group-ingress{region} --group-id {group_id} \
                         --ip-permissions '{}'",
                        perm(
                            protocol.aws_name(),
                            ports,
                            ranges(&cidr.text, cidr.family, None)
                        )
                    )
                }
            };
            let mut commands = vec![revoke];
            commands.push(format!(
                "aws ec2 authorize-security-group-ingress{region} --group-id {group_id} \
                 --ip-permissions '{}'",
                perm(
                    new_proto,
                    Some((new_from, new_to)),
                    ranges(trusted, cidr.family, Some("trusted range"))
                )
            ));
            for e in keep_open {
                let (f, t) = (i64::from(e.icmp_type), e.code.map_or(-1, i64::from));
                commands.push(format!(
                    "aws ec2 authorize-security-group-ingress{region} --group-id {group_id} \
                     --ip-permissions '{}'",
                    perm(
                        &e.family.to_string(),
                        Some((f, t)),
                        ranges(&cidr.text, cidr.family, Some("Path MTU Discovery"))
                    )
                ));
            }
            Remedy {
                summary,
                commands,
                snippet: None,
                placeholder,
            }
        }
        Resource::CloudFormation { resource_type, .. } => {
            let key = match cidr.family {
                IpFamily::V4 => "CidrIp",
                IpFamily::V6 => "CidrIpv6",
            };
            // A list item of SecurityGroupIngress, or the Properties of a standalone
            // AWS::EC2::SecurityGroupIngress.
            let (first, rest) = if resource_type == "AWS::EC2::SecurityGroup" {
                ("- ", "  ")
            } else {
                ("", "")
            };
            let mut snippet = format!(
                "{first}IpProtocol: {new_proto}\n{rest}FromPort: {new_from}\n{rest}ToPort: {new_to}\n{rest}{key}: {trusted}"
            );
            if placeholder.is_some() {
                snippet.push_str("  # placeholder: your trusted range");
            }
            for e in keep_open {
                if first.is_empty() {
                    snippet.push_str("\n# and, in a second AWS::EC2::SecurityGroupIngress:");
                }
                snippet.push_str(&format!(
                    "\n{first}IpProtocol: {}\n{rest}FromPort: {}\n{rest}ToPort: {}\n{rest}{key}: {}\n{rest}Description: Path MTU Discovery",
                    e.family,
                    e.icmp_type,
                    e.code.map_or(-1, i64::from),
                    cidr.text
                ));
            }
            Remedy {
                summary,
                commands: vec![],
                snippet: Some(snippet),
                placeholder,
            }
        }
        Resource::Terraform { resource_type, .. } => {
            let standalone = resource_type == "aws_vpc_security_group_ingress_rule";
            let comment = if placeholder.is_some() {
                " # placeholder: your trusted range"
            } else {
                ""
            };
            let source_attr = match (standalone, cidr.family) {
                (true, IpFamily::V4) => format!("cidr_ipv4   = \"{trusted}\"{comment}"),
                (true, IpFamily::V6) => format!("cidr_ipv6   = \"{trusted}\"{comment}"),
                (false, IpFamily::V4) => format!("cidr_blocks = [\"{trusted}\"]{comment}"),
                (false, IpFamily::V6) => format!("ipv6_cidr_blocks = [\"{trusted}\"]{comment}"),
            };
            let proto_attr = if standalone {
                "ip_protocol"
            } else {
                "protocol   "
            };
            let mut snippet = format!(
                "{proto_attr} = \"{new_proto}\"\nfrom_port   = {new_from}\nto_port     = {new_to}\n{source_attr}"
            );
            for e in keep_open {
                let anywhere = match (standalone, cidr.family) {
                    (true, IpFamily::V4) => format!("cidr_ipv4   = \"{}\"", cidr.text),
                    (true, IpFamily::V6) => format!("cidr_ipv6   = \"{}\"", cidr.text),
                    (false, IpFamily::V4) => format!("cidr_blocks = [\"{}\"]", cidr.text),
                    (false, IpFamily::V6) => format!("ipv6_cidr_blocks = [\"{}\"]", cidr.text),
                };
                snippet.push_str(&format!(
                    "\n# and keep Path MTU Discovery open in a rule of its own:\n{proto_attr} = \"{}\"\nfrom_port   = {}\nto_port     = {}\n{anywhere}",
                    e.family,
                    e.icmp_type,
                    e.code.map_or(-1, i64::from),
                ));
            }
            Remedy {
                summary,
                commands: vec![],
                snippet: Some(snippet),
                placeholder,
            }
        }
    }
}

/// FromPort/ToPort exactly as the rule stores them, for revoke commands (which must match).
fn raw_ports(rule: &SecurityGroupRule) -> (i64, i64) {
    let get = |p: &Option<Resolved<i64>>| match p {
        Some(Resolved::Known(v)) => *v,
        _ => -1,
    };
    (get(&rule.from_port), get(&rule.to_port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        protocol: Protocol,
        from: Option<i64>,
        to: Option<i64>,
        src: &str,
    ) -> SecurityGroupRule {
        SecurityGroupRule {
            resource: Resource::AwsSecurityGroup {
                group_id: "sg-1".into(),
                group_name: None,
                security_group_rule_id: None,
            },
            location: SourceLocation::default(),
            rule_path: String::new(),
            direction: Direction::Ingress,
            protocol: Resolved::Known(protocol),
            from_port: from.map(Resolved::Known),
            to_port: to.map(Resolved::Known),
            source: Resolved::Known(Source::Cidr(src.parse().unwrap())),
            description: None,
        }
    }

    fn status(v: &Verdict) -> &'static str {
        match v {
            Verdict::Pass => "pass",
            Verdict::Exempt(_) => "exempt",
            Verdict::Finding(f) if f.status == Status::Fail => "fail",
            Verdict::Finding(_) => "unknown",
        }
    }

    #[test]
    fn anywhere_is_prefix_length_zero_however_written() {
        for s in [
            "0.0.0.0/0",
            "10.1.2.3/0",
            "::/0",
            "::0/0",
            "0:0:0:0:0:0:0:0/0",
        ] {
            assert!(s.parse::<Cidr>().unwrap().is_anywhere(), "{s}");
        }
        assert!(!"0.0.0.0/1".parse::<Cidr>().unwrap().is_anywhere());
        assert!("10.0.0.0".parse::<Cidr>().is_err());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    }

    #[test]
    fn pmtud_exempt_by_default_but_not_all_types() {
        let o = RuleOptions::default();
        let v = evaluate(&rule(Protocol::Icmp, Some(3), Some(4), "0.0.0.0/0"), &o);
        assert_eq!(status(&v), "exempt");
        let v = evaluate(&rule(Protocol::Icmpv6, Some(2), Some(-1), "::/0"), &o);
        assert_eq!(status(&v), "exempt");
        let v = evaluate(&rule(Protocol::Icmpv6, Some(2), Some(0), "::/0"), &o);
        assert_eq!(status(&v), "exempt");
        // Type 3 with every code opens more than fragmentation-needed.
        let v = evaluate(&rule(Protocol::Icmp, Some(3), Some(-1), "0.0.0.0/0"), &o);
        assert_eq!(status(&v), "fail");
        let v = evaluate(&rule(Protocol::Icmp, Some(-1), Some(-1), "0.0.0.0/0"), &o);
        assert_eq!(status(&v), "fail");
        let none = RuleOptions {
            exemptions: vec![],
            ..RuleOptions::default()
        };
        let v = evaluate(&rule(Protocol::Icmp, Some(3), Some(4), "0.0.0.0/0"), &none);
        assert_eq!(status(&v), "fail");
    }

    #[test]
    fn all_traffic_uses_source_family_and_ignores_ports() {
        let o = RuleOptions::default();
        let Verdict::Finding(f) = evaluate(&rule(Protocol::All, Some(0), Some(65535), "::/0"), &o)
        else {
            panic!("-1 from ::/0 must be a finding")
        };
        assert_eq!(f.opens, "all types");
        assert!(f.reason.contains("icmpv6"), "{}", f.reason);
        assert_eq!(f.protocol, "-1 (all traffic)");
    }

    #[test]
    fn type_code_are_not_ports() {
        let o = RuleOptions::default();
        let Verdict::Finding(f) =
            evaluate(&rule(Protocol::Icmp, Some(8), Some(-1), "0.0.0.0/0"), &o)
        else {
            panic!()
        };
        assert_eq!(f.opens, "type 8 (echo request), all codes");
        assert!(!f.reason.contains("port"), "{}", f.reason);
        assert!(f.remedy.commands[0].contains("FromPort=8,ToPort=-1"));
        assert!(f.remedy.commands[1].contains("CidrIp=203.0.113.0/24"));
    }

    #[test]
    fn exemption_syntax() {
        assert_eq!(
            "icmp:3:4".parse::<Exemption>().unwrap(),
            Exemption::path_mtu_discovery()[0]
        );
        assert_eq!(
            "icmpv6:2".parse::<Exemption>().unwrap(),
            Exemption::path_mtu_discovery()[1]
        );
        assert!("tcp:22".parse::<Exemption>().is_err());
        assert!("icmp:300".parse::<Exemption>().is_err());
        assert!("icmp".parse::<Exemption>().is_err());
    }
}
