//! Whole-screen snapshots on ratatui's TestBackend.

use qpq_core::client::{ConnState, ConvKind, Conversation, HistoryEntry};
use qpq_core::content::FileOffer;

use ratatui::Terminal;
use ratatui::backend::TestBackend;

use crate::app::{Action, App, Focus, InfoView, Overlay, TransferView, WorkerEvent};
use crate::config::Config;
use crate::login::Form;

/// 2026-01-01 12:00 UTC.
const NOON: u64 = 1_767_268_800_000;

fn conv(id: u8, name: &str, kind: ConvKind, unread: u32, mentions: u32) -> Conversation {
    Conversation {
        id: vec![id; 16].into(),
        kind,
        name: name.into(),
        topic: if kind == ConvKind::Group { "launch on friday".into() } else { String::new() },
        peer: None,
        last_activity_ms: NOON,
        unread,
        mentions,
        next_seq: 6,
        // bob's safety number was compared: the list marks him.
        verified: kind == ConvKind::Dm && name == "bob",
        warning: String::new(),
    }
}

fn entry(seq: u64, sender: u8, text: &str, minute: u64) -> HistoryEntry {
    HistoryEntry {
        seq,
        message_id: [seq as u8 + 1; 16].into(),
        sender: vec![sender; 32],
        sent_at_ms: NOON + minute * 60_000,
        received_at_ms: NOON + minute * 60_000,
        text: text.into(),
        reply_to: None,
        file: None,
        edited: false,
        deleted: false,
        reactions: vec![],
        read_by: vec![],
        system: false,
        pending: false,
    }
}

fn base() -> App {
    let mut a = App::new(Config::default());
    a.update(Action::Worker(WorkerEvent::Identity {
        username: "alice".into(),
        server: "192.0.2.1:5001".into(),
        identity: "d4d532c24695".into(),
    }));
    a.update(Action::Worker(WorkerEvent::Status {
        conn: ConnState::Online,
        outbox: 0,
        retry_in: None,
    }));
    a
}

fn with_history() -> App {
    let mut a = base();
    a.update(Action::Worker(WorkerEvent::Conversations(vec![
        conv(1, "team", ConvKind::Group, 0, 0),
        conv(2, "bob", ConvKind::Dm, 2, 1),
        conv(3, "ops", ConvKind::Group, 0, 0),
    ])));
    let mut system = entry(0, 0, "alice added bob, carol", 0);
    system.system = true;
    system.sender = vec![];
    let mut hello = entry(1, 1, "hello team, the router is flashed", 1);
    hello.reactions = vec![("👍".into(), vec![2; 32]), ("👍".into(), vec![3; 32])];
    hello.read_by = vec![vec![2; 32], vec![3; 32]];
    let mut edited = entry(2, 2, "great, I will test it tonight", 2);
    edited.edited = true;
    let mut reply = entry(3, 3, "@alice which firmware?", 3);
    reply.reply_to = Some([2; 16].into());
    let mut file = entry(4, 1, "[file] notes.pdf", 4);
    file.file = Some(FileOffer {
        blob_id: [0; 32],
        size: 1_572_864,
        ciphertext_size: 1_573_248,
        name: "notes.pdf".into(),
        media_type: "application/pdf".into(),
        key: [0; 32],
        sha256: [0; 32],
    });
    let mut deleted = entry(5, 2, "", 5);
    deleted.deleted = true;
    a.new_from = Some(3);
    a.update(Action::Worker(WorkerEvent::History {
        conv: vec![1; 16].into(),
        entries: vec![system, hello, edited, reply, file, deleted],
        names: vec![
            (vec![1; 32], "alice".into()),
            (vec![2; 32], "bob".into()),
            (vec![3; 32], "carol".into()),
        ],
    }));
    a.update(Action::Worker(WorkerEvent::Members {
        conv: vec![1; 16].into(),
        members: vec![
            ("alice".into(), true, vec![1; 32]),
            ("bob".into(), false, vec![2; 32]),
            ("carol".into(), false, vec![3; 32]),
        ],
    }));
    a
}

fn render(app: &App, w: u16, h: u16) -> TestBackend {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| super::draw(f, app)).unwrap();
    t.backend().clone()
}

#[test]
fn empty_state() {
    insta::assert_snapshot!("empty_80x24", render(&base(), 80, 24));
}

#[test]
fn conversation_with_history_at_80x24() {
    insta::assert_snapshot!("history_80x24", render(&with_history(), 80, 24));
}

#[test]
fn group_with_members_and_typing_at_100x30() {
    let mut a = with_history();
    a.update(Action::Worker(WorkerEvent::Typing {
        conv: vec![1; 16].into(),
        who: "carol".into(),
        active: true,
    }));
    insta::assert_snapshot!("group_members_100x30", render(&a, 100, 30));
}

