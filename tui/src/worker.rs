//! The network side of the UI: owns the [`Client`], runs [`Command`]s, and turns engine events
//! into [`WorkerEvent`]s. The UI never waits on it.

use std::time::Duration;

use qpq_core::client::{Client, ClientError, ConnState, ConvKind, Event};
use qpq_core::content::Body;
use qpq_core::identity::hex;
use tokio::sync::{broadcast, mpsc};

use crate::app::{Command, InfoView, WorkerEvent};
use crate::config::NotifyLevel;

/// Messages of history loaded when a conversation opens.
pub const HISTORY_PAGE: usize = 500;

/// Runs until the command channel closes.
pub async fn run(
    mut client: Client,
    mut rx: mpsc::Receiver<Command>,
    tx: mpsc::Sender<WorkerEvent>,
) {
    let mut events = client.subscribe();
    let mut open: Option<Vec<u8>> = None;
    let _ = tx
        .send(WorkerEvent::Identity {
            username: client.username().to_string(),
            server: client.server().to_string(),
            identity: hex(&client.identity_key()[..6]),
        })
        .await;
    send_conversations(&client, &tx).await;
    for c in client.conversations().unwrap_or_default() {
        let level =
            match client.setting(&format!("notify/{}", hex(&c.id))).ok().flatten().as_deref() {
                Some("all") => NotifyLevel::All,
                Some("mentions") => NotifyLevel::Mentions,
                Some("none") => NotifyLevel::None,
                _ => continue,
            };
        let _ = tx.send(WorkerEvent::NotifyLevel { conv: c.id, level }).await;
    }
    let mut backoff = Duration::from_millis(200);
    loop {
        // Forward what the engine reported since the last turn (never inside the select:
        // an event must not cancel a sync half-way).
        loop {
            match events.try_recv() {
                Ok(ev) => forward(&mut client, ev, open.as_deref(), &tx).await,
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    send_conversations(&client, &tx).await
                }
                Err(_) => break,
            }
        }
        let online = client.is_online();
        tokio::select! {
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break };
                if cmd == Command::Quit {
                    break;
                }
                if let Command::Open(id) = &cmd {
                    open = Some(id.clone());
                }
                if let Err(e) = handle(&mut client, cmd, &tx).await {
                    let event = match &e {
                        // Loud and blocking: an overlay that must be acknowledged.
                        ClientError::KeyChanged { username, .. } => WorkerEvent::Alert {
                            title: format!("{username}'s key changed"),
                            text: e.to_string(),
                        },
                        _ => WorkerEvent::Error(e.to_string()),
                    };
                    let _ = tx.send(event).await;
                }
                let _ = tx.send(WorkerEvent::Status { conn: state(&client), outbox: client.outbox_len().unwrap_or(0) }).await;
            }
            // Cancel-safe: a command interrupts the wait, never a sync.
            r = client.wait_for_activity(Duration::from_secs(20)), if online => {
                if let Err(e) = r {
                    report_net(&client, e, &tx).await;
                }
            }
            () = tokio::time::sleep(backoff), if !online => {
                match client.ensure_connected().await {
                    Ok(()) => {
                        backoff = Duration::from_millis(200);
                        send_conversations(&client, &tx).await;
                    }
                    Err(e) => {
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        report_net(&client, e, &tx).await;
                    }
                }
                let _ = tx.send(WorkerEvent::Status { conn: state(&client), outbox: client.outbox_len().unwrap_or(0) }).await;
            }
        }
        if client.is_online()
            && let Err(e) = client.sync().await
        {
            report_net(&client, e, &tx).await;
        }
    }
    client.disconnect().await;
}

fn state(c: &Client) -> ConnState {
    if c.is_online() { ConnState::Online } else { ConnState::Reconnecting }
}

async fn report_net(client: &Client, e: ClientError, tx: &mpsc::Sender<WorkerEvent>) {
    let text = match &e {
        ClientError::NeedLogin => "session expired: quit and run `qpq login`".to_string(),
        _ => e.to_string(),
    };
    let _ = tx.send(WorkerEvent::Error(text)).await;
    let _ = tx
        .send(WorkerEvent::Status { conn: state(client), outbox: client.outbox_len().unwrap_or(0) })
        .await;
}

async fn send_conversations(client: &Client, tx: &mpsc::Sender<WorkerEvent>) {
    if let Ok(list) = client.conversations() {
        let _ = tx.send(WorkerEvent::Conversations(list)).await;
    }
}

