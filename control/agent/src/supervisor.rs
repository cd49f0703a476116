//! One task's life on its node, as a small state machine:
//!
//! ```text
//!            adopted (found running after a restart) ─────────────┐
//!                                                                 ▼
//!   Network ──ok──► Start ──ok──► Starting ──ready──► Running ──exit──┐      Running
//!      │              │                │ exit                           │
//!      └──error──┐    └──error──┐      └──────────────┐                 │
//!                ▼              ▼                     ▼                 ▼
//!              fail(state, error): report it; a run-once task ends here (exit code kept);
//!                                  else Backoff(delay doubling to 5 s) → Network or Start
//!   stop (at any point): the endpoints turn draining, the process is stopped (SIGTERM, half
//!   a second later if it took connections; SIGKILL after 10 s), then they are withdrawn →
//!   Stopped
//! ```
//!
//! The endpoints are published draining when the task is put on its networks (peers'
//! overlays learn the address) and turn active only once the process listens on its
//! service's ports ([`crate::ready`]): no load balancer and no DNS answer sends a client to a
//! task that would refuse it. The task is reported `starting` until then.
//!
//! Every failure goes through the one `fail` path; every wait goes through the one
//! `backoff`, which a stop interrupts. Whatever the end, the task's network is torn down
//! and its holds released by the runtime.

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use swarmnet_api::{Assignment, TaskReport, TaskState};
use swarmnet_dataplane::task as dp;
use swarmnet_types::{EndpointState, Port};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::dns;
use crate::ready;
use crate::runtime::{lock, Runtime};

const STOP_GRACE: Duration = Duration::from_secs(10);
const RESTART_MIN: Duration = Duration::from_millis(500);
const RESTART_MAX: Duration = Duration::from_secs(5);
/// A process that ran this long resets the backoff.
const RAN_LONG: Duration = Duration::from_secs(10);
/// Between a running task's endpoints turning draining and its process being signalled:
/// room for the change to reach every node (Docker sleeps 2 s there).
const DRAIN_BEFORE_STOP: Duration = Duration::from_millis(500);
/// How often a starting task's sockets are looked at.
const READY_POLL: Duration = Duration::from_millis(50);

/// What survives a daemon restart, per task, in `<data-dir>/tasks/state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Persisted {
    pub assignment: Assignment,
    pub pid: u32,
    pub start_time: u64,
}

/// Where the machine is.
enum Step {
    /// Make the task's namespace, links and resolver, and put it on its networks.
    Network,
    /// Start the process in the namespace.
    Start,
    /// The process runs and is not yet ready: its endpoints stay draining until it listens,
    /// or until `until`.
    Starting { p: Proc, until: Instant },
    /// The process runs and takes connections.
    Running(Proc),
    /// Wait before trying `then` again.
    Backoff { then: Box<Step> },
    /// Told to stop, with the process if one runs.
    Stopping(Option<Proc>),
    /// Finished: stopped on purpose (`true`), or a run-once task that ended.
    Done { stopped: bool },
}

/// How a run-once task ended.
enum Outcome {
    /// Its process exited with this code.
    Exited(i32),
    /// It never ran, and why.
    NeverRan(String),
}

struct Supervisor {
    rt: Arc<Runtime>,
    a: Assignment,
    report: Arc<Mutex<TaskReport>>,
    stop: watch::Receiver<bool>,
    ports: watch::Receiver<Vec<Port>>,
    netns: Option<File>,
    dns: Option<swarmnet_dns::server::Listener>,
    delay: Duration,
}

