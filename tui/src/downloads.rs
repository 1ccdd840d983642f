//! Where downloads go by default, how paths are resolved for the daemon, and how names a peer
//! chose are shown.
//!
//! The default directory follows the XDG user directories: `$XDG_DOWNLOAD_DIR`, else the
//! `XDG_DOWNLOAD_DIR` line of `$XDG_CONFIG_HOME/user-dirs.dirs` (`~/.config/user-dirs.dirs`),
//! else `~/Downloads`. Never the current directory: a download's name is chosen by the peer
//! who offered it, and the current directory is often `$HOME` or a source tree.
//!
//! A `qpq` attached to the daemon resolves paths before it sends a request ([`absolute`],
//! [`download_dir`]): the daemon runs in another working directory and environment.

use std::path::{Path, PathBuf};

use anyhow::Context;

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

/// `path` as this process means it: absolute, against its working directory (a file to send,
/// a download directory given on the command line). An error, never a path left relative,
/// when it cannot be resolved (an empty path, a working directory that was deleted): the
/// daemon would refuse it with a less helpful one.
pub fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve {:?}", path.display()))
}

/// Where a download goes, resolved by the `qpq` that asks for it: `dir` if given, else this
/// user's [`default_dir`], made [`absolute`] either way.
pub fn download_dir(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    download_dir_or(dir, default_dir)
}

/// [`download_dir`] with the default from `default`.
fn download_dir_or(
    dir: Option<PathBuf>,
    default: impl FnOnce() -> PathBuf,
) -> anyhow::Result<PathBuf> {
    absolute(&dir.unwrap_or_else(default))
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
    fn paths_for_the_daemon_are_absolute_or_an_error() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(absolute(Path::new("notes.pdf")).unwrap(), cwd.join("notes.pdf"));
        assert_eq!(absolute(Path::new("/srv/a.pdf")).unwrap(), Path::new("/srv/a.pdf"));
        // A given directory, and the default one, even when the default is relative (no
        // `$HOME`, or a relative `$HOME`).
        let dir = |d: Option<&str>, default: &str| {
            download_dir_or(d.map(PathBuf::from), || PathBuf::from(default))
        };
        assert_eq!(dir(Some("in"), "/unused").unwrap(), cwd.join("in"));
        assert_eq!(dir(None, "/home/ann/Downloads").unwrap(), Path::new("/home/ann/Downloads"));
        assert_eq!(dir(None, ".").unwrap(), std::path::absolute(".").unwrap());
        assert_eq!(dir(None, "home/Downloads").unwrap(), cwd.join("home/Downloads"));
        // Nothing to resolve: an error the user sees, not a relative path sent on.
        let e = absolute(Path::new("")).unwrap_err();
        assert!(format!("{e:#}").contains("cannot resolve"), "{e:#}");
        assert!(download_dir(Some(PathBuf::new())).is_err());
        assert!(download_dir(None).unwrap().is_absolute());
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
