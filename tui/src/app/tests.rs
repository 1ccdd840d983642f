use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use std::time::{Duration, Instant};

use qpq_core::client::{ConvKind, Conversation, HistoryEntry};

use super::*;

fn key(c: KeyCode) -> Action {
    Action::Key(KeyEvent::new(c, KeyModifiers::NONE))
}

fn typed(app: &mut App, s: &str) -> Vec<Command> {
    let mut out = Vec::new();
    for ch in s.chars() {
        out.extend(app.update(key(KeyCode::Char(ch))));
    }
    out
}

fn ctrl(c: char) -> Action {
    Action::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL))
}

fn conv(id: u8, name: &str, kind: ConvKind, unread: u32) -> Conversation {
    Conversation {
        id: vec![id; 16].into(),
        kind,
        name: name.into(),
        topic: String::new(),
        peer: None,
        last_activity_ms: 0,
        unread,
        mentions: 0,
        next_seq: 10,
        verified: false,
        warning: String::new(),
    }
}

/// An app with two conversations; the first (#team) open.
fn app() -> App {
    let mut a = App::new(Config::default());
    a.username = "alice".into();
    let cmds = a.update(Action::Worker(WorkerEvent::Conversations(vec![
        conv(1, "team", ConvKind::Group, 0),
        conv(2, "bob", ConvKind::Dm, 2),
    ])));
    assert_eq!(cmds, vec![Command::Open(vec![1; 16].into())], "the first conversation opens");
    a
}

#[test]
fn enter_sends_the_composer_text_to_the_open_conversation() {
    let mut a = app();
    typed(&mut a, "hello world");
    let cmds = a.update(key(KeyCode::Enter));
    assert_eq!(
        cmds,
        vec![Command::Send {
            conv: vec![1; 16].into(),
            text: "hello world".into(),
            reply_to: None
        }]
    );
    assert!(a.composer.is_empty(), "the composer clears");
    assert!(a.update(key(KeyCode::Enter)).is_empty(), "an empty composer sends nothing");
    // Up recalls the last line.
    a.update(key(KeyCode::Up));
    assert_eq!(a.composer.lines(), ["hello world"]);
}

#[test]
fn typing_notices_are_rate_limited_and_slash_commands_send_none() {
    let mut a = app();
    let cmds = typed(&mut a, "abc");
    assert_eq!(
        cmds,
        vec![Command::Typing { conv: vec![1; 16].into(), active: true }],
        "one notice for a burst"
    );
    a.update(key(KeyCode::Enter));
    assert!(typed(&mut a, "/dm").is_empty(), "no typing notice for a command");
}

#[test]
fn focus_moves_between_panes_and_the_list_opens_conversations() {
    let mut a = app();
    assert_eq!(a.focus, Focus::Composer);
    a.update(key(KeyCode::Tab));
    assert_eq!(a.focus, Focus::Members, "a group shows its members pane");
    a.update(key(KeyCode::Tab));
    assert_eq!(a.focus, Focus::Conversations);
    a.update(key(KeyCode::Char('j')));
    assert_eq!(a.selected, 1);
    let cmds = a.update(key(KeyCode::Enter));
    assert_eq!(cmds, vec![Command::Open(vec![2; 16].into())]);
    assert_eq!(a.open, Some(vec![2; 16].into()));
    assert_eq!(a.focus, Focus::Composer);
    assert_eq!(a.new_from, Some(8), "two unread of next_seq 10: the marker sits at seq 8");
    a.update(Action::Key(KeyEvent::new(KeyCode::BackTab, KeyModifiers::SHIFT)));
    assert_eq!(a.focus, Focus::Timeline);
}