pub(crate) async fn supervise(rt: Arc<Runtime>, a: Assignment, adopt: Option<Persisted>, report: Arc<Mutex<TaskReport>>, stop: watch::Receiver<bool>, ports: watch::Receiver<Vec<Port>>) {
    let mut s = Supervisor { rt, a, report, stop, ports, netns: None, dns: None, delay: RESTART_MIN };
    let mut step = match adopt {
        Some(p) => s.adopt(p).await.map_or(Step::Network, Step::Running),
        None => Step::Network,
    };
    let stopped = loop {
        if s.ports.has_changed().unwrap_or(false) {
            // `service update --publish-add/--publish-rm`: the task goes on running; its
            // endpoints are published again now if it runs, else when it is ready.
            s.a.ports = s.ports.borrow_and_update().clone();
            if matches!(step, Step::Running(_)) {
                s.rt.publish(&s.a, EndpointState::Active);
            }
        }
        if *s.stop.borrow() && !matches!(step, Step::Stopping(_) | Step::Done { .. }) {
            step = Step::Stopping(match step {
                Step::Running(p) | Step::Starting { p, .. } => Some(p),
                _ => None,
            });
        }
        step = match step {
            Step::Network => s.network().await,
            Step::Start => s.start().await,
            Step::Starting { p, until } => s.starting(p, until).await,
            Step::Running(p) => s.run(p).await,
            Step::Backoff { then } => s.backoff(*then).await,
            Step::Stopping(p) => {
                // Drain first, as Swarm does (weight 0, then removal): out of every DNS
                // answer and every load balancer's rotation before the process is signalled,
                // while its connections keep their path (the overlay keeps a draining
                // endpoint). The teardown withdraws it once the process is gone.
                if let Some(mut p) = p {
                    s.rt.publish(&s.a, EndpointState::Draining);
                    if lock(&s.report).state == TaskState::Running {
                        // A client's node may pick it until the change reaches it (a few
                        // ms, p99 5 ms in `bench convergence`): it is not signalled before.
                        tokio::time::sleep(DRAIN_BEFORE_STOP).await;
                    }
                    p.stop().await;
                }
                Step::Done { stopped: true }
            }
            Step::Done { stopped } => break stopped,
        };
    };
    let id = s.a.task_id.clone();
    s.rt.remove_from_lb(&s.a, s.netns.as_ref()).await;
    drop(s.dns.take());
    drop(s.netns.take());
    s.rt.teardown(&id, &s.a).await;
    if stopped {
        info!(task = %id, name = %s.a.name, "task stopped");
        s.rt.update(&s.report, |r| {
            r.state = TaskState::Shutdown;
            r.pid = None;
        });
    }
}

impl Supervisor {
    fn id(&self) -> &str {
        &self.a.task_id
    }

    /// A task that kept running while the daemon was away: take it back as it is.
    async fn adopt(&mut self, p: Persisted) -> Option<Proc> {
        if dp::proc_start_time(p.pid) != Some(p.start_time) {
            return None;
        }
        let f = match dp::netns_of(p.pid) {
            Ok(f) => f,
            Err(e) => {
                warn!(task = %self.id(), pid = p.pid, error = %e, "could not adopt task");
                return None;
            }
        };
        info!(task = %self.id(), pid = p.pid, "adopted a task that kept running while the daemon was away");
        if let Err(e) = self.rt.add_to_lb(&self.a, &f).await {
            warn!(task = %self.id(), error = %format!("{e:#}"), "adopted task");
        }
        if let Err(e) = self.rt.connect(&self.a, EndpointState::Active).await {
            // Its links are gone (their sandbox was removed while the daemon was away): a
            // task that runs without its network is worse than one started again.
            warn!(task = %self.id(), pid = p.pid, error = %format!("{e:#}"), "adopted task cannot be put back on its networks: stopping it to start it again with new links");
            self.rt.remove_from_lb(&self.a, Some(&f)).await;
            stop_adopted(p.pid, p.start_time).await;
            self.rt.teardown(&self.a.task_id, &self.a).await;
            return None;
        }
        match self.rt.dns().serve_task(&self.rt.ns, &f, &self.a.task_id, self.scope()).await {
            Ok(l) => self.dns = Some(l),
            Err(e) => warn!(task = %self.id(), error = %format!("{e:#}"), "adopted task: no resolver"),
        }
        self.netns = Some(f);
        self.rt.update(&self.report, |r| {
            r.state = TaskState::Running;
            r.pid = Some(p.pid);
            r.error.clear();
        });
        // Known again to the state file (it may have been found in /proc after a corrupt one).
        let (pid, start) = (p.pid, p.start_time);
        self.rt.remember(&self.a.task_id, p).await;
        Some(Proc::Adopted { pid, start })
    }

    fn scope(&self) -> Vec<String> {
        // The ingress network carries published-port traffic only: no names there.
        self.a.attachments.iter().filter(|at| !at.network.ingress).map(|at| at.network.id.clone()).collect()
    }

