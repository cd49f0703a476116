//! TCP 2377 and the control socket: the length-prefixed JSON frames (`wire::read_msg`) as
//! each side reads them, one after another until the stream ends or is refused. The first
//! byte picks the message type.
#![no_main]

use std::future::Future;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use swarmnet_api::replies::{NetworkDetail, NodeInfo, ServiceInfo};
use swarmnet_api::wire::{read_msg, FrameError, MAX_FRAME};
use swarmnet_api::{FromAgent, FromManager, Hello, Joined, Reply, SessionOpened};

/// Reading from a byte slice never waits: one poll finishes it.
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("reading from memory waited"),
    }
}

fn frames<T: DeserializeOwned>(mut r: &[u8]) -> Vec<T> {
    let mut out = Vec::new();
    loop {
        match now(read_msg::<_, T>(&mut r)) {
            Ok(Some(m)) => out.push(m),
            Ok(None) => return out,
            Err(FrameError::TooLarge(n)) => {
                assert!(n > MAX_FRAME);
                return out;
            }
            Err(_) => return out,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 7 {
        0 => drop(frames::<Hello>(rest)),
        1 => drop(frames::<FromAgent>(rest)),
        2 => drop(frames::<FromManager>(rest)),
        3 => drop(frames::<Joined>(rest)),
        4 => drop(frames::<SessionOpened>(rest)),
        _ => {
            for r in frames::<Reply>(rest) {
                match mode % 3 {
                    0 => drop(r.into_data::<Vec<NodeInfo>>()),
                    1 => drop(r.into_data::<NetworkDetail>()),
                    _ => drop(r.into_data::<Vec<ServiceInfo>>()),
                }
            }
        }
    }
});