#[test]
fn admin_commands_issue_the_right_engine_commands_and_destructive_ones_ask() {
    let mut a = app();
    let team: qpq_core::ids::GroupId = vec![1u8; 16].into();
    let run = |a: &mut App, line: &str| {
        typed(a, line);
        a.update(key(KeyCode::Enter))
    };
    assert_eq!(
        run(&mut a, "/invite bob @carol"),
        vec![Command::Add { conv: team.clone(), users: vec!["bob".into(), "carol".into()] }]
    );
    assert_eq!(
        run(&mut a, "/promote bob"),
        vec![Command::SetAdmin { conv: team.clone(), user: "bob".into(), admin: true }]
    );
    assert_eq!(
        run(&mut a, "/demote bob"),
        vec![Command::SetAdmin { conv: team.clone(), user: "bob".into(), admin: false }]
    );
    assert_eq!(
        run(&mut a, "/rename crew"),
        vec![Command::Rename { conv: team.clone(), name: "crew".into(), topic: None }]
    );
    assert_eq!(run(&mut a, "/rotate"), vec![Command::Rotate(team.clone())]);
    assert_eq!(run(&mut a, "/info"), vec![Command::Info(team.clone())]);
    assert_eq!(run(&mut a, "/dm dave"), vec![Command::Dm("dave".into())]);
    assert_eq!(run(&mut a, "/create ops"), vec![Command::CreateGroup("ops".into())]);

    // Removing asks first; anything but y cancels.
    assert!(run(&mut a, "/kick carol").is_empty());
    assert!(matches!(a.overlay, Some(Overlay::Confirm { .. })));
    assert!(a.update(key(KeyCode::Char('n'))).is_empty());
    assert!(a.overlay.is_none());
    run(&mut a, "/kick carol");
    assert_eq!(
        a.update(key(KeyCode::Char('y'))),
        vec![Command::Remove { conv: team.clone(), user: "carol".into() }]
    );
    run(&mut a, "/leave");
    assert_eq!(a.update(key(KeyCode::Char('y'))), vec![Command::Leave(team)]);

    assert!(run(&mut a, "/frobnicate").is_empty());
    assert!(a.message.as_ref().is_some_and(|(m, err)| *err && m.contains("unknown command")));
    assert!(run(&mut a, "/invite").is_empty());
    assert!(a.message.as_ref().is_some_and(|(m, _)| m.starts_with("usage")));
}

#[test]
fn the_switcher_finds_conversations_fuzzily() {
    let mut a = app();
    a.update(ctrl('k'));
    assert!(matches!(a.overlay, Some(Overlay::Switcher { .. })));
    typed(&mut a, "bb");
    let cmds = a.update(key(KeyCode::Enter));
    assert_eq!(cmds, vec![Command::Open(vec![2; 16].into())]);
    assert!(a.overlay.is_none());
    assert_eq!(fuzzy_score("tm", "team"), Some(6), "two gaps (x2) and two unmatched letters");
    assert_eq!(fuzzy_score("x", "team"), None);
    assert!(fuzzy_score("team", "team").unwrap() < fuzzy_score("tm", "team").unwrap());
}

#[test]
fn the_switcher_matches_the_prefix_too() {
    let mut a = app();
    a.update(Action::Worker(WorkerEvent::Conversations(vec![
        conv(1, "team", ConvKind::Group, 0),
        conv(2, "bob", ConvKind::Dm, 2),
        conv(3, "bob", ConvKind::Group, 0),
    ])));
    assert_eq!(a.switcher_matches("@bob"), vec![1], "@ picks the DM");
    assert_eq!(a.switcher_matches("#bob"), vec![2], "# picks the group");
    assert_eq!(a.switcher_matches("bob").len(), 2);
    assert!(a.named_like_person(&a.convs[2]), "a group named like a DM peer");
    assert!(!a.named_like_person(&a.convs[1]), "the DM itself");
    assert!(!a.named_like_person(&a.convs[0]));
    a.convs[0].name = "alice".into();
    assert!(a.named_like_person(&a.convs[0]), "a group named like us");
}

