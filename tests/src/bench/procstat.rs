//! A process's CPU time and resident memory, from /proc, alone or with
//! its descendants (vsockd's keeper and its worker).

use std::io;

/// User plus system CPU seconds `pid` has used so far, all threads.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat)
        .map(|ticks| ticks as f64 / clock_ticks_per_second())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("/proc/{pid}/stat: cannot parse {stat:?}"),
            )
        })
}

/// utime + stime (fields 14 and 15 of proc(5)) from a /proc/PID/stat line.
/// The command name (field 2) is in parentheses and may contain spaces, so
/// fields are counted from the last `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state): utime is the 12th field of it.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Resident set size of `pid` in bytes (VmRSS of /proc/PID/status).
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_vm_rss(&status).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/status has no VmRSS line"),
        )
    })
}

/// The `VmRSS:   1234 kB` line of /proc/PID/status, in bytes.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `pid` and its descendants, parents first, from
/// /proc/PID/task/TID/children.
pub fn process_tree(pid: u32) -> io::Result<Vec<u32>> {
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        i += 1;
        let tasks = match std::fs::read_dir(format!("/proc/{p}/task")) {
            Ok(t) => t,
            // It exited meanwhile; it has no children left.
            Err(e) if e.kind() == io::ErrorKind::NotFound && p != pid => continue,
            Err(e) => return Err(e),
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            tree.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    Ok(tree)
}

/// CPU seconds of `pid` and its descendants alive now.
pub fn tree_cpu_seconds(pid: u32) -> io::Result<f64> {
    sum_over_tree(pid, cpu_seconds)
}

/// Resident bytes of `pid` and its descendants alive now, summed (pages
/// two of them share count twice).
pub fn tree_rss_bytes(pid: u32) -> io::Result<u64> {
    sum_over_tree(pid, rss_bytes)
}

/// `read` of every process of the tree, summed; a descendant that exits
/// meanwhile counts nothing.
fn sum_over_tree<T: std::iter::Sum<T>>(
    pid: u32,
    read: impl Fn(u32) -> io::Result<T>,
) -> io::Result<T> {
    let mut parts = Vec::new();
    for p in process_tree(pid)? {
        match read(p) {
            Ok(v) => parts.push(v),
            Err(e) if e.kind() == io::ErrorKind::NotFound && p != pid => {}
            Err(e) => return Err(e),
        }
    }
    Ok(parts.into_iter().sum())
}

/// Raises this process's soft open-file limit to the hard limit, so that
/// a thousand connections (and the backends it starts, which inherit the
/// limit) fit.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: lim is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_from_a_stat_line_with_spaces_in_the_name() {
        let line = "4242 (vhost dev (x)) S 1 4242 4242 0 -1 4194560 300 0 0 0 \
                    17 5 0 0 20 0 3 0 100 1000000 200 18446744073709551615";
        assert_eq!(parse_cpu_ticks(line), Some(22));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn rss_from_status() {
        let s = "Name:\tvsockd\nVmPeak:\t 9000 kB\nVmRSS:\t    2048 kB\nThreads:\t2\n";
        assert_eq!(parse_vm_rss(s), Some(2 << 20));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    #[test]
    fn own_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert_ne!(x, 1);
        assert!(cpu_seconds(me).expect("stat") >= 0.0);
        assert!(rss_bytes(me).expect("status") > 0);
    }

    #[test]
    fn a_child_is_part_of_the_tree() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let me = std::process::id();
        let tree = process_tree(me).expect("tree");
        assert_eq!(tree[0], me);
        assert!(tree.contains(&child.id()), "{tree:?}");
        // Every process of the tree counts once. (Comparing RSS figures
        // read at different instants races with the other tests' threads.)
        let counted = sum_over_tree(me, |_| Ok::<u64, io::Error>(1)).expect("count");
        assert!(counted >= 2, "{counted} processes counted of {tree:?}");
        assert!(tree_rss_bytes(me).expect("rss") > 0);
        assert!(tree_cpu_seconds(me).expect("cpu") >= 0.0);
        let _ = child.kill();
        let _ = child.wait();
    }
}
