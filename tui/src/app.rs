//! The terminal UI's state and its update function. No I/O here: [`App::update`] turns an
//! [`Action`] into state changes and [`Command`]s for the worker (STYLE.md, gitui/iamb shape).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use qpq_core::client::{ConnState, ConvKind, Conversation, HistoryEntry};
use qpq_core::ids::{GroupId, MessageId};
use ratatui_textarea::TextArea;

use crate::config::{self, Config};
pub use crate::protocol::{Command, InfoView, WorkerEvent};

/// Which pane has the keyboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    /// Conversation list.
    Conversations,
    /// Timeline (scroll, select, react, copy, download).
    Timeline,
    /// Message composer.
    Composer,
    /// Members of the current group.
    Members,
}

/// A modal layer over the main screen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overlay {
    /// Every key binding and slash command.
    Help,
    /// Jump to a conversation by fuzzy search.
    Switcher {
        /// What was typed.
        query: String,
        /// Highlighted match.
        selected: usize,
    },
    /// A destructive action waiting for y/n.
    Confirm {
        /// The question.
        prompt: String,
        /// What `y` runs.
        command: Command,
    },
    /// Group details.
    Info(InfoView),
    /// Safety number with a DM peer.
    Safety {
        /// Peer.
        user: String,
        /// The 60 digits.
        number: String,
        /// Already marked as compared.
        verified: bool,
    },
    /// A warning that stops everything until it is acknowledged (a contact's key changed).
    Alert {
        /// Headline.
        title: String,
        /// What happened and what to do.
        text: String,
    },
}

/// What the UI reacts to.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one at a time, straight into update()
pub enum Action {
    /// A key press.
    Key(KeyEvent),
    /// Pasted text.
    Paste(String),
    /// Time passed (typing indicators expire, typing stops).
    Tick(Instant),
    /// The worker reports.
    Worker(WorkerEvent),
}

/// One conversation in the list.
pub type ConvView = Conversation;

/// A file transfer in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferView {
    /// File name.
    pub name: String,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
    /// Upload or download.
    pub upload: bool,
}

/// The whole UI state.
pub struct App {
    /// Configuration.
    pub config: Config,
    /// Conversations, most recent first.
    pub convs: Vec<ConvView>,
    /// Selected conversation index.
    pub selected: usize,
    /// The open conversation's id.
    pub open: Option<GroupId>,
    /// Its history.
    pub timeline: Vec<HistoryEntry>,
    /// Selected timeline entry, counted from the newest (0 = newest), when the timeline has focus.
    pub cursor: usize,
    /// An older page was asked for and has not arrived.
    loading_older: bool,
    /// The oldest entry of the conversation is loaded.
    pub at_beginning: bool,
    /// History entries from this seq on are new since the conversation was opened.
    pub new_from: Option<u64>,
    /// Sender names.
    pub names: HashMap<Vec<u8>, String>,
    /// Members of the open group: (name, admin, identity).
    pub members: Vec<(String, bool, Vec<u8>)>,
    /// Members pane shown.
    pub show_members: bool,
    /// The composer.
    pub composer: TextArea<'static>,
    /// Sent lines, for Up/Down recall.
    pub sent: Vec<String>,
    sent_index: Option<usize>,
    /// Focused pane.
    pub focus: Focus,
    /// Modal layer.
    pub overlay: Option<Overlay>,
    /// Connection state.
    pub conn: ConnState,
    /// Messages waiting in the outbox.
    pub outbox: usize,
    /// Our username.
    pub username: String,
    /// Server address.
    pub server: String,
    /// Our identity key, short.
    pub identity: String,
    /// Last notice or error (true), shown until `message_until`.
    pub message: Option<(String, bool)>,
    /// When the notice or error in `message` expires.
    message_until: Option<Instant>,
    /// The latest tick: what "now" is for expiries and the retry countdown.
    pub now: Instant,
    /// When the worker tries to reconnect next (offline).
    pub retry_at: Option<Instant>,
    /// Who is typing where, until when.
    pub typing: HashMap<GroupId, Vec<(String, Instant)>>,
    /// Transfers in progress.
    pub transfers: Vec<TransferView>,
    /// Per-conversation notification levels.
    pub notify: HashMap<GroupId, config::NotifyLevel>,
    /// Set when a notification should fire (bell / OSC 9); the main loop takes it.
    pub pending_alert: Option<String>,
    /// Last typing notice sent, to rate-limit them.
    typing_sent: Option<(GroupId, Instant)>,
    /// Leave the program.
    pub quit: bool,
}

