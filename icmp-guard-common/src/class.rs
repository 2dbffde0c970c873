//! Family-aware socket classification.
//!
//! KubeArmor classifies sockets from `(type, protocol)` alone, so `AF_UNIX/SOCK_STREAM` counts as
//! tcp and `AF_NETLINK/SOCK_RAW` as raw. icmp-guard looks at the address family first: only inet
//! (`AF_INET`, `AF_INET6`) and `AF_PACKET` sockets are ever classified; every other family is
//! [`Class::Unmanaged`] and is never decided on.
//!
//! This one function is compiled into the kernel programs and into the agent's unit tests, so the
//! tests exercise exactly the code that decides.

pub const AF_UNIX: u16 = 1;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const AF_NETLINK: u16 = 16;
pub const AF_PACKET: u16 = 17;

pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;
pub const SOCK_RAW: u32 = 3;
pub const SOCK_RDM: u32 = 4;
pub const SOCK_SEQPACKET: u32 = 5;
pub const SOCK_DCCP: u32 = 6;
pub const SOCK_PACKET: u32 = 10;
/// `socket(2)` carries `SOCK_NONBLOCK`/`SOCK_CLOEXEC` in the bits above the type.
pub const SOCK_TYPE_MASK: u32 = 0xf;
pub const SOCK_NONBLOCK: u32 = 0o4000;
pub const SOCK_CLOEXEC: u32 = 0o2000000;

pub const IPPROTO_IP: u32 = 0;
pub const IPPROTO_ICMP: u32 = 1;
pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;
pub const IPPROTO_ICMPV6: u32 = 58;
pub const IPPROTO_SCTP: u32 = 132;
pub const IPPROTO_RAW: u32 = 255;

/// What a socket can do on the network, as far as policy is concerned.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Not a network socket icmp-guard manages (unix, netlink, …): never decided, never alerted.
    Unmanaged = 0,
    /// inet `SOCK_STREAM` with protocol 0 or `IPPROTO_TCP`.
    Tcp = 1,
    /// inet `SOCK_DGRAM` with protocol 0 or `IPPROTO_UDP`.
    Udp = 2,
    /// inet SCTP, stream or seqpacket.
    Sctp = 3,
    /// `AF_INET` raw or datagram socket with `IPPROTO_ICMP`.
    Icmp = 4,
    /// `AF_INET6` raw or datagram socket with `IPPROTO_ICMPV6`.
    Icmpv6 = 5,
    /// inet `SOCK_RAW` with any other protocol, e.g. `IPPROTO_RAW`, with which hping3 forges ICMP.
    Raw = 6,
    /// `AF_PACKET`, any type: sees and forges whole frames.
    Packet = 7,
    /// Any other inet socket (e.g. MPTCP, UDP-Lite, DCCP, ICMPv6 over `AF_INET`).
    Other = 8,
}

/// Number of classes, including [`Class::Unmanaged`].
pub const CLASS_COUNT: usize = 9;

impl Class {
    pub const ALL_MANAGED: [Class; 8] = [
        Class::Tcp,
        Class::Udp,
        Class::Sctp,
        Class::Icmp,
        Class::Icmpv6,
        Class::Raw,
        Class::Packet,
        Class::Other,
    ];

    /// Bit of this class in the `u16` class masks of [`crate::maps::WorkloadPolicy`].
    pub const fn bit(self) -> u16 {
        1 << (self as u8)
    }

    pub const fn from_u8(v: u8) -> Class {
        match v {
            1 => Class::Tcp,
            2 => Class::Udp,
            3 => Class::Sctp,
            4 => Class::Icmp,
            5 => Class::Icmpv6,
            6 => Class::Raw,
            7 => Class::Packet,
            8 => Class::Other,
            _ => Class::Unmanaged,
        }
    }

    /// The lower-case name used in policies and alerts.
    pub const fn name(self) -> &'static str {
        match self {
            Class::Unmanaged => "unmanaged",
            Class::Tcp => "tcp",
            Class::Udp => "udp",
            Class::Sctp => "sctp",
            Class::Icmp => "icmp",
            Class::Icmpv6 => "icmpv6",
            Class::Raw => "raw",
            Class::Packet => "packet",
            Class::Other => "other",
        }
    }
}

/// Classifies a socket from the arguments of `socket(2)`.
///
/// `sock_type` may still carry `SOCK_NONBLOCK`/`SOCK_CLOEXEC`; they never change the class.
#[inline(always)]
pub fn classify(family: u16, sock_type: u32, protocol: u32) -> Class {
    let ty = sock_type & SOCK_TYPE_MASK;
    match family {
        AF_PACKET => Class::Packet,
        AF_INET | AF_INET6 => classify_inet(family, ty, protocol),
        _ => Class::Unmanaged,
    }
}