#[test]
fn downloads_go_to_the_default_directory_unless_one_is_given() {
    let mut a = app();
    let mut file = HistoryEntry::system(1, String::new(), 0);
    file.system = false;
    file.message_id = [7; 16].into();
    file.file = Some(qpq_core::content::FileOffer {
        blob_id: [0; 32],
        size: 1,
        ciphertext_size: 17,
        name: ".bashrc".into(),
        media_type: String::new(),
        key: [0; 32],
        sha256: [0; 32],
    });
    a.update(Action::Worker(WorkerEvent::History {
        conv: vec![1; 16].into(),
        entries: vec![file],
        names: vec![],
    }));
    let run = |a: &mut App, line: &str| {
        typed(a, line);
        a.update(key(KeyCode::Enter))
    };
    let want = |dir: Option<PathBuf>| {
        vec![Command::Download { conv: vec![1; 16].into(), message_id: [7; 16].into(), dir }]
    };
    assert_eq!(run(&mut a, "/download"), want(None), "the worker picks the XDG directory");
    assert_eq!(run(&mut a, "/download /tmp/in"), want(Some("/tmp/in".into())));
    a.focus = Focus::Timeline;
    assert_eq!(a.update(key(KeyCode::Char('d'))), want(None));
}

#[test]
fn help_opens_and_closes_and_quit_quits() {
    let mut a = app();
    a.update(key(KeyCode::F(1)));
    assert_eq!(a.overlay, Some(Overlay::Help));
    a.update(key(KeyCode::Esc));
    assert!(a.overlay.is_none());
    assert_eq!(a.update(ctrl('q')), vec![Command::Quit]);
    assert!(a.quit);
}

#[test]
fn notifications_follow_the_conversation_level() {
    let mut a = app();
    let entry = |text: &str| HistoryEntry {
        message_id: [9; 16].into(),
        sender: vec![7; 32],
        text: text.into(),
        ..own_entry(1, false)
    };
    let incoming = |conv: u8, text: &str, mention| {
        Action::Worker(WorkerEvent::Incoming {
            conv: vec![conv; 16].into(),
            entry: entry(text),
            sender: "bob".into(),
            mention,
        })
    };
    a.update(incoming(1, "plain group chatter", false));
    assert!(a.pending_alert.is_none(), "default level: mentions only");
    a.update(incoming(1, "hey @alice", true));
    assert!(a.pending_alert.take().is_some());
    a.update(incoming(2, "a DM", false));
    assert!(a.pending_alert.take().is_some(), "DMs count as mentions");
    typed(&mut a, "/notify none");
    assert_eq!(
        a.update(key(KeyCode::Enter)),
        vec![Command::Notify { conv: vec![1; 16].into(), level: config::NotifyLevel::None }]
    );
    a.update(incoming(1, "hey @alice", true));
    assert!(a.pending_alert.is_none());
    // The open conversation's timeline got the messages.
    assert_eq!(a.timeline.len(), 1, "same seq replaces the entry");
}

#[test]
fn typing_indicators_expire() {
    let mut a = app();
    a.update(Action::Worker(WorkerEvent::Typing {
        conv: vec![1; 16].into(),
        who: "bob".into(),
        active: true,
    }));
    assert_eq!(a.typing[&vec![1u8; 16].into()].len(), 1);
    a.update(Action::Tick(Instant::now() + TYPING_SHOWN + Duration::from_secs(1)));
    assert!(a.typing[&vec![1u8; 16].into()].is_empty());
}

