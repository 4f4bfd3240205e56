//! One HTTP/1.1 request, the way the lab's clients ask nginx: `GET /`,
//! the answer read whole (headers, then nginx's three-byte "ok\n").

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
};

/// Ask once on `stream` (kept open: keep-alive); Err says what failed.
pub fn get(stream: &mut TcpStream) -> Result<(), String> {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: lab\r\n\r\n")
        .map_err(|e| format!("sending: {e}"))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).map_err(|e| format!("reading: {e}"))?;
        if n == 0 {
            return Err(format!("closed mid-answer after {} bytes", answer.len()));
        }
        answer.extend_from_slice(&buf[..n]);
        if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n")
            && answer.len() >= end + 4 + 3
        {
            let text = String::from_utf8_lossy(&answer);
            return if text.starts_with("HTTP/1.1 200") && text.ends_with("\r\n\r\nok\n") {
                Ok(())
            } else {
                Err(format!("unexpected answer: {text:?}"))
            };
        }
    }
}
