//! Framing: a 4-byte big-endian length, then that many bytes of JSON (ADR 0002).

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame either side accepts; a larger length prefix closes the connection.
pub const MAX_FRAME: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Decode(#[from] serde_json::Error),
}

pub async fn write_msg<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge(body.len()))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Largest first frame of a connection (before the peer is known to be a node or the CLI:
/// a join, a session's task list, one request).
pub const MAX_FIRST_FRAME: usize = 4 << 20;

/// Reads one message; `Ok(None)` on a clean end of stream before a frame starts.
pub async fn read_msg<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R) -> Result<Option<T>, FrameError> {
    read_msg_within(r, MAX_FRAME).await
}

/// [`read_msg`] with a smaller size limit. The body is read as it arrives: a length prefix
/// alone never allocates its length (a peer that announces 16 MiB and stalls costs nothing).
pub async fn read_msg_within<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R, max: usize) -> Result<Option<T>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max.min(MAX_FRAME) {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = Vec::with_capacity(len.min(64 << 10));
    let got = r.take(len as u64).read_to_end(&mut body).await?;
    if got < len {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(Some(serde_json::from_slice(&body)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FromAgent;

    #[tokio::test]
    async fn framing_round_trip_and_limits() {
        let mut buf = Vec::new();
        write_msg(&mut buf, &FromAgent::Heartbeat).await.expect("write");
        let mut r = buf.as_slice();
        let m: Option<FromAgent> = read_msg(&mut r).await.expect("read");
        assert!(matches!(m, Some(FromAgent::Heartbeat)));
        let m: Option<FromAgent> = read_msg(&mut r).await.expect("eof");
        assert!(m.is_none());

        let huge = (u32::try_from(MAX_FRAME).expect("fits") + 1).to_be_bytes();
        let mut r = &huge[..];
        assert!(matches!(read_msg::<_, FromAgent>(&mut r).await, Err(FrameError::TooLarge(_))));

        // A prefix larger than the first-frame limit, then nothing: refused unread.
        let mut r = &(u32::try_from(MAX_FIRST_FRAME).expect("fits") + 1).to_be_bytes()[..];
        assert!(matches!(read_msg_within::<_, FromAgent>(&mut r, MAX_FIRST_FRAME).await, Err(FrameError::TooLarge(_))));
        // A frame cut short is an error, not a message.
        let mut short = 100u32.to_be_bytes().to_vec();
        short.extend_from_slice(b"{}");
        let mut r = short.as_slice();
        assert!(matches!(read_msg::<_, FromAgent>(&mut r).await, Err(FrameError::Io(_))));

        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"{{{{{");
        let mut r = garbage.as_slice();
        assert!(matches!(read_msg::<_, FromAgent>(&mut r).await, Err(FrameError::Decode(_))));
    }
}
