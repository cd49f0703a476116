//! `service create|update|scale` wait until the service has converged, as `docker service
//! create` does (`overall progress: 3 out of 3 tasks … verify: Service converged`), unless
//! `--detach`: every task meant to run is running (listening: `agent::ready`), none of the
//! old ones is still stopping, and it stays so for [`VERIFY`]. Progress goes to stderr (a
//! live display on a terminal, a line per change otherwise), so stdout keeps the service's
//! id alone for scripts. Past `--timeout` it fails with the tasks' errors (exit 9); the
//! change itself stays made, as Docker's does.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use swarmnet_api::replies::{ServiceInfo, ServicePsReply, TaskInfo};
use swarmnet_api::{ApiError, ApiRequest, DesiredState, ErrorKind, TaskState, UpdateState};

/// How long every task must stay running, unchanged (same tasks, no restart), before the
/// service counts as converged: a task that crashes as soon as it listens is caught.
pub const VERIFY: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(200);

/// Where a service is, from its desired count and its tasks.
#[derive(Debug, PartialEq, Eq)]
pub struct Progress {
    pub desired: u64,
    pub running: u64,
    /// Tasks meant to run: (name, what it is doing), by name.
    pub tasks: Vec<(String, String)>,
    /// Tasks told to stop that have not stopped yet.
    pub stopping: u64,
    /// Every task meant to run runs, and no old one is stopping.
    pub done: bool,
    /// What must not change during [`VERIFY`]: each running task's id and restarts.
    pub key: Vec<(String, u32)>,
}

/// Pure: where the service is.
pub fn progress(desired: u64, tasks: &[TaskInfo]) -> Progress {
    let mut meant: Vec<&TaskInfo> = tasks.iter().filter(|t| t.desired_state == DesiredState::Running).collect();
    meant.sort_by(|a, b| a.name.cmp(&b.name));
    let running = meant.iter().filter(|t| t.state == TaskState::Running).count() as u64;
    // (Tasks of a node that is down stop when it comes back: nothing waits for them.)
    let stopping = tasks.iter().filter(|t| t.desired_state == DesiredState::Shutdown && !t.state.is_terminal() && !t.orphaned).count() as u64;
    let rows = meant.iter().map(|t| (t.name.clone(), describe(t))).collect();
    let mut key: Vec<(String, u32)> = meant.iter().filter(|t| t.state == TaskState::Running).map(|t| (t.id.clone(), t.restarts)).collect();
    key.sort();
    Progress { desired, running, tasks: rows, stopping, done: running == desired && meant.len() as u64 == desired && stopping == 0, key }
}

/// One task's line: its state, node and, if it is not running, why.
fn describe(t: &TaskInfo) -> String {
    let state = serde_json::to_value(t.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    let mut s = state;
    if !t.node.is_empty() {
        s += &format!(" on {}", t.node);
    }
    if t.state != TaskState::Running && !t.error.is_empty() {
        s += &format!(": {}", t.error);
    }
    if t.restarts > 0 {
        s += &format!(" (restarted {}×)", t.restarts);
    }
    s
}

/// The lines shown for `p`.
pub fn render(p: &Progress) -> Vec<String> {
    let mut out = vec![format!("overall progress: {} out of {} tasks", p.running, p.desired)];
    out.extend(p.tasks.iter().map(|(name, what)| format!("{name}: {what}")));
    if p.stopping > 0 {
        out.push(format!("{} old task(s) stopping", p.stopping));
    }
    out
}

/// Pure: why a service that did not converge did not, for the error.
pub fn not_converged(service: &str, within: Duration, p: &Progress) -> ApiError {
    let mut why: Vec<String> = p.tasks.iter().filter(|(_, what)| !what.starts_with("running")).map(|(n, what)| format!("{n}: {what}")).collect();
    if p.stopping > 0 {
        why.push(format!("{} old task(s) still stopping", p.stopping));
    }
    if (p.tasks.len() as u64) < p.desired {
        why.push(format!("{} of {} tasks exist", p.tasks.len(), p.desired));
    }
    if why.is_empty() {
        why.push("its tasks did not stay running".to_string());
    }
    ApiError::new(
        ErrorKind::Timeout,
        format!(
            "service {service} did not converge within {}s: {} of {} tasks running; {} (the change is made: `swarmnet service ps {service}` follows it)",
            within.as_secs(),
            p.running,
            p.desired,
            why.join("; ")
        ),
    )
}

/// Shows progress on stderr: redrawn in place on a terminal, a line per change otherwise.
struct Display {
    tty: bool,
    drawn: usize,
    last: BTreeMap<usize, String>,
}

impl Display {
    fn show(&mut self, lines: &[String]) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            if self.drawn > 0 {
                // Up to the first line drawn, and clear to the end of the screen.
                let _ = write!(err, "\x1b[{}A\x1b[J", self.drawn);
            }
            for l in lines {
                let _ = writeln!(err, "{l}");
            }
            self.drawn = lines.len();
        } else {
            for (i, l) in lines.iter().enumerate() {
                if self.last.get(&i) != Some(l) {
                    let _ = writeln!(err, "{l}");
                    self.last.insert(i, l.clone());
                }
            }
        }
    }
}

