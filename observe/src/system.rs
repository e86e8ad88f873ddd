//! Facts about the machine a process reports: its resident memory and the
//! free space of the file system its data lives on.

use std::path::Path;

/// The resident set of this process in bytes (Linux: `/proc/self/statm`),
/// or `None` where that cannot be read.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages.saturating_mul(u64::try_from(page).ok()?))
}

/// The size and the space free to this process of a file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    pub size: u64,
    pub free: u64,
}

/// The file system `path` is on, or `None` if it cannot be asked.
pub fn disk_space(path: &Path) -> Option<DiskSpace> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let unit = st.f_frsize as u64;
    Some(DiskSpace { size: (st.f_blocks as u64).saturating_mul(unit), free: (st.f_bavail as u64).saturating_mul(unit) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_and_disk_are_read() {
        assert!(resident_bytes().unwrap() > 1024 * 1024);
        let d = disk_space(Path::new("/")).unwrap();
        assert!(d.size > 0 && d.free <= d.size);
        assert!(disk_space(Path::new("/no/such/dir")).is_none());
    }
}
