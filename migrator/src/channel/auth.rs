//! Who is on the other end, proven inside the TLS session before anything
//! else passes: hello (protocol version), the agent's proof, the source's
//! proof, ok. With a token, each proof is an HMAC over this session's
//! exporter (see `token`); with certificates, TLS already checked both
//! ends against the CA and the proofs are empty. The agent proves itself
//! first, so a source never streams a process to an impostor.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    Channel, ChannelError, Credentials, Message, PROTOCOL_VERSION,
    token::{Role, Token, from_hex, to_hex},
};

/// Our proof as `role` for this session, if we use a token.
fn our_proof<S>(channel: &Channel<S>, credentials: &Credentials, role: Role) -> Option<String> {
    credentials
        .token()
        .map(|token| to_hex(&token.prove(role, &channel.exporter)))
}

/// Whether the other side's proof is what our credentials expect.
fn check_proof<S>(
    channel: &Channel<S>,
    token: Option<&Token>,
    role: Role,
    proof: Option<&str>,
) -> Result<(), String> {
    match (token, proof) {
        (None, None) => Ok(()),
        (Some(token), Some(proof)) => {
            let valid =
                from_hex(proof).is_some_and(|bytes| token.verify(role, &channel.exporter, &bytes));
            if valid {
                Ok(())
            } else {
                Err("wrong token (or a relay between the hosts)".into())
            }
        }
        (Some(_), None) => Err("the other side uses certificates, we use a token".into()),
        (None, Some(_)) => Err("the other side uses a token, we use certificates".into()),
    }
}

/// Source side: returns once both sides are proven.
pub async fn client<S: AsyncRead + AsyncWrite + Unpin>(
    channel: &mut Channel<S>,
    credentials: &Credentials,
) -> Result<(), ChannelError> {
    channel
        .send(&Message::Hello {
            version: PROTOCOL_VERSION,
        })
        .await?;
    let agent_proof = match channel.receive().await? {
        Message::Challenge { proof } => proof,
        Message::Refused { reason } => {
            return Err(ChannelError::Refused(super::printable(&reason)));
        }
        other => {
            return Err(ChannelError::Unexpected {
                expected: "challenge",
                got: other.name(),
            });
        }
    };
    check_proof(
        channel,
        credentials.token(),
        Role::Agent,
        agent_proof.as_deref(),
    )
    .map_err(|why| {
        ChannelError::Auth(format!(
            "the agent did not prove our token: {why}; check --token-file on both hosts"
        ))
    })?;
    let proof = our_proof(channel, credentials, Role::Source);
    channel.send(&Message::Auth { proof }).await?;
    match channel.receive().await? {
        Message::AuthOk => {
            channel.authenticated();
            Ok(())
        }
        Message::Refused { reason } => Err(ChannelError::Refused(super::printable(&reason))),
        other => Err(ChannelError::Unexpected {
            expected: "auth-ok",
            got: other.name(),
        }),
    }
}

/// Agent side: Ok(()) once the source is proven; otherwise the source is
/// told why and the connection is to be dropped.
pub async fn server<S: AsyncRead + AsyncWrite + Unpin>(
    channel: &mut Channel<S>,
    credentials: &Credentials,
) -> Result<(), ChannelError> {
    match channel.receive().await? {
        Message::Hello { version } if version == PROTOCOL_VERSION => {}
        Message::Hello { version } => {
            let reason = format!(
                "protocol version {version}, this agent speaks {PROTOCOL_VERSION}: run the same migrator version on both hosts"
            );
            let _ = channel
                .send(&Message::Refused {
                    reason: reason.clone(),
                })
                .await;
            return Err(ChannelError::Auth(reason));
        }
        other => {
            return Err(ChannelError::Unexpected {
                expected: "hello",
                got: other.name(),
            });
        }
    }
    let proof = our_proof(channel, credentials, Role::Agent);
    channel.send(&Message::Challenge { proof }).await?;
    let claimed = match channel.receive().await? {
        Message::Auth { proof } => proof,
        other => {
            return Err(ChannelError::Unexpected {
                expected: "auth",
                got: other.name(),
            });
        }
    };
    if let Err(why) = check_proof(
        channel,
        credentials.token(),
        Role::Source,
        claimed.as_deref(),
    ) {
        let _ = channel
            .send(&Message::Refused {
                reason: why.clone(),
            })
            .await;
        return Err(ChannelError::Auth(format!("the source: {why}")));
    }
    channel.send(&Message::AuthOk).await?;
    channel.authenticated();
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Both ends of the proofs over an in-memory pipe: the agent with
    /// `agent_token`, the source with `source_token`, each seeing its own
    /// exporter value. Returns (source's result, agent's result).
    async fn prove(
        agent_token: [u8; 32],
        source_token: [u8; 32],
        agent_exporter: [u8; 32],
        source_exporter: [u8; 32],
    ) -> (Result<(), ChannelError>, Result<(), ChannelError>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut agent_end = Channel::new(a, agent_exporter);
        let agent = tokio::spawn(async move {
            server(
                &mut agent_end,
                &Credentials::Token(Token::from_bytes(&agent_token)),
            )
            .await
        });
        let mut source_end = Channel::new(b, source_exporter);
        let source = client(
            &mut source_end,
            &Credentials::Token(Token::from_bytes(&source_token)),
        )
        .await;
        // A source that gives up hangs up; the agent then fails too.
        drop(source_end);
        (source, agent.await.unwrap())
    }

    #[tokio::test]
    async fn same_token_passes_and_a_wrong_one_is_refused_both_ways() {
        for (source_token, ok) in [([1u8; 32], true), ([2u8; 32], false)] {
            let (source, agent) = prove([1; 32], source_token, [9; 32], [9; 32]).await;
            assert_eq!(source.is_ok(), ok, "{source:?}");
            // With a wrong token the source stops at the agent's proof and
            // the agent never sees a valid one.
            assert_eq!(agent.is_ok(), ok);
        }
    }

    /// A relay holds two TLS sessions, so the two ends see different
    /// exporters: proofs it passes along fail, whoever holds the token.
    #[tokio::test]
    async fn proofs_from_another_session_fail() {
        let (source, agent) = prove([1; 32], [1; 32], [9; 32], [10; 32]).await;
        assert!(
            matches!(&source, Err(ChannelError::Auth(why)) if why.contains("relay")),
            "{source:?}"
        );
        assert!(agent.is_err());
    }
}
