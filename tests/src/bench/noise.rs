//! How busy the machine was with other work while a measurement ran: the
//! machine's CPU time less that of the benchmark process (its threads and
//! the children it waited for) and of the backend (its processes alive
//! now and the children it waited for), and the time the hypervisor
//! stole. On a shared machine, a pause that coincides with other work
//! says more about the machine than about the backend.

use std::fmt;
use std::io;
use std::time::Instant;

use super::procstat::{self, MachineCpu};

/// CPU time so far: the machine's, and the benchmark's and backend's.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    at: Instant,
    machine: MachineCpu,
    ours: f64,
}

impl CpuMark {
    /// Reads the counters now; `backend_pid` is the backend's process.
    pub fn now(backend_pid: u32) -> io::Result<CpuMark> {
        let machine = procstat::machine_cpu()?;
        Ok(CpuMark {
            at: Instant::now(),
            machine,
            ours: ours(backend_pid)?,
        })
    }

    /// What the machine did between `self` and `later`.
    pub fn until(&self, later: &CpuMark) -> Noise {
        let wall = later.at.duration_since(self.at).as_secs_f64();
        let per_wall = |x: f64| if wall > 0.0 { x / wall } else { 0.0 };
        let others = (later.machine.busy - self.machine.busy) - (later.ours - self.ours);
        Noise {
            others_cores: per_wall(others.max(0.0)),
            steal_cores: per_wall(later.machine.steal - self.machine.steal),
        }
    }
}

/// CPU seconds of this process and of the backend's processes.
fn ours(backend_pid: u32) -> io::Result<f64> {
    let own = procstat::cpu_seconds_with_reaped(std::process::id())?;
    let keeper = procstat::cpu_seconds_with_reaped(backend_pid)?;
    // The keeper's descendants alive now (its reaped ones are in its own
    // figure).
    let alive = procstat::tree_cpu_seconds(backend_pid)? - procstat::cpu_seconds(backend_pid)?;
    Ok(own + keeper + alive)
}

/// Average cores busy with other work, and stolen, over a stretch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Noise {
    pub others_cores: f64,
    pub steal_cores: f64,
}

impl fmt::Display for Noise {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "other processes kept {:.2} cores busy on average, the hypervisor stole {:.2}",
            self.others_cores, self.steal_cores
        )
    }
}
