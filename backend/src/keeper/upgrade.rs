//! Live upgrade: the keeper replaces its worker with one started from the
//! binary now on disk, and no connection, byte or frame boundary is lost
//! or repeated, raw host streams included.
//!
//! Steps, as the keeper drives them (`vsockd upgrade` starts them):
//!
//! ```text
//!   starting --STANDBY--> standing --nothing in flight--> quiescing
//!      |                     |                               |
//!      |                     |                          QUIESCED
//!      |                     |                               v
//!      +----- fails ---------+----------- fails -------- adopting --READY--> done
//! ```
//!
//! * starting: a standby worker (`--standby`) is started from the new
//!   binary, with the state region alone in its first hand-over. It maps
//!   the region without writing to it and checks that it can read its
//!   layout (a layout newer than it knows is refused here), builds its
//!   device, and reports STANDBY. The old worker serves all along.
//! * standing: the keeper stops reading the frontend and accepting host
//!   clients (both wait in their sockets' queues) and, once no control
//!   message is in flight, tells the old worker to quiesce.
//! * quiescing: the old worker ends the wakeup it is in (every socket call
//!   it made is recorded by then, no RX batch is pending) and answers
//!   QUIESCED after every deposit and withdrawal it sent. From then on
//!   nothing writes the state region or touches a socket.
//! * adopting: the keeper hands the standby everything it holds. The
//!   standby takes the next generation (its first write to the region)
//!   and adopts as a worker does after a crash, but nothing is half done:
//!   no socket call lies between its effect and its record, so nothing is
//!   lost or repeated.
//! * done: on the standby's READY it serves; the old worker is told to
//!   retire and exits without writing; the new binary is what the keeper
//!   starts workers from from now on, after a crash too.
//!
//! Rollback, whatever the step the upgrade fails at (the standby dies,
//! refuses, or overruns its step's deadline): before the old worker was
//! told to quiesce, nothing changed; after, the old worker is told to
//! resume if the region's generation is still its own (the standby wrote
//! nothing), and serves on from its memory, which still matches the
//! region. If the standby did take the generation, the old worker's
//! memory is stale: it is killed (it is quiesced, so nothing is cut) and a
//! worker from the running binary adopts the region as after a crash. In
//! every case the client gets the reason, and the log says it at error.
//!
//! The old worker dying meanwhile ends the upgrade too, unless the
//! standby is already adopting: it then carries on, as any successor of a
//! dead worker.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use vsockd_persist::fdstore::well_known;
use vsockd_persist::Kind;

use super::{exit_cause, Keeper, Worker, WORKER_EXIT_GRACE};

/// How long a standby may take to start and stand by.
const STANDBY_START_LIMIT: Duration = Duration::from_secs(10);
/// How long the old worker may take to quiesce once standing (a control
/// message in flight included).
const QUIESCE_LIMIT: Duration = Duration::from_secs(5);
/// How long the standby may take to adopt once handed everything.
const ADOPT_LIMIT: Duration = Duration::from_secs(10);

/// Where an upgrade stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The standby is starting.
    Starting,
    /// The standby waits; the old worker serves until nothing is in
    /// flight.
    Standing,
    /// The old worker was told to quiesce.
    Quiescing,
    /// The standby has everything; `generation` is the old worker's.
    Adopting { generation: u64 },
}

impl Step {
    fn describe(self) -> &'static str {
        match self {
            Step::Starting => "while starting",
            Step::Standing => "while standing by",
            Step::Quiescing => "while the old worker quiesced",
            Step::Adopting { .. } => "while taking over",
        }
    }
}

/// An upgrade under way.
pub(super) struct Upgrade {
    pub(super) standby: Worker,
    /// The new binary, held open.
    exe: OwnedFd,
    step: Step,
    /// When the current step times out.
    pub(super) deadline: Option<Instant>,
    /// When the old worker was told to quiesce.
    quiesce_sent: Option<Instant>,
    /// Why the standby says it cannot take over.
    failure: Option<String>,
    /// The state region's memfd when the upgrade started: a standby that
    /// migrates the layout deposits a new one, and a rollback puts this
    /// one back.
    prior_region: Option<OwnedFd>,
    /// The keeper re-executes itself after (`vsockd upgrade --keeper`).
    then_keeper: bool,
}

/// A worker an upgrade replaced, told to exit.
pub(super) struct Retiring {
    pub(super) worker: Worker,
    /// When it is killed if it has not exited.
    pub(super) kill_at: Instant,
}

impl Keeper {
    /// Whether an upgrade holds the worker: the frontend is not read, no
    /// host client accepted or sent, until it ends.
    pub(super) fn upgrade_holds_the_worker(&self) -> bool {
        self.upgrade
            .as_ref()
            .is_some_and(|u| u.step != Step::Starting)
    }

