//! The node's network interfaces, as the guard needs them: name, index, loopback or not, MTU.
//!
//! Asked of the kernel in the agent's own network namespace (`if_nameindex`, then
//! `SIOCGIFFLAGS`/`SIOCGIFMTU`), not read from sysfs, whose view belongs to whichever namespace
//! mounted it.

use std::ffi::CStr;

use anyhow::{Result, bail};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    pub loopback: bool,
    pub mtu: u32,
}

/// A socket to ask interface ioctls on: any family reaches the device ioctls, and AF_UNIX needs
/// no network access.
struct IoctlSocket(i32);

impl Drop for IoctlSocket {
    fn drop(&mut self) {
        // SAFETY: our own descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn ifreq(name: &CStr) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.to_bytes()) {
        *dst = *src as libc::c_char;
    }
    req
}

/// Every interface of this network namespace, by index.
pub fn list() -> Result<Vec<Interface>> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!(
            "cannot open a socket to read interface flags: {}",
            std::io::Error::last_os_error()
        );
    }
    let sock = IoctlSocket(fd);
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed below.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        bail!(
            "cannot list the network interfaces: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut out = Vec::new();
    let mut p = head;
    // SAFETY: walks the array up to its terminating entry.
    unsafe {
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = CStr::from_ptr((*p).if_name);
            let mut req = ifreq(name);
            let flags = if libc::ioctl(sock.0, libc::SIOCGIFFLAGS, &mut req) == 0 {
                req.ifr_ifru.ifru_flags as i32
            } else {
                0
            };
            let mut req = ifreq(name);
            let mtu = if libc::ioctl(sock.0, libc::SIOCGIFMTU, &mut req) == 0 {
                req.ifr_ifru.ifru_mtu as u32
            } else {
                0
            };
            out.push(Interface {
                name: name.to_string_lossy().into_owned(),
                ifindex: (*p).if_index,
                loopback: flags & libc::IFF_LOOPBACK != 0,
                mtu,
            });
            p = p.add(1);
        }
        libc::if_freenameindex(head);
    }
    out.sort_by_key(|i| i.ifindex);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_is_listed_as_loopback() {
        let all = super::list().unwrap();
        let lo = all.iter().find(|i| i.name == "lo").expect("lo");
        assert!(lo.loopback);
        assert_eq!(lo.ifindex, 1);
    }
}
