//! Running a program the way a probe must run: inside a workload's cgroup and in a private
//! network namespace that has only loopback, so that nothing it sends can leave the machine even
//! if enforcement failed.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{ffi::OsStrExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

/// Where a probe runs.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    /// cgroup to join before exec.
    pub cgroup: Option<PathBuf>,
    /// A fresh network namespace with loopback up and nothing else.
    pub private_net: bool,
    /// Another process's namespaces to enter (a pod's), after joining the cgroup.
    pub enter: Option<Arc<Namespaces>>,
}

/// Namespaces of a running process, opened from `/proc/PID/ns`.
#[derive(Debug)]
pub struct Namespaces {
    pub net: OwnedFd,
    /// With it, the program path resolves in the process's root (its mount namespace's).
    pub mnt: Option<OwnedFd>,
}

impl Namespaces {
    /// `pid`'s network namespace, and its mount namespace if `with_mnt`.
    pub fn of(pid: u32, with_mnt: bool) -> io::Result<Self> {
        let open =
            |kind: &str| std::fs::File::open(format!("/proc/{pid}/ns/{kind}")).map(OwnedFd::from);
        Ok(Namespaces {
            net: open("net")?,
            mnt: if with_mnt { Some(open("mnt")?) } else { None },
        })
    }
}

impl Placement {
    pub fn in_cgroup(cgroup: &Path) -> Self {
        Placement {
            cgroup: Some(cgroup.to_path_buf()),
            private_net: true,
            enter: None,
        }
    }

    /// In `cgroup` and in the namespaces `ns` (a pod's network, and its mount namespace so that
    /// the pod's own executables run): the pod's loopback is the only one its probes reach.
    pub fn in_pod(cgroup: &Path, ns: Namespaces) -> Self {
        Placement {
            cgroup: Some(cgroup.to_path_buf()),
            private_net: false,
            enter: Some(Arc::new(ns)),
        }
    }

    /// Applies the placement to `cmd`: between fork and exec the child leaves the network and
    /// joins the cgroup, so the program's very first socket is already decided there.
    pub fn apply(&self, cmd: &mut Command) {
        let procs = self
            .cgroup
            .as_ref()
            .map(|c| CString::new(c.join("cgroup.procs").as_os_str().as_bytes()).unwrap());
        let private_net = self.private_net;
        let enter = self.enter.clone();
        // SAFETY: only async-signal-safe syscalls run between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if private_net {
                    if libc::unshare(libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    loopback_up()?;
                }
                if let Some(p) = &procs {
                    join_cgroup(p)?;
                }
                // After the cgroup: its path is one of this mount namespace.
                if let Some(ns) = &enter {
                    if libc::setns(ns.net.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if let Some(mnt) = &ns.mnt
                        && libc::setns(mnt.as_raw_fd(), libc::CLONE_NEWNS) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
}

fn join_cgroup(procs: &CString) -> io::Result<()> {
    // SAFETY: plain syscalls on a valid C string.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // "0" moves the writing process itself.
        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
        libc::close(fd);
        if n != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `ip link set lo up` through an ioctl on an AF_UNIX socket: unix sockets are never decided, so
/// preparing the namespace cannot itself trip a policy.
fn loopback_up() -> io::Result<()> {
    // SAFETY: plain syscalls with a zeroed, then filled, ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        req.ifr_name[0] = b'l' as libc::c_char;
        req.ifr_name[1] = b'o' as libc::c_char;
        req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as i16;
        let rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        libc::close(fd);
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

pub fn spawn(place: &Placement, argv: &[&str], stdin: Stdio) -> io::Result<Child> {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..])
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    place.apply(&mut cmd);
    cmd.spawn()
}

/// Waits for `child` to exit, killing it after `timeout`.
pub fn wait_child(child: &mut Child, timeout: Duration) -> io::Result<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            return child.wait();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `child`, killing it after `timeout`; `Err` names what hung.
pub fn wait(mut child: Child, timeout: Duration) -> io::Result<Output> {
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return child.wait_with_output();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "did not finish in {timeout:?}; output so far: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn run(place: &Placement, argv: &[&str], timeout: Duration) -> io::Result<Output> {
    wait(spawn(place, argv, Stdio::null())?, timeout)
}

/// stdout and stderr together, as a person would read them.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The errno a refused tool reports, from the text it prints.
pub fn reported_errno(o: &Output) -> Option<&'static str> {
    let t = text(o);
    if t.contains("Operation not permitted") {
        Some("EPERM")
    } else if t.contains("Permission denied") {
        // EACCES's text; KubeArmor's own alerts also say this for EPERM.
        Some("EPERM/EACCES")
    } else {
        None
    }
}