/// How long a typing indicator lasts without a refresh.
pub const TYPING_SHOWN: Duration = Duration::from_secs(6);
/// How long a notice stays in the status bar.
pub const NOTICE_SHOWN: Duration = Duration::from_secs(8);
/// How long an error stays in the status bar (the state it reports may have passed).
pub const ERROR_SHOWN: Duration = Duration::from_secs(20);
/// At most one typing notice per this interval.
pub const TYPING_EVERY: Duration = Duration::from_secs(3);

impl App {
    /// An empty UI.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            convs: Vec::new(),
            selected: 0,
            open: None,
            timeline: Vec::new(),
            cursor: 0,
            loading_older: false,
            at_beginning: false,
            new_from: None,
            names: HashMap::new(),
            members: Vec::new(),
            show_members: true,
            composer: new_composer(),
            sent: Vec::new(),
            sent_index: None,
            focus: Focus::Composer,
            overlay: None,
            conn: ConnState::Offline,
            outbox: 0,
            username: String::new(),
            server: String::new(),
            identity: String::new(),
            message: None,
            message_until: None,
            now: Instant::now(),
            retry_at: None,
            typing: HashMap::new(),
            transfers: Vec::new(),
            notify: HashMap::new(),
            pending_alert: None,
            typing_sent: None,
            quit: false,
        }
    }

    /// The open conversation.
    pub fn current(&self) -> Option<&ConvView> {
        let open = self.open.as_ref()?;
        self.convs.iter().find(|c| &c.id == open)
    }

    /// Applies one action; returns what the worker must do.
    pub fn update(&mut self, action: Action) -> Vec<Command> {
        match action {
            Action::Key(key) => self.key(key),
            Action::Paste(text) => {
                if self.overlay.is_none() {
                    self.focus = Focus::Composer;
                    self.composer.insert_str(text.replace('\r', "\n"));
                }
                Vec::new()
            }
            Action::Tick(now) => {
                self.now = now;
                for list in self.typing.values_mut() {
                    list.retain(|(_, until)| *until > now);
                }
                if self.message_until.is_some_and(|t| t <= now) {
                    self.message = None;
                    self.message_until = None;
                }
                Vec::new()
            }
            Action::Worker(e) => self.worker(e),
        }
    }

    fn worker(&mut self, e: WorkerEvent) -> Vec<Command> {
        match e {
            WorkerEvent::Conversations(list) => {
                let keep = self.convs.get(self.selected).map(|c| c.id.clone());
                self.convs = list;
                if let Some(id) = keep
                    && let Some(i) = self.convs.iter().position(|c| c.id == id)
                {
                    self.selected = i;
                }
                self.selected = self.selected.min(self.convs.len().saturating_sub(1));
                if self.open.is_none() && !self.convs.is_empty() {
                    return self.open_selected();
                }
            }
            WorkerEvent::History { conv, entries, names } => {
                if self.open.as_ref() == Some(&conv) {
                    self.at_beginning = entries.first().is_none_or(|e| e.seq == 0);
                    self.timeline = entries;
                    self.names.extend(names);
                }
            }
            WorkerEvent::Older { conv, entries, names } => {
                if self.open.as_ref() == Some(&conv) {
                    self.loading_older = false;
                    self.at_beginning = entries.first().is_none_or(|e| e.seq == 0);
                    // The cursor counts from the newest entry, so prepending keeps it in place.
                    let mut older = entries;
                    older.append(&mut self.timeline);
                    self.timeline = older;
                    self.names.extend(names);
                }
            }
            WorkerEvent::Members { conv, members } => {
                if self.open.as_ref() == Some(&conv) {
                    self.members = members;
                }
            }
            WorkerEvent::Incoming { conv, entry, sender, mention } => {
                self.names.insert(entry.sender.clone(), sender.clone());
                if let Some(list) = self.typing.get_mut(&conv) {
                    list.retain(|(who, _)| *who != sender);
                }
                let open = self.open.as_ref() == Some(&conv);
                if open {
                    if let Some(pos) = self.timeline.iter().position(|e| e.seq == entry.seq) {
                        self.timeline[pos] = entry.clone();
                    } else {
                        self.timeline.push(entry.clone());
                    }
                }
                let is_dm = self.convs.iter().any(|c| c.id == conv && c.kind == ConvKind::Dm);
                let level = self.notify.get(&conv).copied().unwrap_or(self.config.notify.default);
                let own = sender == self.username;
                let wanted = match level {
                    config::NotifyLevel::All => true,
                    config::NotifyLevel::Mentions => mention || is_dm,
                    config::NotifyLevel::None => false,
                };
                if wanted && !own && !entry.system {
                    self.pending_alert = Some(format!("{sender}: {}", entry.text));
                }
            }
            WorkerEvent::Typing { conv, who, active } => {
                let list = self.typing.entry(conv).or_default();
                list.retain(|(w, _)| *w != who);
                if active {
                    list.push((who, Instant::now() + TYPING_SHOWN));
                }
            }
            WorkerEvent::Info(info) => self.overlay = Some(Overlay::Info(info)),
            WorkerEvent::Safety { user, number, verified } => {
                self.overlay = Some(Overlay::Safety { user, number, verified })
            }
            WorkerEvent::Alert { title, text } => {
                self.pending_alert = Some(title.clone());
                self.overlay = Some(Overlay::Alert { title, text });
            }
            WorkerEvent::Transfer { name, done, total, upload } => {
                self.transfers.retain(|t| t.name != name);
                if done < total {
                    self.transfers.push(TransferView { name, done, total, upload });
                }
            }
            WorkerEvent::Changed { conv, entry } => {
                if self.open.as_ref() == Some(&conv) {
                    // A read receipt covers every earlier message, as the engine records it.
                    for e in self.timeline.iter_mut().filter(|e| e.seq < entry.seq && !e.system) {
                        for reader in &entry.read_by {
                            if e.sender != *reader && !e.read_by.contains(reader) {
                                e.read_by.push(reader.clone());
                            }
                        }
                    }
                    if let Some(e) = self.timeline.iter_mut().find(|e| e.seq == entry.seq) {
                        *e = entry;
                    }
                }
            }
            WorkerEvent::Status { conn, outbox, retry_in } => {
                // Back online: an error about the outage is stale.
                if conn == ConnState::Online
                    && self.conn != ConnState::Online
                    && self.message.as_ref().is_some_and(|m| m.1)
                {
                    self.message = None;
                }
                self.conn = conn;
                self.outbox = outbox;
                self.retry_at = retry_in.map(|d| self.now + d);
            }
            WorkerEvent::Identity { username, server, identity } => {
                self.username = username;
                self.server = server;
                self.identity = identity;
            }
            WorkerEvent::NotifyLevel { conv, level } => {
                self.notify.insert(conv, level);
            }
            WorkerEvent::Notice(m) => self.show(m, false),
            WorkerEvent::Error(m) => self.show(m, true),
        }
        Vec::new()
    }

    /// Shows a notice or an error in the status bar for a while.
    pub fn show(&mut self, text: String, error: bool) {
        let shown = if error { ERROR_SHOWN } else { NOTICE_SHOWN };
        self.message_until = Some(Instant::now() + shown);
        self.message = Some((text, error));
    }

    fn open_selected(&mut self) -> Vec<Command> {
        let Some(c) = self.convs.get(self.selected) else { return Vec::new() };
        let id = c.id.clone();
        self.new_from = (c.unread > 0).then(|| c.next_seq.saturating_sub(u64::from(c.unread)));
        self.open = Some(id.clone());
        self.timeline.clear();
        self.members.clear();
        self.cursor = 0;
        self.loading_older = false;
        self.at_beginning = false;
        vec![Command::Open(id)]
    }

    fn key(&mut self, key: KeyEvent) -> Vec<Command> {
        if let Some(overlay) = self.overlay.clone() {
            return self.overlay_key(overlay, key);
        }
        let keys = self.config.keys.clone();
        if config::matches(&keys.quit, &key)
            || (key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL))
        {
            self.quit = true;
            return vec![Command::Quit];
        }
        if config::matches(&keys.switcher, &key) {
            self.overlay = Some(Overlay::Switcher { query: String::new(), selected: 0 });
            return Vec::new();
        }
        if config::matches(&keys.info, &key) {
            return self.open.clone().map(Command::Info).into_iter().collect();
        }
        if config::matches(&keys.members, &key) {
            self.show_members = !self.show_members;
            return Vec::new();
        }
        if config::matches(&keys.next_pane, &key) || key.code == KeyCode::BackTab {
            self.cycle_focus(key.code == KeyCode::BackTab);
            return Vec::new();
        }
        match self.focus {
            Focus::Composer => self.composer_key(key),
            Focus::Conversations => self.list_key(key),
            Focus::Timeline => self.timeline_key(key),
            Focus::Members => {
                if key.code == KeyCode::Esc {
                    self.focus = Focus::Composer;
                }
                Vec::new()
            }
        }
    }

    fn cycle_focus(&mut self, back: bool) {
        let mut order = vec![Focus::Conversations, Focus::Timeline, Focus::Composer];
        if self.show_members && self.current().is_some_and(|c| c.kind == ConvKind::Group) {
            order.push(Focus::Members);
        }
        let i = order.iter().position(|f| *f == self.focus).unwrap_or(0);
        let n = order.len();
        self.focus = order[if back { (i + n - 1) % n } else { (i + 1) % n }];
    }

    fn help_key(&self, key: &KeyEvent) -> bool {
        config::matches(&self.config.keys.help, key) || key.code == KeyCode::F(1)
    }

    fn list_key(&mut self, key: KeyEvent) -> Vec<Command> {
        if self.help_key(&key) {
            self.overlay = Some(Overlay::Help);
            return Vec::new();
        }
        match key.code {
            KeyCode::Down | KeyCode::Char('j') => {
                self.selected = (self.selected + 1).min(self.convs.len().saturating_sub(1));
                Vec::new()
            }
            KeyCode::Up | KeyCode::Char('k') => {
                self.selected = self.selected.saturating_sub(1);
                Vec::new()
            }
            KeyCode::Char('g') | KeyCode::Home => {
                self.selected = 0;
                Vec::new()
            }
            KeyCode::Char('G') | KeyCode::End => {
                self.selected = self.convs.len().saturating_sub(1);
                Vec::new()
            }
            KeyCode::Enter | KeyCode::Char('l') | KeyCode::Right => {
                self.focus = Focus::Composer;
                self.open_selected()
            }
            KeyCode::Char('i') | KeyCode::Esc => {
                self.focus = Focus::Composer;
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    fn selected_entry(&self) -> Option<&HistoryEntry> {
        let n = self.timeline.len();
        self.timeline.get(n.checked_sub(self.cursor + 1)?)
    }

    fn timeline_key(&mut self, key: KeyEvent) -> Vec<Command> {
        if self.help_key(&key) {
            self.overlay = Some(Overlay::Help);
            return Vec::new();
        }
        let conv = self.open.clone();
        let at_top = self.cursor + 1 >= self.timeline.len();
        if matches!(
            key.code,
            KeyCode::Up | KeyCode::Char('k') | KeyCode::PageUp | KeyCode::Char('g') | KeyCode::Home
        ) && at_top
            && !self.at_beginning
            && !self.loading_older
            && let (Some(conv), Some(first)) = (conv.clone(), self.timeline.first())
        {
            self.loading_older = true;
            return vec![Command::Older { conv, before: first.seq }];
        }
        match key.code {
            KeyCode::Up | KeyCode::Char('k') => {
                self.cursor = (self.cursor + 1).min(self.timeline.len().saturating_sub(1));
            }
            KeyCode::Down | KeyCode::Char('j') => self.cursor = self.cursor.saturating_sub(1),
            KeyCode::PageUp => {
                self.cursor = (self.cursor + 10).min(self.timeline.len().saturating_sub(1))
            }
            KeyCode::PageDown => self.cursor = self.cursor.saturating_sub(10),
            KeyCode::Char('G') | KeyCode::End => self.cursor = 0,
            KeyCode::Char('g') | KeyCode::Home => {
                self.cursor = self.timeline.len().saturating_sub(1)
            }
            KeyCode::Esc | KeyCode::Char('i') => self.focus = Focus::Composer,
            KeyCode::Char('y') => {
                if let Some(e) = self.selected_entry() {
                    return vec![Command::Copy(e.text.clone())];
                }
            }
            KeyCode::Char('+') => {
                if let (Some(conv), Some(e)) = (conv, self.selected_entry()) {
                    return vec![Command::React {
                        conv, target: e.message_id, emoji: "👍".into()
                    }];
                }
            }
            KeyCode::Char('r') => {
                if let Some(e) = self.selected_entry() {
                    let id = e.message_id;
                    self.focus = Focus::Composer;
                    self.composer = new_composer();
                    self.composer.insert_str(format!("/reply {} ", short_id(&id)));
                }
            }
            KeyCode::Char('d') => {
                if let (Some(conv), Some(e)) = (conv, self.selected_entry())
                    && e.file.is_some()
                {
                    return vec![Command::Download { conv, message_id: e.message_id, dir: None }];
                }
            }
            _ => {}
        }
        Vec::new()
    }

    fn composer_key(&mut self, key: KeyEvent) -> Vec<Command> {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            KeyCode::Esc => {
                self.focus = Focus::Timeline;
                Vec::new()
            }
            KeyCode::Enter
                if key.modifiers.contains(KeyModifiers::ALT)
                    || key.modifiers.contains(KeyModifiers::SHIFT) =>
            {
                self.composer.insert_newline();
                self.typing_notice()
            }
            KeyCode::Enter => self.submit(),
            KeyCode::Up if self.composer.lines().len() <= 1 && !self.sent.is_empty() => {
                let i = match self.sent_index {
                    Some(i) => i.saturating_sub(1),
                    None => self.sent.len() - 1,
                };
                self.sent_index = Some(i);
                self.composer = new_composer();
                self.composer.insert_str(self.sent[i].clone());
                Vec::new()
            }
            KeyCode::Down if self.sent_index.is_some() && self.composer.lines().len() <= 1 => {
                let i = self.sent_index.unwrap_or(0) + 1;
                self.composer = new_composer();
                if i < self.sent.len() {
                    self.sent_index = Some(i);
                    self.composer.insert_str(self.sent[i].clone());
                } else {
                    self.sent_index = None;
                }
                Vec::new()
            }
            KeyCode::Char('?') if self.composer.is_empty() => {
                self.overlay = Some(Overlay::Help);
                Vec::new()
            }
            KeyCode::F(1) => {
                self.overlay = Some(Overlay::Help);
                Vec::new()
            }
            KeyCode::Char('w') if ctrl => {
                self.composer.delete_word();
                Vec::new()
            }
            KeyCode::Char('u') if ctrl => {
                // Kill the whole draft, as in shells and IRC clients.
                self.composer = new_composer();
                let conv = self.open.clone();
                self.typing_sent = None;
                conv.map(|conv| Command::Typing { conv, active: false }).into_iter().collect()
            }
            _ => {
                self.composer.input(key);
                self.typing_notice()
            }
        }
    }

    fn typing_notice(&mut self) -> Vec<Command> {
        let Some(conv) = self.open.clone() else { return Vec::new() };
        if self.composer.is_empty() || self.composer.lines()[0].starts_with('/') {
            return Vec::new();
        }
        let now = Instant::now();
        if let Some((c, at)) = &self.typing_sent
            && *c == conv
            && now.duration_since(*at) < TYPING_EVERY
        {
            return Vec::new();
        }
        self.typing_sent = Some((conv.clone(), now));
        vec![Command::Typing { conv, active: true }]
    }

    fn submit(&mut self) -> Vec<Command> {
        let text = self.composer.lines().join("\n");
        let text = text.trim().to_string();
        if text.is_empty() {
            return Vec::new();
        }
        self.composer = new_composer();
        self.sent.push(text.clone());
        self.sent_index = None;
        self.typing_sent = None;
        self.cursor = 0;
        if let Some(cmd) = text.strip_prefix('/') {
            return self.slash(cmd);
        }
        match self.open.clone() {
            Some(conv) => vec![Command::Send { conv, text, reply_to: None }],
            None => {
                self.show("open a conversation first (/dm user or /create name)".into(), true);
                Vec::new()
            }
        }
    }

    fn slash(&mut self, line: &str) -> Vec<Command> {
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        let conv = self.open.clone();
        let need = |app: &mut Self| {
            app.show(format!("/{cmd} needs an open conversation"), true);
            Vec::new()
        };
        let usage = |app: &mut Self, u: &str| {
            app.show(format!("usage: {u}"), true);
            Vec::new()
        };
        match cmd {
            "dm" | "msg" if !rest.is_empty() => {
                vec![Command::Dm(rest.trim_start_matches('@').to_string())]
            }
            "dm" | "msg" => usage(self, "/dm <user>"),
            "create" | "cg" if !rest.is_empty() => vec![Command::CreateGroup(rest.to_string())],
            "create" | "cg" => usage(self, "/create <name>"),
            "invite" | "add" => match (conv, rest.is_empty()) {
                (Some(conv), false) => vec![Command::Add {
                    conv,
                    users: rest
                        .split_whitespace()
                        .map(|u| u.trim_start_matches('@').to_string())
                        .collect(),
                }],
                (None, _) => need(self),
                _ => usage(self, "/invite <user> [user...]"),
            },
            "kick" | "remove" => match (conv, rest.is_empty()) {
                (Some(conv), false) => {
                    let user = rest.trim_start_matches('@').to_string();
                    self.overlay = Some(Overlay::Confirm {
                        prompt: format!("Remove {user} from this group?"),
                        command: Command::Remove { conv, user },
                    });
                    Vec::new()
                }
                (None, _) => need(self),
                _ => usage(self, "/kick <user>"),
            },
            "promote" | "demote" => match (conv, rest.is_empty()) {
                (Some(conv), false) => vec![Command::SetAdmin {
                    conv,
                    user: rest.trim_start_matches('@').to_string(),
                    admin: cmd == "promote",
                }],
                (None, _) => need(self),
                _ => usage(self, "/promote <user>"),
            },
            "rename" => match (conv, rest.is_empty()) {
                (Some(conv), false) => {
                    vec![Command::Rename { conv, name: rest.to_string(), topic: None }]
                }
                (None, _) => need(self),
                _ => usage(self, "/rename <name>"),
            },
            "topic" => match conv {
                Some(conv) => {
                    let name = self.current().map(|c| c.name.clone()).unwrap_or_default();
                    vec![Command::Rename { conv, name, topic: Some(rest.to_string()) }]
                }
                None => need(self),
            },
            "leave" => match conv {
                Some(conv) => {
                    let name = self.current().map(|c| c.name.clone()).unwrap_or_default();
                    self.overlay = Some(Overlay::Confirm {
                        prompt: format!("Leave {name}?"),
                        command: Command::Leave(conv),
                    });
                    Vec::new()
                }
                None => need(self),
            },
            "rotate" | "rotate-keys" => conv.map(Command::Rotate).into_iter().collect(),
            "info" | "gi" => conv.map(Command::Info).into_iter().collect(),
            "verify" => {
                let user = if rest.is_empty() {
                    self.current().filter(|c| c.kind == ConvKind::Dm).map(|c| c.name.clone())
                } else {
                    Some(rest.trim_start_matches('@').to_string())
                };
                match user {
                    Some(u) => vec![Command::Verify(u)],
                    None => usage(self, "/verify <user>"),
                }
            }
            "send-file" | "sf" | "file" => match (conv, rest.is_empty()) {
                (Some(conv), false) => vec![Command::SendFile { conv, path: expand_home(rest) }],
                (None, _) => need(self),
                _ => usage(self, "/send-file <path>"),
            },
            "download" | "dl" => {
                let target =
                    self.timeline.iter().rev().find(|e| e.file.is_some()).map(|e| e.message_id);
                match (conv, target) {
                    (Some(conv), Some(message_id)) => vec![Command::Download {
                        conv,
                        message_id,
                        dir: (!rest.is_empty()).then(|| expand_home(rest)),
                    }],
                    _ => usage(self, "/download [dir] (in a conversation with a file)"),
                }
            }
            "react" => {
                let target = self
                    .selected_entry()
                    .or_else(|| self.timeline.iter().rev().find(|e| !e.system))
                    .map(|e| e.message_id);
                match (conv, target, rest.is_empty()) {
                    (Some(conv), Some(target), false) => {
                        vec![Command::React { conv, target, emoji: rest.to_string() }]
                    }
                    _ => usage(self, "/react <emoji>"),
                }
            }
            "edit" => {
                let me = self.own_last();
                match (conv, me, rest.is_empty()) {
                    (Some(conv), Some(target), false) => {
                        vec![Command::Edit { conv, target, text: rest.to_string() }]
                    }
                    _ => usage(self, "/edit <new text> (edits your last message)"),
                }
            }
            "delete" => match (conv, self.own_last()) {
                (Some(conv), Some(target)) => {
                    self.overlay = Some(Overlay::Confirm {
                        prompt: "Delete your last message for everyone?".into(),
                        command: Command::Delete { conv, target },
                    });
                    Vec::new()
                }
                _ => usage(self, "/delete (deletes your last message)"),
            },
            "reply" => {
                let (id, text) = rest.split_once(' ').unwrap_or((rest, ""));
                let target = self
                    .timeline
                    .iter()
                    .find(|e| short_id(&e.message_id) == id)
                    .map(|e| e.message_id);
                match (conv, target, text.trim().is_empty()) {
                    (Some(conv), Some(t), false) => vec![Command::Send {
                        conv,
                        text: text.trim().to_string(),
                        reply_to: Some(t),
                    }],
                    _ => usage(self, "select a message in the timeline and press r"),
                }
            }
            "notify" => {
                let level = match rest {
                    "all" => Some(config::NotifyLevel::All),
                    "mentions" => Some(config::NotifyLevel::Mentions),
                    "none" | "off" => Some(config::NotifyLevel::None),
                    _ => None,
                };
                match (conv, level) {
                    (Some(conv), Some(level)) => {
                        self.notify.insert(conv.clone(), level);
                        vec![Command::Notify { conv, level }]
                    }
                    _ => usage(self, "/notify all|mentions|none"),
                }
            }
            "members" => {
                self.show_members = !self.show_members;
                Vec::new()
            }
            "help" | "h" => {
                self.overlay = Some(Overlay::Help);
                Vec::new()
            }
            "quit" | "q" => {
                self.quit = true;
                vec![Command::Quit]
            }
            other => {
                self.show(format!("unknown command /{other}; press F1 for help"), true);
                Vec::new()
            }
        }
    }

    fn own_last(&self) -> Option<MessageId> {
        let me = self.names.iter().find(|(_, n)| **n == self.username).map(|(id, _)| id.clone());
        self.timeline
            .iter()
            .rev()
            .find(|e| !e.system && !e.deleted && (Some(&e.sender) == me.as_ref() || e.pending))
            .map(|e| e.message_id)
    }

    fn overlay_key(&mut self, overlay: Overlay, key: KeyEvent) -> Vec<Command> {
        match overlay {
            Overlay::Switcher { mut query, mut selected } => {
                match key.code {
                    KeyCode::Esc => {
                        self.overlay = None;
                        return Vec::new();
                    }
                    KeyCode::Enter => {
                        self.overlay = None;
                        let matches = self.switcher_matches(&query);
                        if let Some(i) = matches.get(selected) {
                            self.selected = *i;
                            self.focus = Focus::Composer;
                            return self.open_selected();
                        }
                        return Vec::new();
                    }
                    KeyCode::Down | KeyCode::Tab => selected += 1,
                    KeyCode::Up | KeyCode::BackTab => selected = selected.saturating_sub(1),
                    KeyCode::Backspace => {
                        query.pop();
                        selected = 0;
                    }
                    KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => {
                        query.push(c);
                        selected = 0;
                    }
                    _ => {}
                }
                let n = self.switcher_matches(&query).len();
                selected = selected.min(n.saturating_sub(1));
                self.overlay = Some(Overlay::Switcher { query, selected });
                Vec::new()
            }
            Overlay::Confirm { command, .. } => {
                self.overlay = None;
                match key.code {
                    KeyCode::Char('y') | KeyCode::Char('Y') => vec![command],
                    _ => {
                        self.show("cancelled".into(), false);
                        Vec::new()
                    }
                }
            }
            Overlay::Safety { user, verified, .. } if key.code == KeyCode::Char('m') => {
                let command = Command::MarkVerified { user: user.clone(), verified: !verified };
                self.overlay = None;
                vec![command]
            }
            // Only a deliberate Enter or Esc dismisses it; other keys do nothing meanwhile.
            Overlay::Alert { .. } => {
                if matches!(key.code, KeyCode::Esc | KeyCode::Enter) {
                    self.overlay = None;
                }
                Vec::new()
            }
            Overlay::Help | Overlay::Info(_) | Overlay::Safety { .. } => {
                if matches!(key.code, KeyCode::Esc | KeyCode::Enter | KeyCode::Char('q'))
                    || self.help_key(&key)
                    || config::matches(&self.config.keys.info, &key)
                {
                    self.overlay = None;
                }
                Vec::new()
            }
        }
    }

    /// Indices of conversations matching `query` (subsequence match against `@name` or
    /// `#name`, so a leading `@` or `#` picks the kind), best first.
    pub fn switcher_matches(&self, query: &str) -> Vec<usize> {
        let mut scored: Vec<(usize, usize)> = self
            .convs
            .iter()
            .enumerate()
            .filter_map(|(i, c)| fuzzy_score(query, &label(c)).map(|s| (s, i)))
            .collect();
        scored.sort_by_key(|(s, i)| (*s, *i));
        scored.into_iter().map(|(_, i)| i).collect()
    }

    /// Whether `c` is a group named like a person here (us, or the peer of one of our DMs):
    /// whoever runs a group chooses its name, so `#bob` may not be bob. Shown with a warning.
    pub fn named_like_person(&self, c: &ConvView) -> bool {
        c.kind == ConvKind::Group
            && (c.name == self.username
                || self.convs.iter().any(|d| d.kind == ConvKind::Dm && d.name == c.name))
    }
}

/// How a conversation is written: `@name` for a direct conversation, `#name` for a group.
pub fn label(c: &ConvView) -> String {
    format!("{}{}", if c.kind == ConvKind::Dm { "@" } else { "#" }, c.name)
}

/// Lower is better; `None` if `query` is not a subsequence of `name` (case-insensitive).
pub fn fuzzy_score(query: &str, name: &str) -> Option<usize> {
    let name = name.to_lowercase();
    let mut pos = 0;
    let mut gaps = 0;
    let chars: Vec<char> = name.chars().collect();
    for q in query.to_lowercase().chars() {
        let found = chars[pos..].iter().position(|c| *c == q)?;
        gaps += found;
        pos += found + 1;
    }
    Some(gaps * 2 + chars.len().saturating_sub(query.len()))
}

/// The first 4 bytes of a message id in hex, for `/reply`.
pub fn short_id(id: &[u8; 16]) -> String {
    id[..4].iter().map(|b| format!("{b:02x}")).collect()
}

fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    }
}

fn new_composer() -> TextArea<'static> {
    let mut t = TextArea::default();
    t.set_placeholder_text("Type a message; /help for commands, Alt-Enter for a new line");
    t
}

#[cfg(test)]
mod tests;