    /// `vsockd upgrade`: starts a standby worker from the binary on disk;
    /// with `keeper`, the keeper re-executes itself from it once the
    /// worker's upgrade succeeded (see `reexec`).
    pub(super) fn start_upgrade(&mut self, keeper: bool) -> Result<(), String> {
        if self.upgrade.is_some() || self.keeper_exec.is_some() {
            return Err("an upgrade is already under way".into());
        }
        if !self.worker.as_ref().is_some_and(|w| w.ready) {
            return Err(
                "no worker is serving (one is starting after a restart); try again shortly".into(),
            );
        }
        let path = self.binary_path.display().to_string();
        let exe = File::open(&self.binary_path)
            .map(OwnedFd::from)
            .map_err(|e| format!("cannot open the new binary {path}: {e}"))?;
        let number = self.started + 1;
        let standby = self
            .spawn(&exe, true, number)
            .map_err(|e| format!("cannot start the new binary {path}: {e}"))?;
        self.started += 1;
        self.standbys_started += 1;
        info!(
            "upgrade: standby worker {number} started (pid {}) from {path}",
            standby.child.id()
        );
        if let Err(e) =
            self.store
                .hand_over_only(&standby.link, &[well_known::STATE_REGION], number - 1)
        {
            // A standby that died is noticed on its link.
            warn!("upgrade: cannot hand the state region to standby worker {number}: {e}");
        }
        self.upgrade = Some(Upgrade {
            standby,
            exe,
            step: Step::Starting,
            deadline: Some(Instant::now() + STANDBY_START_LIMIT),
            quiesce_sent: None,
            failure: None,
            prior_region: self.store.dup(well_known::STATE_REGION),
            then_keeper: keeper,
        });
        Ok(())
    }

    /// Reads the standby's frames.
    pub(super) fn on_standby_readable(&mut self) {
        loop {
            let Some(u) = &self.upgrade else { return };
            let frame = match u.standby.link.try_recv() {
                Ok(Some(f)) => f,
                Ok(None) => return self.standby_died(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    warn!("bad frame from the standby worker, ignored: {e}");
                    continue;
                }
                Err(_) => return self.standby_died(),
            };
            // Adopting, it deposits and withdraws as any worker.
            let frame = match self.store.apply(frame) {
                Ok(None) => continue,
                Ok(Some(f)) => f,
                Err(e) => {
                    warn!("bad fd-store frame from the standby worker, ignored: {e}");
                    continue;
                }
            };
            match frame.kind {
                Kind::Standby => self.on_standby(frame.id, frame.flags),
                Kind::Ready => return self.complete_upgrade(frame.id, frame.flags),
                Kind::Failed => {
                    let why = String::from_utf8_lossy(&frame.payload).into_owned();
                    if let Some(u) = &mut self.upgrade {
                        u.failure = Some(why);
                    }
                }
                other => warn!("unexpected {other:?} frame from the standby worker, ignored"),
            }
        }
    }

    /// The standby stands by: it read the region's layout `found`, and
    /// writes layout `own`.
    fn on_standby(&mut self, found: u64, own: u32) {
        let Some(u) = &mut self.upgrade else { return };
        if u.step != Step::Starting {
            warn!("upgrade: a second STANDBY from the standby worker, ignored");
            return;
        }
        if found == u64::from(own) {
            info!(
                "upgrade: standby worker {} stands by (state region layout {found})",
                u.standby.number
            );
        } else {
            info!(
                "upgrade: standby worker {} stands by (state region layout {found}, which it migrates to {own})",
                u.standby.number
            );
        }
        u.step = Step::Standing;
        u.deadline = Some(Instant::now() + QUIESCE_LIMIT);
        self.try_quiesce();
    }

    /// Tells the old worker to quiesce once the standby stands by and no
    /// control message is in flight.
    fn try_quiesce(&mut self) {
        let Some(u) = &mut self.upgrade else { return };
        if u.step != Step::Standing || self.unacked.is_some() {
            return;
        }
        let Some(w) = self.worker.as_ref().filter(|w| w.ready) else {
            return;
        };
        if let Err(e) = w.link.send(Kind::Quiesce, 0, 0, &[], &[]) {
            // A dying worker's link says so soon.
            warn!("upgrade: cannot tell worker {} to quiesce: {e}", w.number);
        }
        u.step = Step::Quiescing;
        u.quiesce_sent = Some(Instant::now());
    }

