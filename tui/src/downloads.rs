//! Where downloads go by default, and how names a peer chose are shown.
//!
//! The default directory follows the XDG user directories: `$XDG_DOWNLOAD_DIR`, else the
//! `XDG_DOWNLOAD_DIR` line of `$XDG_CONFIG_HOME/user-dirs.dirs` (`~/.config/user-dirs.dirs`),
//! else `~/Downloads`. Never the current directory: a download's name is chosen by the peer
//! who offered it, and the current directory is often `$HOME` or a source tree.

use std::path::{Path, PathBuf};

/// The directory downloads go to when none is given.
pub fn default_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let home = var("HOME");
    let config = var("XDG_CONFIG_HOME").or_else(|| home.as_ref().map(|h| h.join(".config")));
    resolve(
        var("XDG_DOWNLOAD_DIR"),
        config.and_then(|c| std::fs::read_to_string(c.join("user-dirs.dirs")).ok()).as_deref(),
        home.as_deref(),
    )
}

/// [`default_dir`] from its inputs: the variable, the text of `user-dirs.dirs`, `$HOME`.
fn resolve(env: Option<PathBuf>, user_dirs: Option<&str>, home: Option<&Path>) -> PathBuf {
    if let Some(dir) = env.filter(|d| d.is_absolute()) {
        return dir;
    }
    if let Some(dir) = user_dirs.and_then(|text| from_user_dirs(text, home)) {
        return dir;
    }
    match home {
        Some(h) => h.join("Downloads"),
        // No home at all (a service account): the current directory is all there is.
        None => PathBuf::from("."),
    }
}

/// The `XDG_DOWNLOAD_DIR` of a `user-dirs.dirs` file: `XDG_DOWNLOAD_DIR="$HOME/Downloads"`
/// (shell syntax, but only `$HOME/...` or an absolute path is allowed in it).
fn from_user_dirs(text: &str, home: Option<&Path>) -> Option<PathBuf> {
    let value = text.lines().rev().find_map(|l| {
        let (k, v) = l.trim().split_once('=')?;
        (k.trim() == "XDG_DOWNLOAD_DIR").then(|| v.trim())
    })?;
    let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
    let value = value.replace("\\\"", "\"").replace("\\\\", "\\");
    if value == "$HOME" {
        return home.map(Path::to_path_buf);
    }
    if let Some(rest) = value.strip_prefix("$HOME/") {
        return home.map(|h| h.join(rest));
    }
    let path = PathBuf::from(value);
    path.is_absolute().then_some(path)
}

/// `text` as it is safe to print on a terminal: control characters (escape sequences, carriage
/// returns) and bidirectional overrides shown as `\u{..}` escapes instead of being obeyed.
/// Peers choose file names, group names and message text.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
        if (c.is_control() && c != '\n' && c != '\t') || bidi {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_download_directory_follows_xdg() {
        let home = Path::new("/home/ann");
        let r = |env: Option<&str>, dirs: Option<&str>| {
            resolve(env.map(PathBuf::from), dirs, Some(home))
        };
        assert_eq!(r(None, None), home.join("Downloads"));
        assert_eq!(r(Some("/data/dl"), Some("XDG_DOWNLOAD_DIR=\"/x\"")), Path::new("/data/dl"));
        assert_eq!(r(Some("relative"), None), home.join("Downloads"), "relative is ignored");
        let dirs = "# written by xdg-user-dirs-update\nXDG_DESKTOP_DIR=\"$HOME/Desktop\"\n\
                    XDG_DOWNLOAD_DIR=\"$HOME/Téléchargements\"\n";
        assert_eq!(r(None, Some(dirs)), home.join("Téléchargements"));
        assert_eq!(r(None, Some("XDG_DOWNLOAD_DIR=\"$HOME\"")), home);
        assert_eq!(r(None, Some("XDG_DOWNLOAD_DIR=\"/srv/in\"")), Path::new("/srv/in"));
        assert_eq!(r(None, Some("XDG_DOWNLOAD_DIR=\"in\"")), home.join("Downloads"));
        assert_eq!(r(None, Some("XDG_MUSIC_DIR=\"$HOME/Music\"")), home.join("Downloads"));
        assert_eq!(resolve(None, None, None), Path::new("."));
    }

    #[test]
    fn names_from_peers_cannot_drive_the_terminal() {
        assert_eq!(printable("notes.pdf"), "notes.pdf");
        assert_eq!(printable("a\u{1b}]0;pwned\u{7}b"), "a\\u{1b}]0;pwned\\u{7}b");
        assert_eq!(printable("x\ry"), "x\\u{d}y");
        assert_eq!(printable("invoice\u{202E}fdp.exe"), "invoice\\u{202e}fdp.exe");
        assert_eq!(printable("two\nlines\tand tab"), "two\nlines\tand tab");
    }
}
