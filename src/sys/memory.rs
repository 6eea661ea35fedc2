//! Keeping long-lived helper processes small.

/// Unmaps the never-written file pages (code, read-only data) that starting up
/// touched. For the long-lived helpers (a monitor lives as long as its
/// container) resident memory is the per-pod overhead; their loops fault back
/// the few pages they use.
/// Only mappings without a single private or anonymous page are dropped, so
/// nothing is lost: their content is the file's.
pub fn release_startup_pages() {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    let mut current: Option<(usize, usize)> = None;
    let mut clean = true;
    let release = |range: Option<(usize, usize)>, clean: bool| {
        if let Some((start, end)) = range
            && clean
        {
            // SAFETY: the range is a whole mapping of file pages nobody wrote to;
            // dropping them only makes the next access read the file again.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    };
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16))
        {
            release(current.take(), clean);
            let perms = fields.next().unwrap_or_default();
            let inode = fields.nth(2).unwrap_or("0");
            let path = fields.next().unwrap_or_default();
            let file_backed = inode != "0" && path.starts_with('/');
            clean = file_backed && (perms == "r-xp" || perms == "r--p");
            current = Some((start, end));
        } else if matches!(first, "Private_Dirty:" | "Anonymous:" | "Swap:") && fields.next() != Some("0") {
            clean = false;
        }
    }
    release(current, clean);
}
