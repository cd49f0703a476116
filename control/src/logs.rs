//! `service logs`: the CLI's end of the stream (issue 21; the protocol in
//! `swarmnet_api::logs`).

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;

use swarmnet_api::logs::{LogFrame, LogLine, LogStream, LogsOpened, LogsRequest};
use swarmnet_api::{ApiError, ApiRequest, Reply};

/// How lines are shown.
pub struct Show {
    pub timestamps: bool,
    pub task_ids: bool,
    pub raw: bool,
}

/// The prefix of each task's lines, padded to the longest (as docker aligns them).
fn prefixes(opened: &LogsOpened, show: &Show) -> HashMap<String, String> {
    if show.raw {
        return HashMap::new();
    }
    let bare: Vec<(String, String)> = opened
        .sources
        .iter()
        .map(|s| {
            let p = if show.task_ids { format!("{}.{}@{}", s.name, s.task_id, s.node) } else { format!("{}@{}", s.name, s.node) };
            (s.task_id.clone(), p)
        })
        .collect();
    let width = bare.iter().map(|(_, p)| p.chars().count()).max().unwrap_or(0);
    bare.into_iter().map(|(id, p)| (id, format!("{p:<width$} | "))).collect()
}

/// One line as printed.
pub fn format_line(l: &LogLine, prefixes: &HashMap<String, String>, show: &Show) -> String {
    let mut out = String::new();
    if !show.raw {
        out.push_str(prefixes.get(&l.task_id).map(String::as_str).unwrap_or("? | "));
    }
    if show.timestamps {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(l.ts_ns);
        out.push_str(&humantime::format_rfc3339_nanos(t).to_string());
        out.push(' ');
    }
    out.push_str(&l.text);
    out.push('\n');
    out
}

/// Asks the local daemon for the stream and prints it until it ends (without `follow`),
/// the daemon closes it, or the output is closed.
pub fn print(host: &Option<String>, spec: LogsRequest, show: Show) -> anyhow::Result<ExitCode> {
    let path = crate::socket_path(host)?;
    let follow = spec.follow;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let unreachable = |e: &dyn std::fmt::Display| ApiError::unavailable(format!("cannot reach the swarmnet daemon at {} (is it running? set --host or SWARMNET_HOST): {e}", path.display()));
        let mut s = tokio::net::UnixStream::connect(&path).await.map_err(|e| unreachable(&e))?;
        swarmnet_api::write_msg(&mut s, &ApiRequest::ServiceLogs { spec }).await.map_err(|e| unreachable(&e))?;
        let reply: Reply = swarmnet_api::read_msg(&mut s).await.map_err(|e| unreachable(&e))?.ok_or_else(|| ApiError::unavailable("the daemon closed the connection without answering"))?;
        let opened: LogsOpened = reply.into_data().map_err(|e| e.into_api())?;
        let prefixes = prefixes(&opened, &show);
        let stdout = std::io::stdout();
        let stderr = std::io::stderr();
        loop {
            let frame = match swarmnet_api::read_msg::<_, LogFrame>(&mut s).await {
                Ok(Some(f)) => f,
                Ok(None) => {
                    let why = if follow { "the log stream ended: the manager or this node's daemon stopped" } else { "the log stream ended before every node had sent its lines" };
                    return Err(ApiError::unavailable(why).into());
                }
                Err(e) => return Err(ApiError::unavailable(format!("the log stream failed: {e}")).into()),
            };
            match frame {
                LogFrame::End => return Ok(ExitCode::SUCCESS),
                LogFrame::Warning { message } => eprintln!("warning: {message}"),
                LogFrame::Lines { lines } => {
                    let (mut out, mut err) = (stdout.lock(), stderr.lock());
                    for l in &lines {
                        let text = format_line(l, &prefixes, &show);
                        let w: &mut dyn Write = if l.stream == LogStream::Stderr { &mut err } else { &mut out };
                        if w.write_all(text.as_bytes()).is_err() {
                            // The reader went away (`| head`): nothing more to show.
                            return Ok(ExitCode::SUCCESS);
                        }
                    }
                    if out.flush().is_err() {
                        return Ok(ExitCode::SUCCESS);
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarmnet_api::logs::LogSource;

    #[test]
    fn lines_are_prefixed_aligned_and_stamped_like_docker() {
        let opened = LogsOpened {
            sources: vec![
                LogSource { task_id: "abc".into(), name: "web.1".into(), node_id: "n1".into(), node: "n1".into() },
                LogSource { task_id: "defg".into(), name: "web.10".into(), node_id: "n2".into(), node: "node2".into() },
            ],
        };
        let show = Show { timestamps: false, task_ids: true, raw: false };
        let p = prefixes(&opened, &show);
        let l = LogLine { task_id: "abc".into(), ts_ns: 1_700_000_000_000_000_001, stream: LogStream::Stdout, text: "hello".into() };
        assert_eq!(format_line(&l, &p, &show), "web.1.abc@n1      | hello\n");
        let l2 = LogLine { task_id: "defg".into(), ..l.clone() };
        assert_eq!(format_line(&l2, &p, &show), "web.10.defg@node2 | hello\n");
        let t = Show { timestamps: true, task_ids: false, raw: false };
        assert_eq!(format_line(&l, &prefixes(&opened, &t), &t), "web.1@n1     | 2023-11-14T22:13:20.000000001Z hello\n");
        let raw = Show { timestamps: false, task_ids: true, raw: true };
        assert_eq!(format_line(&l, &prefixes(&opened, &raw), &raw), "hello\n");
    }
}