#[test]
fn timeline_keys_react_copy_and_reply() {
    let mut a = app();
    let mut e = HistoryEntry {
        seq: 0,
        message_id: [5; 16].into(),
        sender: vec![7; 32],
        sent_at_ms: 0,
        received_at_ms: 0,
        text: "pick me".into(),
        reply_to: None,
        file: None,
        edited: false,
        deleted: false,
        reactions: vec![],
        read_by: vec![],
        system: false,
        pending: false,
    };
    a.update(Action::Worker(WorkerEvent::History {
        conv: vec![1; 16].into(),
        entries: vec![e.clone()],
        names: vec![],
    }));
    e.seq = 1;
    a.focus = Focus::Timeline;
    assert_eq!(a.update(key(KeyCode::Char('y'))), vec![Command::Copy("pick me".into())]);
    assert_eq!(
        a.update(key(KeyCode::Char('+'))),
        vec![Command::React {
            conv: vec![1; 16].into(),
            target: [5; 16].into(),
            emoji: "👍".into()
        }]
    );
    a.update(key(KeyCode::Char('r')));
    assert_eq!(a.focus, Focus::Composer);
    typed(&mut a, "sure");
    assert_eq!(
        a.update(key(KeyCode::Enter)),
        vec![Command::Send {
            conv: vec![1; 16].into(),
            text: "sure".into(),
            reply_to: Some([5; 16].into())
        }]
    );
}

#[test]
fn scrolling_past_the_oldest_loaded_entry_asks_for_the_page_before() {
    let mut a = app();
    let mk = |seq: u64| HistoryEntry { sender: vec![7; 32], ..own_entry(seq, false) };
    a.update(Action::Worker(WorkerEvent::History {
        conv: vec![1; 16].into(),
        entries: vec![mk(5), mk(6)],
        names: vec![],
    }));
    a.focus = Focus::Timeline;
    assert!(a.update(key(KeyCode::Up)).is_empty());
    assert_eq!(
        a.update(key(KeyCode::Up)),
        vec![Command::Older { conv: vec![1; 16].into(), before: 5 }]
    );
    assert!(a.update(key(KeyCode::Up)).is_empty(), "one request at a time");
    a.update(Action::Worker(WorkerEvent::Older {
        conv: vec![1; 16].into(),
        entries: (0..5).map(mk).collect(),
        names: vec![],
    }));
    assert_eq!(a.timeline.len(), 7);
    assert_eq!(a.timeline[0].text, "m0");
    assert_eq!(a.cursor, 1, "still on m5");
    for _ in 0..10 {
        assert!(
            a.update(key(KeyCode::Up)).is_empty(),
            "seq 0 is the beginning: nothing more to ask"
        );
    }
    assert_eq!(a.cursor, 6);
}

#[test]
fn a_changed_key_is_a_blocking_warning_until_acknowledged() {
    let mut a = app();
    a.update(Action::Worker(WorkerEvent::Alert {
        title: "bob's key changed".into(),
        text: "WARNING: the server now says bob is account ...".into(),
    }));
    assert!(matches!(a.overlay, Some(Overlay::Alert { .. })));
    assert!(a.pending_alert.is_some(), "it rings");
    // Typing, quitting, switching: nothing happens while it is up.
    for k in [
        key(KeyCode::Char('x')),
        key(KeyCode::Char('q')),
        ctrl('k'),
        Action::Key(KeyEvent::from(KeyCode::Tab)),
    ] {
        assert!(a.update(k).is_empty());
        assert!(matches!(a.overlay, Some(Overlay::Alert { .. })), "dismissed by a stray key");
    }
    assert!(!a.quit);
    a.update(Action::Key(KeyEvent::from(KeyCode::Enter)));
    assert!(a.overlay.is_none());
}

#[test]
fn the_safety_number_overlay_marks_a_contact_verified() {
    let mut a = app();
    a.update(Action::Worker(WorkerEvent::Safety {
        user: "bob".into(),
        number: "12345".into(),
        verified: false,
    }));
    let cmds = a.update(key(KeyCode::Char('m')));
    assert_eq!(cmds, vec![Command::MarkVerified { user: "bob".into(), verified: true }]);
    assert!(a.overlay.is_none());
    a.update(Action::Worker(WorkerEvent::Safety {
        user: "bob".into(),
        number: "12345".into(),
        verified: true,
    }));
    assert_eq!(
        a.update(key(KeyCode::Char('m'))),
        vec![Command::MarkVerified { user: "bob".into(), verified: false }]
    );
}