/// Waits until `service` (its id: a name could be taken by another service meanwhile) has
/// converged, or `within` passes. A rolling update under way is waited for; with `update`
/// (the change began one), its pause is a failure at once.
pub fn wait(call: &dyn Fn(ApiRequest) -> Result<serde_json::Value, ApiError>, service: &str, within: Duration, update: bool) -> Result<(), ApiError> {
    let start = Instant::now();
    let mut display = Display { tty: std::io::stderr().is_terminal(), drawn: 0, last: BTreeMap::new() };
    let mut stable: Option<(Instant, Vec<(String, u32)>)> = None;
    loop {
        let info: ServiceInfo = decode(call(ApiRequest::ServiceInspect { name: service.to_string() })?)?;
        let ps: ServicePsReply = decode(call(ApiRequest::ServicePs { name: service.to_string() })?)?;
        let mut p = progress(info.desired_replicas, &ps.tasks);
        let mut lines = render(&p);
        if let Some(u) = &info.update_status {
            if u.state != UpdateState::Completed {
                lines.insert(1, format!("update: {}", u.message));
            }
            if update && u.state == UpdateState::Paused {
                display.show(&lines);
                return Err(ApiError::new(ErrorKind::Timeout, format!("service {}: update {}", info.name, u.message)));
            }
            p.done &= u.state != UpdateState::Updating;
        }
        display.show(&lines);
        if p.done {
            match &stable {
                Some((since, key)) if *key == p.key => {
                    if since.elapsed() >= VERIFY {
                        eprintln!("verify: Service converged");
                        return Ok(());
                    }
                }
                _ => stable = Some((Instant::now(), p.key.clone())),
            }
        } else {
            stable = None;
        }
        if start.elapsed() >= within {
            return Err(not_converged(&info.name, within, &p));
        }
        std::thread::sleep(POLL);
    }
}

fn decode<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, ApiError> {
    serde_json::from_value(v).map_err(|e| ApiError::internal(format!("a reply of another shape: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(name: &str, desired: DesiredState, state: TaskState, error: &str) -> TaskInfo {
        TaskInfo {
            id: format!("id-{name}"),
            name: name.into(),
            node: if state == TaskState::Pending { String::new() } else { "n1".into() },
            node_id: None,
            desired_state: desired,
            state,
            error: error.into(),
            addresses: BTreeMap::new(),
            pid: None,
            restarts: 0,
            version: 0,
            orphaned: false,
            service_id: None,
            slot: None,
            since_ms: 0,
        }
    }

    #[test]
    fn converged_when_every_task_runs_and_no_old_one_is_stopping() {
        use DesiredState::{Running as D, Shutdown as S};
        let t = |n, d, s| task(n, d, s, "");
        let p = progress(2, &[t("web.1", D, TaskState::Running), t("web.2", D, TaskState::Starting)]);
        assert!(!p.done);
        assert_eq!(render(&p), vec!["overall progress: 1 out of 2 tasks", "web.1: running on n1", "web.2: starting on n1"]);
        let p = progress(2, &[t("web.1", D, TaskState::Running), t("web.2", D, TaskState::Running), t("web.3", S, TaskState::Running)]);
        assert!(!p.done, "an old task is still stopping");
        assert_eq!(render(&p).last().map(String::as_str), Some("1 old task(s) stopping"));
        let p = progress(2, &[t("web.1", D, TaskState::Running), t("web.2", D, TaskState::Running), t("web.3", S, TaskState::Shutdown)]);
        assert!(p.done);
        let mut lost = t("web.3", S, TaskState::Running);
        lost.orphaned = true;
        assert!(progress(2, &[t("web.1", D, TaskState::Running), t("web.2", D, TaskState::Running), lost]).done, "a down node's task is not waited for");
        assert_eq!(p.key, vec![("id-web.1".to_string(), 0), ("id-web.2".to_string(), 0)]);
        // Scaled to 0: done once the old ones stopped.
        assert!(progress(0, &[t("web.1", S, TaskState::Shutdown)]).done);
        // Fewer tasks than desired (the manager has not made them yet).
        assert!(!progress(3, &[t("web.1", D, TaskState::Running)]).done);
    }

    #[test]
    fn the_error_says_why_each_task_is_not_running() {
        let mut failing = task("web.2", DesiredState::Running, TaskState::Failed, "exited with status 3");
        failing.restarts = 4;
        let p = progress(
            3,
            &[
                task("web.1", DesiredState::Running, TaskState::Running, ""),
                failing,
                task("web.3", DesiredState::Running, TaskState::Pending, "no suitable node: of 2 ready nodes, 2 not meeting the constraints [node.labels.zone==x]"),
            ],
        );
        let e = not_converged("web", Duration::from_secs(60), &p);
        assert_eq!(e.kind, ErrorKind::Timeout);
        let m = e.message;
        assert!(m.starts_with("service web did not converge within 60s: 1 of 3 tasks running; "), "{m}");
        assert!(m.contains("web.2: failed on n1: exited with status 3 (restarted 4×)"), "{m}");
        assert!(m.contains("web.3: pending: no suitable node"), "{m}");
        assert!(!m.contains("web.1"), "{m}");
    }
}
