//! The `STATE` array mapped into the agent: the words every managed socket's decision reads
//! first (active generation and classes in use, lease, the agent's own pid, the layout).
//!
//! Each word is written with one aligned atomic store through the shared mapping. An update
//! through `bpf_map_update_elem` would copy the value with `memcpy`, which may tear a word; a
//! decision must see each word either before or after a change.

use std::{
    os::fd::{AsRawFd, BorrowedFd},
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{Result, bail};
use icmp_guard_common::maps::{
    STATE_AGENT_OFFSET, STATE_CONTROL_OFFSET, STATE_LAYOUT_OFFSET, STATE_LEASE_OFFSET, State,
};

/// A shared, writable mapping of the one-entry `STATE` array.
pub struct StateMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is only ever accessed through atomics.
unsafe impl Send for StateMap {}
unsafe impl Sync for StateMap {}

impl StateMap {
    /// Maps the array behind `fd` (created with `BPF_F_MMAPABLE`). The mapping keeps the map
    /// alive on its own.
    pub fn map(fd: BorrowedFd<'_>) -> Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = std::mem::size_of::<State>().div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of a BPF array fd; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!(
                "mapping the STATE array: {}; the kernel must support BPF_F_MMAPABLE arrays \
                 (Linux 5.5 or later)",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: offset is a field offset of `State` inside the mapping, 8-byte aligned (the
        // mapping is page aligned).
        unsafe { &*(self.ptr.add(offset).cast::<AtomicU64>()) }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: as above, 4-byte aligned.
        unsafe { &*(self.ptr.add(offset).cast::<AtomicU32>()) }
    }

    pub fn control(&self) -> u64 {
        self.u64_at(STATE_CONTROL_OFFSET).load(Ordering::Acquire)
    }

    /// Release: every map write before it is visible to a program that reads the new word.
    pub fn set_control(&self, word: u64) {
        self.u64_at(STATE_CONTROL_OFFSET)
            .store(word, Ordering::Release);
    }

    pub fn lease_until_ns(&self) -> u64 {
        self.u64_at(STATE_LEASE_OFFSET).load(Ordering::Acquire)
    }

    pub fn set_lease_until_ns(&self, until: u64) {
        self.u64_at(STATE_LEASE_OFFSET)
            .store(until, Ordering::Release);
    }

    pub fn agent_tgid(&self) -> u32 {
        self.u32_at(STATE_AGENT_OFFSET).load(Ordering::Acquire)
    }

    pub fn set_agent_tgid(&self, tgid: u32) {
        self.u32_at(STATE_AGENT_OFFSET)
            .store(tgid, Ordering::Release);
    }

    pub fn layout(&self) -> u32 {
        self.u32_at(STATE_LAYOUT_OFFSET).load(Ordering::Acquire)
    }

    pub fn set_layout(&self, layout: u32) {
        self.u32_at(STATE_LAYOUT_OFFSET)
            .store(layout, Ordering::Release);
    }
}

impl Drop for StateMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// How the agent knows that no decision still reads a generation it has just left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quiescence {
    /// `membarrier(MEMBARRIER_CMD_GLOBAL)` returns after an RCU grace period, and every
    /// decision runs inside an RCU read-side section (BPF programs of these hooks run under
    /// `rcu_read_lock`): when it returns, no decision that read the old control word is left.
    GracePeriod,
    /// The kernel refused membarrier (seccomp, `nohz_full`): wait far longer than any decision
    /// can run.
    Sleep(Duration),
}

const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
const FALLBACK: Duration = Duration::from_secs(1);

/// Waits until every BPF program that started before this call has finished.
pub fn wait_for_readers() -> Quiescence {
    // SAFETY: a plain syscall with no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc == 0 {
        return Quiescence::GracePeriod;
    }
    std::thread::sleep(FALLBACK);
    Quiescence::Sleep(FALLBACK)
}
