//! A process's CPU time and resident memory, from /proc, alone or with
//! its descendants (vsockd's keeper and its worker), and the whole
//! machine's CPU time.

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

/// User plus system CPU seconds `pid` has used so far, with those of its
/// children that it has waited for.
pub fn cpu_seconds_with_reaped(pid: u32) -> io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_cpu_ticks_with_reaped(&stat)
        .map(|ticks| ticks as f64 / clock_ticks_per_second())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("/proc/{pid}/stat: cannot parse {stat:?}"),
            )
        })
}

/// Fields 14 on of a /proc/PID/stat line (utime, stime, cutime, cstime,
/// ...). The command name (field 2) is in parentheses and may contain
/// spaces, so fields are counted from the last `)`.
fn cpu_fields(stat: &str) -> Option<impl Iterator<Item = &str>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state): utime is the 12th field of it.
    Some(rest.split_whitespace().skip(11))
}

/// utime + stime (fields 14 and 15 of proc(5)) from a /proc/PID/stat line.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let mut fields = cpu_fields(stat)?;
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// utime + stime + cutime + cstime (fields 14 to 17 of proc(5)).
pub fn parse_cpu_ticks_with_reaped(stat: &str) -> Option<u64> {
    let t: Vec<u64> = cpu_fields(stat)?
        .take(4)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    (t.len() == 4).then(|| t.iter().sum())
}

/// The whole machine's CPU time so far, in seconds over all cores: busy
/// (user, nice, system, irq, softirq) and stolen by the hypervisor.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MachineCpu {
    pub busy: f64,
    pub steal: f64,
}

/// The first line of /proc/stat.
pub fn machine_cpu() -> io::Result<MachineCpu> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    parse_machine_cpu(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "/proc/stat: cannot parse its cpu line",
        )
    })
}

/// `cpu  user nice system idle iowait irq softirq steal ...`, in ticks.
pub fn parse_machine_cpu(stat: &str) -> Option<MachineCpu> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let t: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let tick = |i: usize| t.get(i).copied();
    let busy = tick(0)? + tick(1)? + tick(2)? + tick(5)? + tick(6)?;
    let hz = clock_ticks_per_second();
    Some(MachineCpu {
        busy: busy as f64 / hz,
        steal: tick(7).unwrap_or(0) as f64 / hz,
    })
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
        assert_eq!(parse_cpu_ticks_with_reaped(line), Some(22));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1"), None);
        assert_eq!(
            parse_cpu_ticks_with_reaped("4242 (x) S 1 2 3 4 5 6 7 8 9 10 11 12"),
            None
        );
        let reaped = "7 (vsockd) S 1 7 7 0 -1 0 0 0 0 0 10 5 30 7 20 0 1 0";
        assert_eq!(parse_cpu_ticks_with_reaped(reaped), Some(52));
    }

    #[test]
    fn machine_cpu_line() {
        let stat = "cpu  100 5 20 900 4 1 2 30 0 0\ncpu0 50 2 10 450 2 0 1 15 0 0\n";
        let hz = clock_ticks_per_second();
        let m = parse_machine_cpu(stat).expect("cpu line");
        assert_eq!(m.busy, 128.0 / hz);
        assert_eq!(m.steal, 30.0 / hz);
        assert_eq!(parse_machine_cpu("intr 1 2\n"), None);
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