#[test]
fn file_transfer_in_progress() {
    let mut a = with_history();
    a.transfers.push(TransferView {
        name: "backup.tar".into(),
        done: 3 << 20,
        total: 5 << 20,
        upload: true,
    });
    a.outbox = 2;
    a.update(Action::Worker(WorkerEvent::Status {
        conn: ConnState::Reconnecting,
        outbox: 2,
        retry_in: None,
    }));
    insta::assert_snapshot!("transfer_100x30", render(&a, 100, 30));
}

#[test]
fn help_overlay() {
    let mut a = with_history();
    a.overlay = Some(Overlay::Help);
    insta::assert_snapshot!("help_100x40", render(&a, 100, 40));
}

#[test]
fn group_info_overlay_and_timeline_selection() {
    let mut a = with_history();
    a.focus = Focus::Timeline;
    a.cursor = 2;
    a.overlay = Some(Overlay::Info(InfoView {
        name: "team".into(),
        topic: "launch on friday".into(),
        epoch: 7,
        code: "36f1-828a-54fb-0784-0683".into(),
        members: vec![("alice".into(), true), ("bob".into(), false)],
    }));
    insta::assert_snapshot!("info_100x30", render(&a, 100, 30));
}

#[test]
fn a_group_named_like_a_contact_is_flagged_and_never_shown_bare() {
    let mut a = base();
    // mallory named her group "bob"; the DM with the real bob is there too.
    a.update(Action::Worker(WorkerEvent::Conversations(vec![
        conv(4, "bob", ConvKind::Group, 1, 0),
        conv(2, "bob", ConvKind::Dm, 0, 0),
        conv(1, "team", ConvKind::Group, 0, 0),
    ])));
    a.overlay = Some(Overlay::Switcher { query: "bob".into(), selected: 0 });
    let screen = render(&a, 100, 30);
    insta::assert_snapshot!("named_like_a_contact_100x30", screen);
    let text = screen.to_string();
    assert!(text.contains("#bob ⚠") && text.contains("@bob"), "{text}");
    assert!(text.contains("⚠ a group, not @bob"), "the open group's title says so: {text}");
    assert!(!text.contains("#team ⚠"), "{text}");
}

#[test]
fn login_screen() {
    let mut form = Form::register("192.0.2.1:5001");
    for c in "alice".chars() {
        form.key(crossterm::event::KeyEvent::from(crossterm::event::KeyCode::Char(c)));
    }
    let mut t = Terminal::new(TestBackend::new(80, 24)).unwrap();
    t.draw(|f| form.draw(f)).unwrap();
    insta::assert_snapshot!("login_80x24", t.backend());
}

#[test]
fn a_resize_redraws_without_garbage() {
    let a = with_history();
    let mut t = Terminal::new(TestBackend::new(120, 40)).unwrap();
    t.draw(|f| super::draw(f, &a)).unwrap();
    t.backend_mut().resize(80, 24);
    t.resize(ratatui::layout::Rect::new(0, 0, 80, 24)).unwrap();
    t.draw(|f| super::draw(f, &a)).unwrap();
    assert_eq!(t.backend().to_string(), render(&a, 80, 24).to_string());
}

#[test]
fn a_changed_key_warning_fits_80x24() {
    let mut a = with_history();
    a.update(Action::Worker(WorkerEvent::Alert {
        title: "bob's key changed".into(),
        text: "WARNING: the server now says bob is account 9f2c…, but you have known bob as \
               account 41d0…. Someone may be impersonating bob (or they registered again). \
               Nothing was sent. Compare safety numbers with bob in person or on a call, then \
               accept the new key with `qpq trust bob`."
            .into(),
    }));
    insta::assert_snapshot!("key_changed_80x24", render(&a, 80, 24));
}

#[test]
fn safety_number_overlay_offers_to_mark_verified() {
    let mut a = with_history();
    a.update(Action::Worker(WorkerEvent::Safety {
        user: "bob".into(),
        number: "12345 67890 12345 67890 12345 67890 12345 67890 12345 67890 12345 67890".into(),
        verified: false,
    }));
    insta::assert_snapshot!("safety_80x24", render(&a, 80, 24));
}

#[test]
fn offline_shows_the_retry_countdown_and_the_outbox() {
    let mut a = with_history();
    a.update(Action::Worker(WorkerEvent::Status {
        conn: ConnState::Offline,
        outbox: 3,
        retry_in: Some(std::time::Duration::from_millis(3_200)),
    }));
    let screen = render(&a, 100, 30).to_string();
    let status = screen.lines().rfind(|l| l.contains("offline")).unwrap_or_default();
    assert!(status.contains("○ offline · retry in 4s"), "{status}");
    assert!(status.contains("outbox 3"), "{status}");
    // Time passes (ticks): the countdown follows.
    let later = a.now + std::time::Duration::from_secs(2);
    a.update(Action::Tick(later));
    let screen = render(&a, 100, 30).to_string();
    assert!(screen.contains("retry in 2s"), "{screen}");
}