async fn send_history(
    client: &mut Client,
    conv: &[u8],
    tx: &mpsc::Sender<WorkerEvent>,
) -> Result<(), ClientError> {
    let entries = client.history(conv, HISTORY_PAGE)?;
    let mut names = Vec::new();
    for e in &entries {
        if let Some(n) = client.cached_name(&e.sender) {
            names.push((e.sender.clone(), n));
        }
    }
    let _ = tx.send(WorkerEvent::History { conv: conv.to_vec(), entries, names }).await;
    Ok(())
}

async fn send_members(client: &mut Client, conv: &[u8], tx: &mpsc::Sender<WorkerEvent>) {
    if client.conversation(conv).ok().flatten().is_none_or(|c| c.kind != ConvKind::Group) {
        return;
    }
    if let Ok(info) = client.group_info(conv).await {
        let members =
            info.members.into_iter().map(|(id, name, admin)| (name, admin, id.to_vec())).collect();
        let _ = tx.send(WorkerEvent::Members { conv: conv.to_vec(), members }).await;
    }
}

async fn forward(
    client: &mut Client,
    ev: Event,
    open: Option<&[u8]>,
    tx: &mpsc::Sender<WorkerEvent>,
) {
    match ev {
        Event::Message { conv, entry } => {
            let sender = match <[u8; 32]>::try_from(entry.sender.as_slice()) {
                Ok(id) => client.name_of(&id).await,
                Err(_) => String::new(),
            };
            let mention = entry.text.contains(&format!("@{}", client.username()));
            if open == Some(conv.as_slice()) {
                let _ = client.mark_read(&conv);
            }
            let _ = tx.send(WorkerEvent::Incoming { conv, entry, sender, mention }).await;
            send_conversations(client, tx).await;
        }
        Event::Updated { conv, .. } if open == Some(conv.as_slice()) => {
            let _ = send_history(client, &conv, tx).await;
        }
        Event::Typing { conv, who, active } => {
            let name = client.name_of(&who).await;
            let _ = tx.send(WorkerEvent::Typing { conv, who: name, active }).await;
        }
        Event::Conversation { conv } => {
            send_conversations(client, tx).await;
            if open == Some(conv.as_slice()) {
                send_members(client, &conv, tx).await;
            }
        }
        Event::Transfer(t) => {
            let _ = tx
                .send(WorkerEvent::Transfer {
                    name: t.name,
                    done: t.done,
                    total: t.total,
                    upload: t.upload,
                })
                .await;
        }
        Event::Connection(conn) => {
            let _ = tx
                .send(WorkerEvent::Status { conn, outbox: client.outbox_len().unwrap_or(0) })
                .await;
        }
        Event::Rejected { reason } => {
            let _ = tx.send(WorkerEvent::Error(format!("rejected a message: {reason}"))).await;
        }
        Event::Gap { after, next } => {
            let _ = tx
                .send(WorkerEvent::Error(format!(
                    "messages {}..{} expired on the server before arriving",
                    after + 1,
                    next - 1
                )))
                .await;
        }
        _ => {}
    }
}

