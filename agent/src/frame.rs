//! Length-prefixed protobuf frames on data streams (see `proto/data.proto` for the layout): QUIC
//! streams, or the in-memory pipes of tests.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest segment header accepted: twice what the planner ever cuts
/// (`segment::MAX_BUNDLE_HEADER_BYTES`).
pub const MAX_HEADER: usize = 4 * 1024 * 1024;
/// Largest trailer or ack accepted.
pub const MAX_SMALL_FRAME: usize = 64 * 1024;

/// A frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or ended early.
    #[error("stream read failed: {0}")]
    Read(std::io::Error),
    /// The stream failed while writing.
    #[error("stream write failed: {0}")]
    Write(std::io::Error),
    /// The peer announced a frame over the limit.
    #[error("frame of {len} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit.
        limit: usize,
    },
    /// The frame is not valid protobuf.
    #[error("malformed frame: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// Writes one frame.
pub async fn write<M: Message, W: AsyncWrite + Unpin>(s: &mut W, m: &M) -> Result<(), FrameError> {
    let body = m.encode_to_vec();
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    s.write_all(&buf).await.map_err(FrameError::Write)?;
    Ok(())
}

/// Reads one frame of at most `limit` bytes.
pub async fn read<M: Message + Default, R: AsyncRead + Unpin>(
    r: &mut R,
    limit: usize,
) -> Result<M, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.map_err(FrameError::Read)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(FrameError::Read)?;
    Ok(M::decode(&body[..])?)
}
