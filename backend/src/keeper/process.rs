//! A worker process, known by its pid: unlike `std::process::Child`, it can
//! be rebuilt from the pid alone by a keeper that re-executed itself (its
//! children stay its children across execve).

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};

/// A child process of the keeper.
#[derive(Debug)]
pub(super) struct WorkerProcess {
    pid: libc::pid_t,
}

impl WorkerProcess {
    /// Takes over a spawned child (which `Child` would never reap or kill
    /// on drop either).
    pub(super) fn from_child(child: Child) -> Self {
        WorkerProcess {
            pid: child.id() as libc::pid_t,
        }
    }

    /// A child known by its pid (from a keeper image).
    pub(super) fn from_pid(pid: u32) -> Self {
        WorkerProcess {
            pid: pid as libc::pid_t,
        }
    }

    pub(super) fn id(&self) -> u32 {
        self.pid as u32
    }

    /// Waits for it to end.
    pub(super) fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.wait_flags(0)? {
                return Ok(status);
            }
        }
    }

    /// Its status if it has ended.
    pub(super) fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.wait_flags(libc::WNOHANG)
    }

    fn wait_flags(&mut self, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
        let mut status: libc::c_int = 0;
        loop {
            // SAFETY: waitpid(2) on our own child, into a local int.
            let r = unsafe { libc::waitpid(self.pid, &mut status, flags) };
            if r == self.pid {
                return Ok(Some(ExitStatus::from_raw(status)));
            }
            if r == 0 {
                return Ok(None);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Sends it `signal`.
    pub(super) fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: kill(2) to our own child by its pid.
        if unsafe { libc::kill(self.pid, signal) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// SIGKILL.
    pub(super) fn kill(&self) -> io::Result<()> {
        self.signal(libc::SIGKILL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_a_child_and_reports_how_it_ended() {
        let child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let mut p = WorkerProcess::from_child(child);
        assert!(p.try_wait().unwrap().is_none());
        p.kill().unwrap();
        let status = p.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        let mut p =
            WorkerProcess::from_pid(std::process::Command::new("true").spawn().unwrap().id());
        assert_eq!(p.wait().unwrap().code(), Some(0));
    }
}