fn own_entry(seq: u64, pending: bool) -> HistoryEntry {
    HistoryEntry {
        seq,
        message_id: [seq as u8; 16].into(),
        sender: vec![1; 32],
        sent_at_ms: 0,
        received_at_ms: 0,
        text: format!("m{seq}"),
        reply_to: None,
        file: None,
        edited: false,
        deleted: false,
        reactions: vec![],
        read_by: vec![],
        system: false,
        pending,
    }
}

#[test]
fn notices_and_errors_expire_and_an_outage_error_clears_when_back_online() {
    let mut a = app();
    let t0 = Instant::now();
    a.update(Action::Worker(WorkerEvent::Notice("keys rotated".into())));
    a.update(Action::Tick(t0 + Duration::from_secs(1)));
    assert_eq!(a.message.as_ref().map(|m| m.0.as_str()), Some("keys rotated"));
    a.update(Action::Tick(t0 + NOTICE_SHOWN + Duration::from_secs(1)));
    assert_eq!(a.message, None, "a notice goes after {NOTICE_SHOWN:?}");

    let t1 = Instant::now();
    a.update(Action::Worker(WorkerEvent::Error("timed out".into())));
    a.update(Action::Tick(t1 + NOTICE_SHOWN + Duration::from_secs(1)));
    assert!(a.message.is_some(), "an error stays longer than a notice");
    a.update(Action::Tick(t1 + ERROR_SHOWN + Duration::from_secs(1)));
    assert_eq!(a.message, None, "an error goes after {ERROR_SHOWN:?}");

    // Offline with an error, then online: the error is stale at once.
    let offline = WorkerEvent::Status {
        conn: ConnState::Offline,
        outbox: 1,
        retry_in: Some(Duration::from_secs(4)),
    };
    a.update(Action::Worker(offline));
    a.update(Action::Worker(WorkerEvent::Error("offline: connection lost".into())));
    assert!(a.retry_at.is_some());
    a.update(Action::Worker(WorkerEvent::Status {
        conn: ConnState::Online,
        outbox: 0,
        retry_in: None,
    }));
    assert_eq!(a.message, None);
    assert_eq!((a.conn, a.outbox, a.retry_at), (ConnState::Online, 0, None));
}

#[test]
fn a_pending_message_turns_delivered_and_receipts_cover_earlier_ones() {
    let mut a = app();
    let conv: qpq_core::ids::GroupId = vec![1; 16].into();
    a.update(Action::Worker(WorkerEvent::History {
        conv: conv.clone(),
        entries: vec![own_entry(0, false), own_entry(1, false)],
        names: vec![],
    }));
    a.update(Action::Worker(WorkerEvent::Incoming {
        conv: conv.clone(),
        entry: own_entry(2, true),
        sender: "alice".into(),
        mention: false,
    }));
    assert!(a.timeline[2].pending, "shown at once, pending");
    a.update(Action::Worker(WorkerEvent::Changed {
        conv: conv.clone(),
        entry: own_entry(2, false),
    }));
    assert!(!a.timeline[2].pending, "delivered");
    assert_eq!(a.timeline.len(), 3, "replaced, not appended");

    // bob read up to entry 1: entry 0 is covered too, entry 2 is not.
    let mut read = own_entry(1, false);
    read.read_by = vec![vec![9; 32]];
    a.update(Action::Worker(WorkerEvent::Changed { conv: conv.clone(), entry: read }));
    let readers: Vec<usize> = a.timeline.iter().map(|e| e.read_by.len()).collect();
    assert_eq!(readers, vec![1, 1, 0]);

    // Another conversation's change does not touch this timeline.
    let mut other = own_entry(2, false);
    other.text = "elsewhere".into();
    a.update(Action::Worker(WorkerEvent::Changed { conv: vec![2; 16].into(), entry: other }));
    assert_eq!(a.timeline[2].text, "m2");
}
