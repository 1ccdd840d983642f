//! The first-run registration form and the unlock prompt, drawn before the main screen.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Frame;
use ratatui::style::{Style, Stylize};
use ratatui::text::{Line, Text};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Wrap};

/// One input line.
#[derive(Debug, Clone)]
pub struct Field {
    /// Label.
    pub label: &'static str,
    /// Text typed.
    pub value: String,
    /// Shown as dots.
    pub secret: bool,
}

/// Where the form is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// Filling in fields.
    Editing,
    /// Showing the server's certificate fingerprint for confirmation.
    Confirm(String),
    /// Waiting for the network or the KDF.
    Working(String),
}

/// What a key press asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormAction {
    /// Nothing yet.
    None,
    /// Fields are complete: probe the server (registration) or unlock (unlock prompt).
    Submit,
    /// The user trusts the fingerprint: register.
    Confirmed,
    /// Give up.
    Quit,
}

/// A small form.
#[derive(Debug, Clone)]
pub struct Form {
    /// Title.
    pub title: String,
    /// Fields.
    pub fields: Vec<Field>,
    /// Focused field.
    pub focus: usize,
    /// Stage.
    pub stage: Stage,
    /// Last error.
    pub error: Option<String>,
}

impl Form {
    /// The first-run registration form.
    pub fn register(server: &str) -> Self {
        let f = |label, value: &str, secret| Field { label, value: value.into(), secret };
        Self {
            title: " Welcome to qpq: create your account ".into(),
            fields: vec![
                f("Server", server, false),
                f("Username", "", false),
                f("Password", "", true),
                f("Invite code (if needed)", "", false),
                f("Local passphrase", "", true),
            ],
            focus: 1,
            stage: Stage::Editing,
            error: None,
        }
    }

    /// The unlock prompt.
    pub fn unlock(account: &str) -> Self {
        Self {
            title: format!(" Unlock {account} "),
            fields: vec![Field { label: "Passphrase", value: String::new(), secret: true }],
            focus: 0,
            stage: Stage::Editing,
            error: None,
        }
    }

    /// A field's value by label.
    pub fn value(&self, label: &str) -> &str {
        self.fields.iter().find(|f| f.label == label).map_or("", |f| f.value.as_str())
    }

    /// Handles a key.
    pub fn key(&mut self, key: KeyEvent) -> FormAction {
        if key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL)
            || key.code == KeyCode::Esc
        {
            return FormAction::Quit;
        }
        match self.stage.clone() {
            Stage::Working(_) => FormAction::None,
            Stage::Confirm(_) => match key.code {
                KeyCode::Char('y') | KeyCode::Char('Y') => FormAction::Confirmed,
                KeyCode::Char('n') | KeyCode::Char('N') => {
                    self.stage = Stage::Editing;
                    self.error = Some(
                        "not trusted; check the fingerprint with the server's operator".into(),
                    );
                    FormAction::None
                }
                _ => FormAction::None,
            },
            Stage::Editing => {
                match key.code {
                    KeyCode::Tab | KeyCode::Down => {
                        self.focus = (self.focus + 1) % self.fields.len()
                    }
                    KeyCode::BackTab | KeyCode::Up => {
                        self.focus = (self.focus + self.fields.len() - 1) % self.fields.len()
                    }
                    KeyCode::Backspace => {
                        self.fields[self.focus].value.pop();
                    }
                    KeyCode::Enter => {
                        let missing = self
                            .fields
                            .iter()
                            .position(|f| f.value.is_empty() && !f.label.contains("if needed"));
                        match missing {
                            Some(i) if i != self.focus || self.focus + 1 < self.fields.len() => {
                                self.focus = i
                            }
                            Some(i) => self.focus = i,
                            None => return FormAction::Submit,
                        }
                    }
                    KeyCode::Char(c) => self.fields[self.focus].value.push(c),
                    _ => {}
                }
                FormAction::None
            }
        }
    }

    /// Draws the form centred.
    pub fn draw(&self, f: &mut Frame<'_>) {
        let area = f.area();
        let mut lines: Vec<Line<'_>> = Vec::new();
        for (i, field) in self.fields.iter().enumerate() {
            let shown = if field.secret {
                "•".repeat(field.value.chars().count())
            } else {
                field.value.clone()
            };
            let cursor = if i == self.focus && self.stage == Stage::Editing { "▏" } else { "" };
            let line = Line::from(format!("{:<24} {shown}{cursor}", field.label));
            lines.push(if i == self.focus { line.bold() } else { line });
        }
        lines.push(Line::from(""));
        match &self.stage {
            Stage::Editing => {
                lines.push(Line::from("Tab: next field   Enter: continue   Esc: quit").italic())
            }
            Stage::Confirm(fp) => {
                lines.push(Line::from("The server presented this certificate (SHA-256):").bold());
                for chunk in fp.as_bytes().chunks(32) {
                    lines.push(Line::from(format!("  {}", String::from_utf8_lossy(chunk))));
                }
                lines.push(
                    Line::from("Compare it with what the server printed. Trust and pin it? (y/n)")
                        .bold(),
                );
            }
            Stage::Working(what) => lines.push(Line::from(what.clone()).italic()),
        }
        if let Some(e) = &self.error {
            lines.push(Line::styled(e.clone(), Style::new().red()));
        }
        let rect = crate::ui::centered(area, 72, lines.len() as u16 + 2);
        f.render_widget(Clear, rect);
        f.render_widget(
            Paragraph::new(Text::from(lines))
                .wrap(Wrap { trim: false })
                .block(Block::new().borders(Borders::ALL).title(self.title.clone())),
            rect,
        );
    }
}