#[inline(always)]
fn classify_inet(family: u16, ty: u32, protocol: u32) -> Class {
    match (ty, protocol) {
        (SOCK_RAW | SOCK_DGRAM, IPPROTO_ICMP) if family == AF_INET => Class::Icmp,
        (SOCK_RAW | SOCK_DGRAM, IPPROTO_ICMPV6) if family == AF_INET6 => Class::Icmpv6,
        (SOCK_RAW, _) => Class::Raw,
        (SOCK_STREAM, IPPROTO_IP | IPPROTO_TCP) => Class::Tcp,
        (SOCK_DGRAM, IPPROTO_IP | IPPROTO_UDP) => Class::Udp,
        (SOCK_STREAM, IPPROTO_SCTP) | (SOCK_SEQPACKET, IPPROTO_IP | IPPROTO_SCTP) => Class::Sctp,
        _ => Class::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AF_RDS: u16 = 21;

    #[test]
    fn icmp_is_family_specific() {
        assert_eq!(classify(AF_INET, SOCK_RAW, IPPROTO_ICMP), Class::Icmp);
        assert_eq!(classify(AF_INET, SOCK_DGRAM, IPPROTO_ICMP), Class::Icmp);
        assert_eq!(classify(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6), Class::Icmpv6);
        assert_eq!(
            classify(AF_INET6, SOCK_DGRAM, IPPROTO_ICMPV6),
            Class::Icmpv6
        );
        // Protocol numbers in the other family are not ICMP of that family.
        assert_eq!(classify(AF_INET6, SOCK_RAW, IPPROTO_ICMP), Class::Raw);
        assert_eq!(classify(AF_INET, SOCK_RAW, IPPROTO_ICMPV6), Class::Raw);
        assert_eq!(classify(AF_INET6, SOCK_DGRAM, IPPROTO_ICMP), Class::Other);
    }

    #[test]
    fn raw_is_any_other_inet_raw_protocol() {
        for proto in [
            IPPROTO_RAW,
            IPPROTO_TCP,
            IPPROTO_UDP,
            112, /* VRRP */
            89,  /* OSPF */
        ] {
            assert_eq!(classify(AF_INET, SOCK_RAW, proto), Class::Raw, "{proto}");
            assert_eq!(classify(AF_INET6, SOCK_RAW, proto), Class::Raw, "{proto}");
        }
    }

    #[test]
    fn packet_is_the_family_whatever_the_type() {
        for ty in [SOCK_RAW, SOCK_DGRAM, SOCK_PACKET] {
            assert_eq!(classify(AF_PACKET, ty, 0x0300), Class::Packet);
        }
    }

    #[test]
    fn transport_classes_are_inet_only() {
        assert_eq!(classify(AF_INET, SOCK_STREAM, 0), Class::Tcp);
        assert_eq!(classify(AF_INET6, SOCK_STREAM, IPPROTO_TCP), Class::Tcp);
        assert_eq!(classify(AF_INET, SOCK_DGRAM, 0), Class::Udp);
        assert_eq!(classify(AF_INET6, SOCK_DGRAM, IPPROTO_UDP), Class::Udp);
        assert_eq!(classify(AF_INET, SOCK_STREAM, IPPROTO_SCTP), Class::Sctp);
        assert_eq!(classify(AF_INET, SOCK_SEQPACKET, 0), Class::Sctp);
        assert_eq!(
            classify(AF_INET, SOCK_STREAM, 262 /* MPTCP */),
            Class::Other
        );
        assert_eq!(
            classify(AF_INET, SOCK_DGRAM, 136 /* UDP-Lite */),
            Class::Other
        );
        assert_eq!(classify(AF_INET, SOCK_DCCP, 0), Class::Other);
    }

    #[test]
    fn other_families_are_never_managed() {
        // KubeArmor counts these as tcp and raw; they are not network capability.
        assert_eq!(classify(AF_UNIX, SOCK_STREAM, 0), Class::Unmanaged);
        assert_eq!(classify(AF_NETLINK, SOCK_RAW, 0), Class::Unmanaged);
        assert_eq!(classify(AF_RDS, SOCK_SEQPACKET, 0), Class::Unmanaged);
    }

    #[test]
    fn type_flags_never_change_the_class() {
        let flags = SOCK_NONBLOCK | SOCK_CLOEXEC;
        assert_eq!(classify(AF_INET, SOCK_DGRAM | flags, 0), Class::Udp);
        assert_eq!(
            classify(AF_INET, SOCK_RAW | flags, IPPROTO_ICMP),
            Class::Icmp
        );
    }

    #[test]
    fn class_bits_are_distinct_and_round_trip() {
        let mut seen = 0u16;
        for c in Class::ALL_MANAGED {
            assert_eq!(seen & c.bit(), 0);
            seen |= c.bit();
            assert_eq!(Class::from_u8(c as u8), c);
        }
        assert_eq!(Class::ALL_MANAGED.len() + 1, CLASS_COUNT);
    }
}
