//! `$XDG_CONFIG_HOME/qpq/tui.toml`: key bindings, theme and notifications.
//!
//! ```toml
//! [keys]
//! quit = "ctrl-q"
//! switcher = "ctrl-k"
//! help = "?"
//! [theme]
//! accent = "cyan"        # a colour name, or "#rrggbb" on truecolour terminals
//! [notify]
//! default = "mentions"   # all | mentions | none (DMs always count as mentions)
//! ```
//!
//! Top level: `mouse = true` captures the mouse (wheel scrolls the timeline);
//! `hyperlinks = false` stops OSC 8 links.

use std::path::PathBuf;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::style::Color;
use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Key bindings.
    pub keys: Keys,
    /// Colours.
    pub theme: Theme,
    /// Notifications.
    pub notify: Notify,
    /// Capture the mouse (wheel scrolls the timeline). Off by default, so the terminal's own
    /// text selection keeps working.
    pub mouse: bool,
    /// Emit OSC 8 hyperlinks for URLs on screen. Default on.
    #[serde(default = "yes")]
    pub hyperlinks: bool,
}

fn yes() -> bool {
    true
}

/// Rebindable global keys (everything else is fixed and listed in the help overlay).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Keys {
    /// Quit.
    pub quit: String,
    /// Jump to a conversation by fuzzy search.
    pub switcher: String,
    /// Help overlay.
    pub help: String,
    /// Next pane.
    pub next_pane: String,
    /// Group info overlay.
    pub info: String,
    /// Toggle the members pane.
    pub members: String,
}

impl Default for Keys {
    fn default() -> Self {
        Self {
            quit: "ctrl-q".into(),
            switcher: "ctrl-k".into(),
            help: "?".into(),
            next_pane: "tab".into(),
            info: "ctrl-g".into(),
            members: "ctrl-b".into(),
        }
    }
}

/// Colours.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Theme {
    /// Focus borders, own name, highlights.
    pub accent: String,
    /// Other people's names.
    pub peer: String,
    /// System lines and secondary text.
    pub dim: String,
}

impl Default for Theme {
    fn default() -> Self {
        Self { accent: "cyan".into(), peer: "green".into(), dim: "darkgray".into() }
    }
}

/// When to ring the bell and send a desktop notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NotifyLevel {
    /// Every message.
    All,
    /// Mentions and DMs.
    #[default]
    Mentions,
    /// Never.
    None,
}

/// Notification settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Notify {
    /// Level for conversations without their own.
    pub default: NotifyLevel,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            keys: Keys::default(),
            theme: Theme::default(),
            notify: Notify::default(),
            mouse: false,
            hyperlinks: true,
        }
    }
}

impl Config {
    /// Loads the file if it exists; a broken file is an error that names it.
    pub fn load() -> anyhow::Result<Self> {
        let path = path();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
        }
    }
}

/// Where the configuration lives.
pub fn path() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("qpq")
        .join("tui.toml")
}

/// Whether `key` is the binding written as `spec` ("ctrl-k", "?", "tab", "f1", "alt-x").
pub fn matches(spec: &str, key: &KeyEvent) -> bool {
    let spec = spec.to_ascii_lowercase();
    let (mods, name) = match spec.rsplit_once('-') {
        Some((m, n)) if !n.is_empty() => (m.to_string(), n.to_string()),
        _ => (String::new(), spec.clone()),
    };
    let mut want = KeyModifiers::NONE;
    for m in mods.split('-').filter(|m| !m.is_empty()) {
        match m {
            "ctrl" | "c" => want |= KeyModifiers::CONTROL,
            "alt" | "a" | "meta" => want |= KeyModifiers::ALT,
            "shift" | "s" => want |= KeyModifiers::SHIFT,
            _ => return false,
        }
    }
    let code = match name.as_str() {
        "tab" => KeyCode::Tab,
        "enter" => KeyCode::Enter,
        "esc" => KeyCode::Esc,
        "space" => KeyCode::Char(' '),
        f if f.starts_with('f') && f.len() > 1 => match f[1..].parse() {
            Ok(n) => KeyCode::F(n),
            Err(_) => return false,
        },
        c if c.chars().count() == 1 => KeyCode::Char(c.chars().next().unwrap_or(' ')),
        _ => return false,
    };
    let mods = key.modifiers - KeyModifiers::SHIFT;
    let want_plain = want - KeyModifiers::SHIFT;
    key.code == code && mods == want_plain
}

/// A colour by name or `#rrggbb`.
pub fn color(spec: &str) -> Color {
    spec.parse().unwrap_or(Color::Reset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_parse() {
        let k = |c, m| KeyEvent::new(c, m);
        assert!(matches("ctrl-k", &k(KeyCode::Char('k'), KeyModifiers::CONTROL)));
        assert!(!matches("ctrl-k", &k(KeyCode::Char('k'), KeyModifiers::NONE)));
        assert!(matches("?", &k(KeyCode::Char('?'), KeyModifiers::SHIFT)));
        assert!(matches("tab", &k(KeyCode::Tab, KeyModifiers::NONE)));
        assert!(matches("f1", &k(KeyCode::F(1), KeyModifiers::NONE)));
        assert!(matches("alt-x", &k(KeyCode::Char('x'), KeyModifiers::ALT)));
        assert!(!matches("hyper-x", &k(KeyCode::Char('x'), KeyModifiers::ALT)));
    }

    #[test]
    fn config_file_is_strict() {
        let c: Config =
            toml::from_str("[keys]\nquit = \"ctrl-x\"\n[notify]\ndefault = \"all\"\n").unwrap();
        assert_eq!(c.keys.quit, "ctrl-x");
        assert_eq!(c.notify.default, NotifyLevel::All);
        assert!(toml::from_str::<Config>("[keys]\nnope = \"x\"\n").is_err());
        assert_eq!(color("#ff0000"), Color::Rgb(255, 0, 0));
        assert_eq!(color("cyan"), Color::Cyan);
    }
}