    /// The old worker quiesced (its generation `generation`): the standby
    /// gets everything.
    pub(super) fn on_quiesced(&mut self, generation: u64) {
        let Some(u) = &mut self.upgrade else {
            // An upgrade called off after the QUIESCE went: the RESUME
            // sent then follows it.
            return;
        };
        if u.step != Step::Quiescing {
            warn!(
                "upgrade: QUIESCED from the worker {}, ignored",
                u.step.describe()
            );
            return;
        }
        info!(
            "upgrade: worker generation {generation} quiesced; handing {} fds to standby worker {}",
            self.store.len(),
            u.standby.number
        );
        if let Err(e) = self.store.hand_over(&u.standby.link, u.standby.number - 1) {
            warn!("upgrade: hand-over to the standby worker failed: {e}");
        }
        u.step = Step::Adopting { generation };
        u.deadline = Some(Instant::now() + ADOPT_LIMIT);
    }

    /// The standby is READY: it serves, the old worker retires.
    fn complete_upgrade(&mut self, generation: u64, flags: u32) {
        let Some(u) = self.upgrade.take() else { return };
        let pause = u.quiesce_sent.map(|t| t.elapsed());
        let mut standby = u.standby;
        standby.ready = true;
        standby.generation = Some(generation);
        let (number, pid) = (standby.number, standby.child.id());
        let old = self.worker.replace(standby);
        let retired = old.map(|old| {
            if let Err(e) = old.link.send(Kind::Retire, 0, 0, &[], &[]) {
                warn!("upgrade: cannot tell worker {} to retire: {e}", old.number);
            }
            let line = format!("worker {} (pid {})", old.number, old.child.id());
            self.retiring.push(Retiring {
                worker: old,
                kill_at: Instant::now() + WORKER_EXIT_GRACE,
            });
            line
        });
        self.worker_exe = u.exe;
        // Host clients not sent to the old worker went with the hand-over,
        // as every fd in the store: none may follow in a frame too.
        self.unsent_clients.clear();
        self.client_retry_at = None;
        if let Some(fd) = self.store.dup(well_known::STATE_REGION) {
            self.region.replace_fd(fd);
        }
        let layout = match self.region.stamp() {
            Ok(s) if s.migrated_from != 0 => {
                format!("{} (migrated from {})", s.version, s.migrated_from)
            }
            Ok(s) => s.version.to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        let path = self.binary_path.display().to_string();
        let pause_text = pause.map_or_else(
            || "none".to_string(),
            |d| format!("{:.3} ms", d.as_secs_f64() * 1e3),
        );
        info!(
            "upgrade done: worker {number} (pid {pid}, generation {generation}) from {path} serves; {} retired; paused {pause_text}",
            retired.as_deref().unwrap_or("no worker")
        );
        let adopted = flags & vsockd_persist::channel::FLAG_CLOSE == 0;
        self.worker_ready(flags);
        if adopted && u.then_keeper {
            self.keeper_exec = Some(format!(
                "worker: {number} (pid {pid}, generation {generation})\nbinary: {path}\nlayout: {layout}\nretired: {}\npause: {pause_text}\n",
                retired.as_deref().unwrap_or("none")
            ));
            return;
        }
        let result = if adopted {
            Ok(format!(
                "worker: {number} (pid {pid}, generation {generation})\nbinary: {path}\nlayout: {layout}\nretired: {}\npause: {pause_text}\n",
                retired.as_deref().unwrap_or("none")
            ))
        } else {
            Err(format!(
                "worker {number} from {path} serves, but it could not adopt the session, which was closed (see its log)"
            ))
        };
        self.answer_upgrade(result);
    }

    /// The standby's link closed: it died.
    fn standby_died(&mut self) {
        let Some(mut u) = self.upgrade.take() else {
            return;
        };
        let cause = match u.standby.child.wait() {
            Ok(status) => exit_cause(status),
            Err(e) => format!("ended ({e})"),
        };
        let reason = match u.failure.take() {
            Some(why) => format!("the new worker refused to take over: {why}"),
            None => format!("the new worker {cause} {}", u.step.describe()),
        };
        self.roll_back(u.step, u.prior_region, reason);
    }

    /// Ends a failed upgrade whose standby is dead (see the module doc).
    fn roll_back(&mut self, step: Step, prior_region: Option<OwnedFd>, reason: String) {
        if let Some(fd) = prior_region {
            // A standby that migrated the layout deposited its copy.
            self.store.deposit(well_known::STATE_REGION, fd);
        }
        let outcome = match step {
            Step::Starting | Step::Standing => {
                "the running worker never stopped serving".to_string()
            }
            Step::Quiescing => self.resume_old(),
            Step::Adopting { generation } => match self.region.stamp() {
                Ok(stamp) if stamp.generation == generation => self.resume_old(),
                Ok(_) => self.replace_old(),
                Err(e) => {
                    warn!("upgrade: cannot read the state region's generation: {e}");
                    self.replace_old()
                }
            },
        };
        error!("upgrade failed: {reason}; {outcome}");
        self.answer_upgrade(Err(format!("{reason}; {outcome}")));
    }

    /// Tells the quiesced old worker to serve again.
    fn resume_old(&mut self) -> String {
        let Some(w) = &self.worker else {
            self.restart_at.get_or_insert_with(Instant::now);
            return "a worker from the running binary takes over".into();
        };
        if let Err(e) = w.link.send(Kind::Resume, 0, 0, &[], &[]) {
            warn!("upgrade: cannot tell worker {} to resume: {e}", w.number);
        }
        format!("worker {} serves again", w.number)
    }

    /// The standby wrote the region, so the old worker's memory is stale:
    /// it goes (it is quiesced, nothing is cut), and a worker from the
    /// running binary adopts the region.
    fn replace_old(&mut self) -> String {
        if let Some(mut w) = self.worker.take() {
            let _ = w.child.kill();
            let _ = w.child.wait();
            info!(
                "upgrade: worker {} (pid {}) stopped: the failed standby had taken the state region over",
                w.number,
                w.child.id()
            );
        }
        self.restart_at = Some(Instant::now());
        "the standby had taken the state region over, so a worker from the running binary adopts it"
            .into()
    }

    /// The old worker died (`w`, not yet reaped) while an upgrade runs.
    /// Returns true if that needs no restart: the standby was adopting.
    pub(super) fn worker_died_in_upgrade(&mut self, w: &mut Worker) -> bool {
        let Some(u) = &self.upgrade else {
            return false;
        };
        if let Step::Adopting { .. } = u.step {
            let cause = match w.child.wait() {
                Ok(status) => exit_cause(status),
                Err(e) => format!("ended ({e})"),
            };
            warn!(
                "worker {} (pid {}), quiesced for the upgrade, {cause}; the standby takes over regardless",
                w.number,
                w.child.id()
            );
            return true;
        }
        let Some(u) = self.upgrade.take() else {
            return false;
        };
        stop_now(u.standby);
        let reason = format!(
            "worker {} died during the upgrade; it is restarted from the running binary",
            w.number
        );
        error!("upgrade failed: {reason}");
        self.answer_upgrade(Err(reason));
        false
    }

    /// Deadlines: an upgrade step overrun, a retired worker that did not
    /// exit. Also quiesces once a control message in flight is answered.
    pub(super) fn upgrade_timers(&mut self) {
        self.try_quiesce();
        let now = Instant::now();
        if self
            .upgrade
            .as_ref()
            .and_then(|u| u.deadline)
            .is_some_and(|d| now >= d)
        {
            if let Some(u) = self.upgrade.take() {
                let step = u.step;
                let number = u.standby.number;
                stop_now(u.standby);
                let reason = format!(
                    "standby worker {number} overran its time limit {}",
                    step.describe()
                );
                self.roll_back(step, u.prior_region, reason);
            }
        }
        let mut i = 0;
        while i < self.retiring.len() {
            if now >= self.retiring[i].kill_at {
                let r = self.retiring.swap_remove(i);
                warn!(
                    "retired worker {} did not exit within {WORKER_EXIT_GRACE:?}: killing it",
                    r.worker.number
                );
                stop_now(r.worker);
            } else {
                i += 1;
            }
        }
    }

    /// Reaps the retired workers at `indices` whose links closed.
    pub(super) fn reap_retired(&mut self, indices: &[usize]) {
        for &i in indices.iter().rev() {
            let Some(r) = self.retiring.get(i) else {
                continue;
            };
            let exited = loop {
                match r.worker.link.try_recv() {
                    Ok(Some(_)) => {}
                    Ok(None) => break true,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                    Err(_) => break true,
                }
            };
            if !exited {
                continue;
            }
            let mut r = self.retiring.swap_remove(i);
            let cause = match r.worker.child.wait() {
                Ok(status) => exit_cause(status),
                Err(e) => format!("ended ({e})"),
            };
            info!(
                "retired worker {} (pid {}) {cause}",
                r.worker.number,
                r.worker.child.id()
            );
        }
    }

    pub(super) fn answer_upgrade(&mut self, result: Result<String, String>) {
        if let Some(control) = &mut self.control {
            control.finish_upgrade(&result);
        }
    }
}

/// Kills a worker process at once and reaps it.
fn stop_now(mut w: Worker) {
    let _ = w.child.kill();
    let _ = w.child.wait();
}