async fn handle(
    client: &mut Client,
    cmd: Command,
    tx: &mpsc::Sender<WorkerEvent>,
) -> Result<(), ClientError> {
    match cmd {
        Command::Open(conv) => {
            send_history(client, &conv, tx).await?;
            let last = client.mark_read(&conv)?;
            send_conversations(client, tx).await;
            send_members(client, &conv, tx).await;
            if let Some(up_to) = last {
                // A read receipt; failures (offline) are not worth an error line.
                let _ = client.send(&conv, Body::Receipt { up_to }).await;
            }
        }
        Command::Older { conv, before } => {
            let entries = client.history_before(&conv, before, HISTORY_PAGE)?;
            let names = entries
                .iter()
                .filter_map(|e| client.cached_name(&e.sender).map(|n| (e.sender.clone(), n)))
                .collect();
            let _ = tx.send(WorkerEvent::Older { conv, entries, names }).await;
        }
        Command::Send { conv, text, reply_to } => {
            client.send(&conv, Body::Text { body: text, reply_to }).await?;
            send_history(client, &conv, tx).await?;
        }
        Command::Typing { conv, active } => {
            let _ = client.send_typing(&conv, active).await;
        }
        Command::Dm(user) => {
            let conv = client.dm(&user).await?;
            send_conversations(client, tx).await;
            let _ = tx.send(WorkerEvent::Notice(format!("DM with {user} ready"))).await;
            send_history(client, &conv, tx).await?;
        }
        Command::CreateGroup(name) => {
            if let Some(why) = crate::cli::personal_name(client, &name)? {
                return Err(ClientError::Invalid(why));
            }
            client.create_group(&name).await?;
            send_conversations(client, tx).await;
            let _ = tx.send(WorkerEvent::Notice(format!("created #{name}; /invite people"))).await;
        }
        Command::Add { conv, users } => {
            client.add_members(&conv, &users).await?;
            send_members(client, &conv, tx).await;
            send_history(client, &conv, tx).await?;
        }
        Command::Remove { conv, user } => {
            client.remove_member(&conv, &user).await?;
            send_members(client, &conv, tx).await;
            send_history(client, &conv, tx).await?;
        }
        Command::SetAdmin { conv, user, admin } => {
            client.set_admin(&conv, &user, admin).await?;
            send_members(client, &conv, tx).await;
            send_history(client, &conv, tx).await?;
        }
        Command::Rename { conv, name, topic } => {
            // `/topic` keeps the name it has; only a new name is checked.
            let current = client.conversation(&conv)?.map(|c| c.name);
            if current.as_deref() != Some(name.as_str())
                && let Some(why) = crate::cli::personal_name(client, &name)?
            {
                return Err(ClientError::Invalid(why));
            }
            client.rename(&conv, &name, topic.as_deref()).await?;
            send_conversations(client, tx).await;
        }
        Command::Leave(conv) => {
            client.leave(&conv).await?;
            send_conversations(client, tx).await;
            let _ = tx.send(WorkerEvent::Notice("left the group".into())).await;
        }
        Command::Rotate(conv) => {
            client.rotate_keys(&conv).await?;
            let _ = tx.send(WorkerEvent::Notice("keys rotated".into())).await;
        }
        Command::Info(conv) => {
            let info = client.group_info(&conv).await?;
            let view = InfoView {
                name: info.conversation.name,
                topic: info.conversation.topic,
                epoch: info.epoch,
                code: info.verification_code,
                members: info.members.into_iter().map(|(_, n, a)| (n, a)).collect(),
            };
            let _ = tx.send(WorkerEvent::Info(view)).await;
        }
        Command::Verify(user) => {
            let number = client.safety_number(&user).await?;
            let verified = client.contact(&user)?.is_some_and(|c| c.verified);
            let _ = tx.send(WorkerEvent::Safety { user, number, verified }).await;
        }
        Command::MarkVerified { user, verified } => {
            client.mark_verified(&user, verified)?;
            let what = if verified { "marked verified ✓" } else { "no longer marked verified" };
            let _ = tx.send(WorkerEvent::Notice(format!("{user}: {what}"))).await;
            send_conversations(client, tx).await;
        }
        Command::SendFile { conv, path } => {
            let offer = client.send_file(&conv, &path).await?;
            let _ = tx.send(WorkerEvent::Notice(format!("sent {}", offer.name))).await;
            send_history(client, &conv, tx).await?;
        }
        Command::Download { conv, message_id, dir } => {
            let entry = client
                .history(&conv, usize::MAX)?
                .into_iter()
                .find(|e| e.message_id == message_id)
                .ok_or_else(|| ClientError::Invalid("no such message".into()))?;
            let offer = Client::offer_of(&entry)
                .ok_or_else(|| ClientError::Invalid("not a file".into()))?;
            let dir = dir.unwrap_or_else(crate::downloads::default_dir);
            let path = client.download(&offer, &dir).await?;
            let saved = crate::downloads::printable(&path.display().to_string());
            let renamed = path.file_name().is_none_or(|n| n.to_string_lossy() != offer.name);
            let notice = if renamed {
                format!("saved {saved} (offered as {:?})", offer.name)
            } else {
                format!("saved {saved}")
            };
            let _ = tx.send(WorkerEvent::Notice(notice)).await;
        }
        Command::React { conv, target, emoji } => {
            client.send(&conv, Body::Reaction { target, emoji, remove: false }).await?;
            send_history(client, &conv, tx).await?;
        }
        Command::Edit { conv, target, text } => {
            client.send(&conv, Body::Edit { target, body: text }).await?;
            send_history(client, &conv, tx).await?;
        }
        Command::Delete { conv, target } => {
            client.send(&conv, Body::Delete { target }).await?;
            send_history(client, &conv, tx).await?;
        }
        Command::Notify { conv, level } => {
            let v = match level {
                NotifyLevel::All => "all",
                NotifyLevel::Mentions => "mentions",
                NotifyLevel::None => "none",
            };
            client.set_setting(&format!("notify/{}", hex(&conv)), v)?;
            let _ = tx.send(WorkerEvent::Notice(format!("notifications: {v}"))).await;
        }
        Command::Copy(_) | Command::Quit => {}
    }
    Ok(())
}
