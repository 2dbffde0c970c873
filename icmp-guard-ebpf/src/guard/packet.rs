//! Bounds-checked reads from a packet. Every read proves `start + len <= end` first, which is
//! also what lets the verifier accept it: nothing is read past the end of the frame.

/// The bytes of a frame the program may read, and what it knows about the frame.
pub struct Pkt {
    pub data: usize,
    pub end: usize,
    /// Bytes of the whole frame (larger than `end - data` for multi-buffer XDP or a non-linear
    /// skb).
    pub frame_len: u32,
    pub ifindex: u32,
}

impl Pkt {
    /// Whether `len` bytes at `off` are readable.
    #[inline(always)]
    pub fn has(&self, off: usize, len: usize) -> bool {
        self.data + off + len <= self.end
    }

    #[inline(always)]
    pub fn u8_at(&self, off: usize) -> Option<u8> {
        let a = self.data + off;
        if a + 1 > self.end {
            return None;
        }
        // SAFETY: checked against the end of the packet above.
        Some(unsafe { *(a as *const u8) })
    }

    /// A big-endian u16.
    #[inline(always)]
    pub fn be16_at(&self, off: usize) -> Option<u16> {
        let a = self.data + off;
        if a + 2 > self.end {
            return None;
        }
        // SAFETY: checked against the end of the packet above.
        let (hi, lo) = unsafe { (*(a as *const u8), *((a + 1) as *const u8)) };
        Some(((hi as u16) << 8) | lo as u16)
    }

    #[inline(always)]
    pub fn bytes_at<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let a = self.data + off;
        if a + N > self.end {
            return None;
        }
        // SAFETY: checked against the end of the packet above; [u8; N] has alignment 1.
        Some(unsafe { *(a as *const [u8; N]) })
    }
}

/// An address as the maps hold it: IPv4 in the first four bytes, the rest zero.
#[inline(always)]
pub fn v4_addr(a: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0] = a[0];
    out[1] = a[1];
    out[2] = a[2];
    out[3] = a[3];
    out
}

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// Offset of the network header and its ethertype, after at most two VLAN tags; `None` for a
/// frame too short to say.
#[inline(always)]
pub fn l3(p: &Pkt) -> Option<(usize, u16)> {
    let mut proto = p.be16_at(12)?;
    let mut off = 14;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = p.be16_at(16)?;
        off = 18;
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            proto = p.be16_at(20)?;
            off = 22;
        }
    }
    Some((off, proto))
}
