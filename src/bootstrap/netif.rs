//! This host's network interfaces and their IPv4 addresses: where the store and the TCP
//! links listen when `HETCCL_SOCKET_IFNAME` names one. It lives in the lowest layer that
//! asks (bootstrap, for the store); the transports ask it too.

use std::ffi::CStr;
use std::net::Ipv4Addr;

use crate::error::{Error, Result};

/// IPv4 addresses of this host's interfaces: `(name, address, up, loopback)`.
pub fn ipv4_interfaces() -> Result<Vec<(String, Ipv4Addr, bool, bool)>> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(Error::io(
            "listing network interfaces",
            std::io::Error::last_os_error(),
        ));
    }
    let mut out = Vec::new();
    let mut p = ifap;
    while !p.is_null() {
        // SAFETY: `p` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*p };
        // SAFETY: a non-null ifa_addr points at a sockaddr whose family says its type;
        // ifa_name is a NUL-terminated string.
        unsafe {
            if !ifa.ifa_addr.is_null() && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                let name = CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned();
                let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0;
                let lo = ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0;
                out.push((name, ip, up, lo));
            }
        }
        p = ifa.ifa_next;
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(out)
}

/// The IPv4 address of interface `name` (`HETCCL_SOCKET_IFNAME`): an exact name, or
/// else the first interface whose name starts with it (`eth` finds `eth0`).
pub fn interface_ipv4(name: &str) -> Result<Ipv4Addr> {
    let ifs = ipv4_interfaces()?;
    ifs.iter()
        .find(|(n, ..)| n == name)
        .or_else(|| ifs.iter().find(|(n, _, up, _)| *up && n.starts_with(name)))
        .map(|(_, ip, ..)| *ip)
        .ok_or_else(|| {
            let names: Vec<&str> = ifs.iter().map(|(n, ..)| n.as_str()).collect();
            Error::Config {
                var: "HETCCL_SOCKET_IFNAME".into(),
                value: name.into(),
                accepted: format!(
                    "the name (or a prefix) of an interface with an IPv4 address: {}",
                    names.join(", ")
                ),
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_interface_lists_the_known_ones() {
        let e = interface_ipv4("nosuchif0").unwrap_err().to_string();
        assert!(
            e.starts_with("invalid value \"nosuchif0\" for HETCCL_SOCKET_IFNAME"),
            "{e}"
        );
        assert!(e.contains("lo"), "{e}");
        assert_eq!(interface_ipv4("lo").unwrap(), Ipv4Addr::LOCALHOST);
    }
}
