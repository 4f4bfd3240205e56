//! Mutual proof of the shared token, without sending it: each side sends a
//! random nonce and answers with HMAC-SHA256(token, role || both nonces).
//! The agent proves itself first, so a migrate never streams a process to
//! an impostor; the source then proves itself before the agent does
//! anything. The connection itself is not encrypted: run it over a
//! management network you trust (or a tunnel).

use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Channel, Message, PROTOCOL_VERSION, ProtocolError};

const NONCE_LEN: usize = 32;

fn nonce() -> Result<String, ProtocolError> {
    let mut bytes = [0u8; NONCE_LEN];
    getrandom::fill(&mut bytes)
        .map_err(|err| ProtocolError::Auth(format!("no randomness: {err}")))?;
    Ok(hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn proof(token: &[u8], role: &str, first: &str, second: &str) -> Result<String, ProtocolError> {
    let mut mac = Hmac::<Sha256>::new_from_slice(token)
        .map_err(|err| ProtocolError::Auth(format!("token unusable as a key: {err}")))?;
    mac.update(role.as_bytes());
    mac.update(first.as_bytes());
    mac.update(second.as_bytes());
    Ok(hex(&mac.finalize().into_bytes()))
}

fn verify(
    token: &[u8],
    role: &str,
    first: &str,
    second: &str,
    claimed: &str,
) -> Result<bool, ProtocolError> {
    let expected = proof(token, role, first, second)?;
    // Constant time: compare every byte whatever the first difference.
    Ok(expected.len() == claimed.len()
        && expected
            .bytes()
            .zip(claimed.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0)
}

/// Source side: returns once both sides proved the token.
pub async fn client<S: AsyncRead + AsyncWrite + Unpin>(
    channel: &mut Channel<S>,
    token: &[u8],
) -> Result<(), ProtocolError> {
    let client_nonce = nonce()?;
    channel
        .send(&Message::Hello {
            version: PROTOCOL_VERSION,
            nonce: client_nonce.clone(),
        })
        .await?;
    let (agent_nonce, agent_proof) = match channel.receive().await? {
        Message::Challenge { nonce, proof } => (nonce, proof),
        Message::Refused { reason } => return Err(ProtocolError::Refused(reason)),
        other => {
            return Err(ProtocolError::Unexpected {
                expected: "challenge",
                got: other.name(),
            });
        }
    };
    if !verify(token, "agent", &client_nonce, &agent_nonce, &agent_proof)? {
        return Err(ProtocolError::Auth(
            "the agent does not know our token: check --token-file on both hosts".into(),
        ));
    }
    channel
        .send(&Message::Auth {
            proof: proof(token, "source", &agent_nonce, &client_nonce)?,
        })
        .await?;
    match channel.receive().await? {
        Message::AuthOk => Ok(()),
        Message::Refused { reason } => Err(ProtocolError::Refused(reason)),
        other => Err(ProtocolError::Unexpected {
            expected: "auth-ok",
            got: other.name(),
        }),
    }
}

/// Agent side: Ok(()) once the source proved the token; on a wrong proof
/// the source is told so and the connection is to be dropped.
pub async fn server<S: AsyncRead + AsyncWrite + Unpin>(
    channel: &mut Channel<S>,
    token: &[u8],
) -> Result<(), ProtocolError> {
    let client_nonce = match channel.receive().await? {
        Message::Hello { version, nonce } if version == PROTOCOL_VERSION => nonce,
        Message::Hello { version, .. } => {
            let reason = format!(
                "protocol version {version}, this agent speaks {PROTOCOL_VERSION}: run the same migrator version on both hosts"
            );
            channel
                .send(&Message::Refused {
                    reason: reason.clone(),
                })
                .await?;
            return Err(ProtocolError::Auth(reason));
        }
        other => {
            return Err(ProtocolError::Unexpected {
                expected: "hello",
                got: other.name(),
            });
        }
    };
    if client_nonce.len() != NONCE_LEN * 2 {
        return Err(ProtocolError::Auth("malformed nonce".into()));
    }
    let agent_nonce = nonce()?;
    channel
        .send(&Message::Challenge {
            nonce: agent_nonce.clone(),
            proof: proof(token, "agent", &client_nonce, &agent_nonce)?,
        })
        .await?;
    let claimed = match channel.receive().await? {
        Message::Auth { proof } => proof,
        other => {
            return Err(ProtocolError::Unexpected {
                expected: "auth",
                got: other.name(),
            });
        }
    };
    if !verify(token, "source", &agent_nonce, &client_nonce, &claimed)? {
        let _ = channel
            .send(&Message::Refused {
                reason: "wrong token".into(),
            })
            .await;
        return Err(ProtocolError::Auth("the source sent a wrong token".into()));
    }
    channel.send(&Message::AuthOk).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn same_token_passes_and_a_wrong_one_is_refused_both_ways() {
        for (agent_token, source_token, ok) in [
            (&b"0123456789abcdef"[..], &b"0123456789abcdef"[..], true),
            (&b"0123456789abcdef"[..], &b"0123456789abcdeX"[..], false),
        ] {
            let (a, b) = tokio::io::duplex(4096);
            let agent =
                tokio::spawn(async move { server(&mut Channel::new(a), agent_token).await });
            let source = client(&mut Channel::new(b), source_token).await;
            let agent = agent.await.unwrap();
            assert_eq!(source.is_ok(), ok, "{source:?}");
            // With a wrong token the agent is never asked: the source already
            // saw the agent's proof fail and hung up.
            assert_eq!(agent.is_ok(), ok, "{agent:?}");
        }
    }
}
