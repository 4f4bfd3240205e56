//! Frames inside the TLS stream: kind (1 byte), length (u32, big endian),
//! payload. The largest accepted payload is small until the peer has
//! authenticated (so an unauthenticated peer cannot make us allocate), and
//! grows after.

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::ChannelError;

const KIND_MESSAGE: u8 = 1;
const KIND_DATA: u8 = 2;
const HEADER: usize = 5;

/// Largest frame before the peer authenticated: a hello or a proof.
pub const PRE_AUTH_MAX: usize = 4 << 10;
/// Largest control message once authenticated.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Largest data chunk (image bytes, a held packet).
pub const DATA_CHUNK: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A JSON control message.
    Message(Bytes),
    /// Raw bytes.
    Data(Bytes),
}

/// The header of a data frame of `len` bytes, for writers that send the
/// payload straight from its buffer instead of through the encoder.
pub fn data_header(len: usize) -> Result<[u8; HEADER], ChannelError> {
    let len = u32::try_from(len).map_err(|_| ChannelError::Frame("payload over 4 GiB".into()))?;
    let mut header = [0u8; HEADER];
    header[0] = KIND_DATA;
    header[1..].copy_from_slice(&len.to_be_bytes());
    Ok(header)
}

pub struct FrameCodec {
    max_message: usize,
    max_data: usize,
}

impl FrameCodec {
    /// Limits for an unauthenticated peer.
    pub const fn pre_auth() -> Self {
        Self {
            max_message: PRE_AUTH_MAX,
            max_data: 0,
        }
    }

    /// The peer proved who it is: full-size frames from now on.
    pub fn authenticated(&mut self) {
        self.max_message = MAX_MESSAGE;
        self.max_data = DATA_CHUNK;
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = ChannelError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ChannelError> {
        if src.len() < HEADER {
            return Ok(None);
        }
        let kind = src[0];
        let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]) as usize;
        let limit = match kind {
            KIND_MESSAGE => self.max_message,
            KIND_DATA => self.max_data,
            other => return Err(ChannelError::Frame(format!("unknown frame kind {other}"))),
        };
        if len > limit {
            return Err(ChannelError::Frame(format!(
                "frame of {len} bytes, limit {limit} here"
            )));
        }
        if src.len() < HEADER + len {
            src.reserve(HEADER + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER);
        let payload = src.split_to(len).freeze();
        Ok(Some(match kind {
            KIND_MESSAGE => Frame::Message(payload),
            _ => Frame::Data(payload),
        }))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = ChannelError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), ChannelError> {
        let (kind, payload) = match frame {
            Frame::Message(payload) => (KIND_MESSAGE, payload),
            Frame::Data(payload) => (KIND_DATA, payload),
        };
        let len = u32::try_from(payload.len())
            .map_err(|_| ChannelError::Frame("payload over 4 GiB".into()))?;
        dst.reserve(HEADER + payload.len());
        dst.put_u8(kind);
        dst.put_u32(len);
        dst.put_slice(&payload);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn frames_round_trip_and_split_anywhere() {
        let mut codec = FrameCodec::pre_auth();
        codec.authenticated();
        let mut wire = BytesMut::new();
        codec
            .encode(Frame::Message(Bytes::from_static(b"{}")), &mut wire)
            .unwrap();
        codec
            .encode(Frame::Data(Bytes::from(vec![7u8; 1000])), &mut wire)
            .unwrap();
        let bytes = wire.freeze();
        // Feed one byte at a time: nothing is decoded before it is whole.
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for byte in bytes.iter() {
            buf.put_u8(*byte);
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(
            frames,
            [
                Frame::Message(Bytes::from_static(b"{}")),
                Frame::Data(Bytes::from(vec![7u8; 1000]))
            ]
        );
    }

    #[test]
    fn an_unauthenticated_peer_gets_small_frames_and_no_data() {
        let mut codec = FrameCodec::pre_auth();
        let mut big = BytesMut::new();
        big.put_u8(KIND_MESSAGE);
        big.put_u32(1 << 20);
        assert!(codec.decode(&mut big).is_err(), "1 MiB before auth");
        let mut data = BytesMut::new();
        data.put_u8(KIND_DATA);
        data.put_u32(1);
        data.put_u8(0);
        assert!(codec.decode(&mut data).is_err(), "data before auth");
        let mut odd = BytesMut::from(&[9u8, 0, 0, 0, 0][..]);
        assert!(codec.decode(&mut odd).is_err(), "unknown kind");
    }
}