    async fn network(&mut self) -> Step {
        let made = async {
            let f = dp::setup_task_net(&self.rt.ns, self.rt.nets(&self.a)).await?;
            let l = self.rt.dns().serve_task(&self.rt.ns, &f, &self.a.task_id, self.scope()).await?;
            self.rt.add_to_lb(&self.a, &f).await?;
            self.rt.connect(&self.a, EndpointState::Draining).await?;
            Ok::<_, anyhow::Error>((f, l))
        }
        .await;
        match made {
            Ok((f, l)) => {
                self.netns = Some(f);
                self.dns = Some(l);
                Step::Start
            }
            Err(e) => {
                let e = format!("network setup: {e:#}");
                warn!(task = %self.id(), error = %e, "task network setup failed");
                // Nothing half-made stays behind while waiting to try again.
                self.rt.teardown(&self.a.task_id, &self.a).await;
                self.fail(TaskState::Failed, e.clone(), Outcome::NeverRan(e), Step::Network)
            }
        }
    }

    async fn start(&mut self) -> Step {
        let Some(ns) = self.netns.as_ref() else { return Step::Network };
        let id = self.a.task_id.clone();
        let mut env = self.rt.env.clone();
        env.extend(self.a.env.iter().cloned());
        env.push(("SWARMNET_TASK_ID".into(), id.clone()));
        env.push(("SWARMNET_TASK_NAME".into(), self.a.name.clone()));
        let addrs: Vec<std::net::Ipv4Addr> = self.a.attachments.iter().filter(|at| !at.network.ingress).map(|at| at.address).collect();
        let spawned =
            self.rt.dns().task_files(&self.rt.dir, &id, &self.a.name, &addrs).and_then(|binds| Ok((binds, self.rt.cgroup_procs()?))).map_err(|e| std::io::Error::other(format!("{e:#}"))).and_then(
                |(binds, cg)| {
                    let log = self.rt.log_path(&id);
                    let complaints = log.with_extension("log-writer.err");
                    let out = dp::spawn_log_writer(&self.rt.deps.task_logs.argv(&log), cg.as_ref(), &complaints).map_err(|e| std::io::Error::new(e.kind(), format!("its log writer: {e}")))?;
                    let child = dp::spawn_in_netns(ns, &self.a.command, (out.stdout, out.stderr), &env, &binds, cg.as_ref(), Some(&dns::short_id(&id)))?;
                    Ok((child, out.writer))
                },
            );
        match spawned {
            Ok((child, writer)) => {
                let pid = child.id().unwrap_or(0);
                let start = dp::proc_start_time(pid).unwrap_or(0);
                self.rt.remember(&id, Persisted { assignment: self.a.clone(), pid, start_time: start }).await;
                info!(task = %id, name = %self.a.name, pid, "task started");
                // The last exit stays said until it is running again.
                self.rt.update(&self.report, |r| {
                    r.state = TaskState::Starting;
                    r.pid = Some(pid);
                });
                let until = Instant::now() + ready::bound(&self.a.ports);
                Step::Starting { p: Proc::Child { child: Box::new(child), started: Instant::now(), writer: Some(Box::new(writer)) }, until }
            }
            Err(e) => {
                let what = self.a.command.first().cloned().unwrap_or_default();
                warn!(task = %id, error = %e, "task failed to start");
                self.fail(TaskState::Failed, format!("start {what:?}: {e}"), Outcome::NeverRan(format!("could not start {what:?}: {e}")), Step::Start)
            }
        }
    }

    /// Waits for the process to listen on its service's ports (polled: the kernel tells no
    /// one when a socket starts listening), then publishes its endpoints active.
    async fn starting(&mut self, mut p: Proc, until: Instant) -> Step {
        loop {
            let ready = p.pid().is_some_and(|pid| ready::Listening::of_process(pid).ready_for(&self.a.ports));
            if ready || Instant::now() >= until {
                if !ready {
                    info!(task = %self.id(), name = %self.a.name, ports = ?self.a.ports, "task does not listen on its service's ports yet: taken as ready after the bound");
                }
                self.rt.publish(&self.a, EndpointState::Active);
                self.rt.update(&self.report, |r| {
                    r.state = TaskState::Running;
                    r.error.clear();
                });
                return Step::Running(p);
            }
            tokio::select! {
                code = p.wait() => return self.exited(&p, code),
                _ = self.stop.changed() => return Step::Stopping(Some(p)),
                Ok(()) = self.ports.changed() => self.a.ports = self.ports.borrow_and_update().clone(),
                _ = tokio::time::sleep(READY_POLL) => {}
            }
        }
    }

    /// The process ended: its endpoints drain, and the task fails (or completes).
    fn exited(&mut self, p: &Proc, code: Option<i32>) -> Step {
        if matches!(p, Proc::Child { started, .. } if started.elapsed() > RAN_LONG) {
            self.delay = RESTART_MIN;
        }
        let (state, error) = match code {
            Some(0) => (TaskState::Complete, "exited with status 0".to_string()),
            Some(c) => (TaskState::Failed, format!("exited with status {c}")),
            None => (TaskState::Failed, "exited (status unknown: adopted after a daemon restart)".to_string()),
        };
        info!(task = %self.id(), name = %self.a.name, %error, "task exited");
        // It takes no new connections and leaves DNS answers until it is ready again.
        self.rt.publish(&self.a, EndpointState::Draining);
        self.fail(state, error, Outcome::Exited(code.unwrap_or(-1)), Step::Start)
    }

    async fn run(&mut self, mut p: Proc) -> Step {
        tokio::select! {
            code = p.wait() => self.exited(&p, code),
            _ = self.stop.changed() => Step::Stopping(Some(p)),
            Ok(()) = self.ports.changed() => {
                // `changed` marked it seen: published again here, not by the loop.
                self.a.ports = self.ports.borrow_and_update().clone();
                self.rt.publish(&self.a, EndpointState::Active);
                Step::Running(p)
            }
        }
    }

    /// The one failure path: report `state`/`error`; a run-once task ends here with its
    /// `outcome`; others try `then` again after a backoff.
    fn fail(&mut self, state: TaskState, error: String, outcome: Outcome, then: Step) -> Step {
        self.rt.update(&self.report, |r| {
            r.state = state;
            r.error = error;
            r.pid = None;
        });
        if !self.a.restart {
            let (code, why) = match outcome {
                Outcome::Exited(code) => (code, String::new()),
                Outcome::NeverRan(why) => (-1, why),
            };
            self.rt.record_exit(&self.a.task_id, code, why);
            return Step::Done { stopped: false };
        }
        Step::Backoff { then: Box::new(then) }
    }

    async fn backoff(&mut self, then: Step) -> Step {
        let d = self.delay;
        self.delay = (self.delay * 2).min(RESTART_MAX);
        if *self.stop.borrow() {
            return Step::Stopping(None);
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.stop.changed() => return Step::Stopping(None),
        }
        if matches!(then, Step::Start) {
            self.rt.update(&self.report, |r| r.restarts += 1);
        }
        then
    }
}

enum Proc {
    /// `writer`: its log writer, waited for (briefly) after it, so that its output is all
    /// stored when its end is reported (`run` reads it then).
    Child {
        child: Box<tokio::process::Child>,
        started: Instant,
        writer: Option<Box<tokio::process::Child>>,
    },
    Adopted {
        pid: u32,
        start: u64,
    },
}

impl Proc {
    fn pid(&self) -> Option<u32> {
        match self {
            Proc::Child { child, .. } => child.id(),
            Proc::Adopted { pid, .. } => Some(*pid),
        }
    }

    /// Waits for the process to end; its exit code if known.
    async fn wait(&mut self) -> Option<i32> {
        match self {
            Proc::Child { child, writer, .. } => {
                let code = match child.wait().await {
                    Ok(s) => Some(s.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(0))),
                    Err(_) => None,
                };
                Self::writer_done(writer).await;
                code
            }
            Proc::Adopted { pid, start } => {
                while dp::proc_start_time(*pid) == Some(*start) {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                None
            }
        }
    }

    /// Waits for a task's log writer to store the last of its output (it ends when every
    /// process holding the task's output has; one that a lingering child keeps open is
    /// left to run).
    async fn writer_done(writer: &mut Option<Box<tokio::process::Child>>) {
        if let Some(mut w) = writer.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), w.wait()).await;
        }
    }

    /// SIGTERM to the task's process group, SIGKILL after the grace period.
    async fn stop(&mut self) {
        match self {
            Proc::Child { child, writer, .. } => {
                let Some(pid) = child.id() else { return };
                let _ = dp::signal_group(pid, nix::sys::signal::Signal::SIGTERM);
                if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
                    let _ = dp::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = child.wait().await;
                }
                Self::writer_done(writer).await;
            }
            Proc::Adopted { pid, start } => stop_adopted(*pid, *start).await,
        }
    }
}

pub(crate) async fn stop_adopted(pid: u32, start: u64) {
    let _ = dp::signal_group(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while dp::proc_start_time(pid) == Some(start) {
        if Instant::now() > deadline {
            let _ = dp::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
