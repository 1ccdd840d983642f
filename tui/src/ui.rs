//! Rendering. Pure functions of [`App`]: nothing here changes state.

use std::time::{SystemTime, UNIX_EPOCH};

use qpq_core::client::{ConnState, ConvKind, HistoryEntry};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style, Stylize};
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{
    Block, BorderType, Borders, Clear, Gauge, List, ListItem, ListState, Paragraph, Wrap,
};

use crate::app::{App, ConvView, Focus, Overlay, label, short_id};
use crate::config::color;

/// Narrower than this, the members pane hides itself.
const MEMBERS_MIN_WIDTH: u16 = 90;

/// Draws the whole screen.
pub fn draw(f: &mut Frame<'_>, app: &App) {
    let [main, status] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(1)]).areas(f.area());
    let show_members = app.show_members
        && main.width >= MEMBERS_MIN_WIDTH
        && app.current().is_some_and(|c| c.kind == ConvKind::Group);
    let side = if main.width < 60 { 16 } else { 24 };
    let [list, center, members] = Layout::horizontal([
        Constraint::Length(side),
        Constraint::Min(20),
        Constraint::Length(if show_members { 22 } else { 0 }),
    ])
    .areas(main);
    let composer_height = (app.composer.lines().len() as u16 + 2).clamp(3, 8);
    let transfers = app.transfers.len() as u16;
    let [timeline, typing, progress, composer] = Layout::vertical([
        Constraint::Min(3),
        Constraint::Length(1),
        Constraint::Length(transfers),
        Constraint::Length(composer_height),
    ])
    .areas(center);
    conversations(f, app, list);
    timeline_pane(f, app, timeline);
    typing_line(f, app, typing);
    transfers_pane(f, app, progress);
    composer_pane(f, app, composer);
    if show_members {
        members_pane(f, app, members);
    }
    status_bar(f, app, status);
    if let Some(o) = &app.overlay {
        overlay(f, app, o);
    }
}

fn block<'a>(title: impl Into<Line<'a>>, focused: bool, app: &App) -> Block<'a> {
    let style =
        if focused { Style::new().fg(color(&app.config.theme.accent)) } else { Style::new() };
    Block::new()
        .borders(Borders::ALL)
        .border_type(if focused { BorderType::Thick } else { BorderType::Plain })
        .border_style(style)
        .title(title)
}

fn conversations(f: &mut Frame<'_>, app: &App, area: Rect) {
    let items: Vec<ListItem<'_>> = app
        .convs
        .iter()
        .map(|c| {
            let mut spans = vec![Span::raw(label(c))];
            if app.named_like_person(c) {
                spans.push(Span::styled(" ⚠", warning()));
            }
            if c.verified {
                spans.push(Span::styled(" ✓", Style::new().fg(ratatui::style::Color::Green)));
            }
            if c.mentions > 0 {
                spans.push(Span::styled(
                    format!(" ({}!)", c.mentions),
                    Style::new().fg(ratatui::style::Color::Red).bold(),
                ));
            } else if c.unread > 0 {
                spans.push(Span::styled(format!(" ({})", c.unread), Style::new().bold()));
            }
            let style = if app.open.as_ref() == Some(&c.id) {
                Style::new().add_modifier(Modifier::BOLD)
            } else {
                Style::new()
            };
            ListItem::new(Line::from(spans)).style(style)
        })
        .collect();
    let mut state =
        ListState::default().with_selected((!app.convs.is_empty()).then_some(app.selected));
    let list = List::new(items)
        .block(block(" Conversations ", app.focus == Focus::Conversations, app))
        .highlight_style(Style::new().reversed())
        .highlight_symbol("> ");
    f.render_stateful_widget(list, area, &mut state);
}

fn timeline_pane(f: &mut Frame<'_>, app: &App, area: Rect) {
    let title = match app.current() {
        Some(c) => {
            let mut spans = vec![Span::raw(format!(" {}", label(c)))];
            if app.named_like_person(c) {
                spans.push(Span::styled(format!(" ⚠ a group, not @{}", c.name), warning()));
            }
            if !c.topic.is_empty() {
                spans.push(Span::raw(format!(" — {}", c.topic)));
            }
            spans.push(Span::raw(" "));
            Line::from(spans)
        }
        None => Line::from(" qpq "),
    };
    let inner_width = area.width.saturating_sub(2).max(1) as usize;
    let mut lines: Vec<Line<'_>> = Vec::new();
    let mut selected_line = None;
    let mut last_day = None;
    let n = app.timeline.len();
    if n == 0 {
        let hint = if app.convs.is_empty() {
            "No conversations yet. /dm <user> starts one, /create <name> makes a group. F1: help."
        } else {
            "No messages here yet."
        };
        lines.push(Line::styled(hint, Style::new().fg(color(&app.config.theme.dim))));
    }
    // Only the newest entries that can be seen (down to the selected one) are laid out: a frame
    // costs the same with 50 or 50,000 messages in memory.
    let height_rows = area.height.saturating_sub(2) as usize;
    let rows = |l: &Line<'_>| l.width().div_ceil(inner_width).max(1);
    let mut start = n;
    let mut filled = 0usize;
    while start > 0 {
        let i = start - 1;
        let must_include = app.focus == Focus::Timeline && n - 1 - i <= app.cursor;
        if filled >= height_rows && !must_include {
            break;
        }
        filled +=
            entry_lines(app, &app.timeline[i], inner_width).iter().map(rows).sum::<usize>() + 1;
        start = i;
    }
    for (i, e) in app.timeline.iter().enumerate().skip(start) {
        let day = e.received_at_ms / 86_400_000;
        if last_day != Some(day) {
            lines.push(
                Line::styled(
                    format!("──── {} ────", date(e.received_at_ms)),
                    Style::new().fg(color(&app.config.theme.dim)),
                )
                .centered(),
            );
            last_day = Some(day);
        }
        if app.new_from == Some(e.seq) {
            let count = app.timeline.iter().filter(|x| x.seq >= e.seq && !x.system).count();
            lines.push(
                Line::styled(
                    format!("──── {count} new messages ────"),
                    Style::new().fg(ratatui::style::Color::Red),
                )
                .centered(),
            );
        }
        if app.focus == Focus::Timeline && n - 1 - i == app.cursor {
            selected_line = Some(lines.len());
        }
        lines.extend(entry_lines(app, e, inner_width));
    }
    if let Some(l) = selected_line.and_then(|s| lines.get_mut(s)) {
        *l = l.clone().patch_style(Style::new().reversed());
    }
    // Show the bottom (or keep the selected line in view).
    let height = area.height.saturating_sub(2) as usize;
    let wrapped: usize = lines.iter().map(|l| l.width().div_ceil(inner_width).max(1)).sum();
    let mut scroll = wrapped.saturating_sub(height);
    if let Some(s) = selected_line {
        let before: usize = lines[..s].iter().map(|l| l.width().div_ceil(inner_width).max(1)).sum();
        if before < scroll {
            scroll = before;
        }
    }
    let p = Paragraph::new(Text::from(lines))
        .block(block(title, app.focus == Focus::Timeline, app))
        .wrap(Wrap { trim: false })
        .scroll((scroll.min(u16::MAX as usize) as u16, 0));
    f.render_widget(p, area);
}

fn entry_lines<'a>(app: &'a App, e: &'a HistoryEntry, _width: usize) -> Vec<Line<'a>> {
    let dim = Style::new().fg(color(&app.config.theme.dim));
    if e.system {
        return vec![Line::styled(format!("{}  * {}", time(e.received_at_ms), e.text), dim)];
    }
    let who = app
        .names
        .get(&e.sender)
        .cloned()
        .unwrap_or_else(|| e.sender.iter().take(3).map(|b| format!("{b:02x}")).collect());
    let own = who == app.username;
    let name_style = if own {
        Style::new().fg(color(&app.config.theme.accent)).bold()
    } else {
        Style::new().fg(color(&app.config.theme.peer)).bold()
    };
    let mut out = Vec::new();
    if let Some(r) = e.reply_to {
        let quoted = app
            .timeline
            .iter()
            .find(|x| x.message_id == r)
            .map(|x| x.text.chars().take(40).collect::<String>())
            .unwrap_or_else(|| "…".into());
        out.push(Line::styled(format!("      ↳ {quoted}"), dim));
    }
    let mut spans = vec![
        Span::styled(
            format!("{} ", time(e.sent_at_ms.min(e.received_at_ms.max(e.sent_at_ms)))),
            dim,
        ),
        Span::styled(who, name_style),
        Span::raw(" "),
    ];
    if e.deleted {
        spans.push(Span::styled("(message deleted)", dim.italic()));
    } else if let Some(file) = &e.file {
        spans.push(Span::styled(
            format!("📎 {} ({}) — d to download", file.name, size(file.size)),
            Style::new().underlined(),
        ));
    } else {
        for (i, part) in e.text.split('\n').enumerate() {
            if i > 0 {
                out.push(Line::from(spans));
                spans = vec![Span::raw("      ")];
            }
            for word in part.split_inclusive(' ') {
                let w = word.trim_end();
                if w.starts_with("https://") || w.starts_with("http://") {
                    spans.push(Span::styled(
                        word.to_string(),
                        Style::new().underlined().fg(color(&app.config.theme.accent)),
                    ));
                } else if w.starts_with('@') && w.trim_start_matches('@') == app.username {
                    spans.push(Span::styled(word.to_string(), Style::new().bold().reversed()));
                } else {
                    spans.push(Span::raw(word.to_string()));
                }
            }
        }
    }
    if e.edited && !e.deleted {
        spans.push(Span::styled(" (edited)", dim));
    }
    if e.pending {
        spans.push(Span::styled(" ⏳", dim));
    } else if !e.read_by.is_empty() && own {
        spans.push(Span::styled(format!(" ✓{}", e.read_by.len()), dim));
    }
    out.push(Line::from(spans));
    if !e.reactions.is_empty() {
        let mut counts: Vec<(String, usize)> = Vec::new();
        for (emoji, _) in &e.reactions {
            match counts.iter_mut().find(|(em, _)| em == emoji) {
                Some((_, n)) => *n += 1,
                None => counts.push((emoji.clone(), 1)),
            }
        }
        let text = counts.iter().map(|(e, n)| format!("{e} {n}")).collect::<Vec<_>>().join("  ");
        out.push(Line::styled(format!("      {text}   [{}]", short_id(&e.message_id)), dim));
    }
    out
}

fn typing_line(f: &mut Frame<'_>, app: &App, area: Rect) {
    let who: Vec<&str> = app
        .open
        .as_ref()
        .and_then(|c| app.typing.get(c))
        .map(|l| l.iter().map(|(w, _)| w.as_str()).collect())
        .unwrap_or_default();
    let text = match who.len() {
        0 => String::new(),
        1 => format!(" {} is typing…", who[0]),
        _ => format!(" {} are typing…", who.join(", ")),
    };
    f.render_widget(
        Paragraph::new(text).style(Style::new().fg(color(&app.config.theme.dim)).italic()),
        area,
    );
}

fn transfers_pane(f: &mut Frame<'_>, app: &App, area: Rect) {
    for (i, t) in app.transfers.iter().enumerate() {
        let row = Rect { y: area.y + i as u16, height: 1, ..area };
        let ratio =
            if t.total == 0 { 0.0 } else { (t.done as f64 / t.total as f64).clamp(0.0, 1.0) };
        let label = format!(
            "{} {} {}/{}",
            if t.upload { "↑" } else { "↓" },
            t.name,
            size(t.done),
            size(t.total)
        );
        f.render_widget(
            Gauge::default()
                .ratio(ratio)
                .label(label)
                .gauge_style(Style::new().fg(color(&app.config.theme.accent))),
            row,
        );
    }
}

fn composer_pane(f: &mut Frame<'_>, app: &App, area: Rect) {
    let mut composer = app.composer.clone();
    composer.set_block(block(" Message ", app.focus == Focus::Composer, app));
    if app.focus != Focus::Composer {
        composer.set_cursor_style(Style::new());
    }
    f.render_widget(&composer, area);
}

fn members_pane(f: &mut Frame<'_>, app: &App, area: Rect) {
    let typing: Vec<&str> = app
        .open
        .as_ref()
        .and_then(|c| app.typing.get(c))
        .map(|l| l.iter().map(|(w, _)| w.as_str()).collect())
        .unwrap_or_default();
    let items: Vec<ListItem<'_>> = app
        .members
        .iter()
        .map(|(name, admin, _)| {
            let mut s = vec![Span::raw(if *admin { "★ " } else { "  " }), Span::raw(name.clone())];
            if typing.contains(&name.as_str()) {
                s.push(Span::styled(" ✎", Style::new().italic()));
            }
            ListItem::new(Line::from(s))
        })
        .collect();
    f.render_widget(
        List::new(items).block(block(
            format!(" Members ({}) ", app.members.len()),
            app.focus == Focus::Members,
            app,
        )),
        area,
    );
}

fn status_bar(f: &mut Frame<'_>, app: &App, area: Rect) {
    let (state, style) = match app.conn {
        ConnState::Online => {
            ("● online".to_string(), Style::new().fg(ratatui::style::Color::Green))
        }
        ConnState::Reconnecting => {
            ("◌ reconnecting…".to_string(), Style::new().fg(ratatui::style::Color::Yellow))
        }
        ConnState::Offline => {
            let text = match app.retry_at {
                Some(at) => {
                    let secs = at.saturating_duration_since(app.now).as_secs_f32().ceil();
                    format!("○ offline · retry in {secs:.0}s")
                }
                None => "○ offline".to_string(),
            };
            (text, Style::new().fg(ratatui::style::Color::Red))
        }
    };
    let mut spans =
        vec![Span::styled(state, style), Span::raw(format!("  {}@{}", app.username, app.server))];
    if !app.identity.is_empty() {
        spans.push(Span::styled(
            format!("  id {}", app.identity),
            Style::new().fg(color(&app.config.theme.dim)),
        ));
    }
    if app.outbox > 0 {
        spans.push(Span::styled(
            format!("  outbox {}", app.outbox),
            Style::new().fg(ratatui::style::Color::Yellow),
        ));
    }
    if let Some((m, err)) = &app.message {
        let s = if *err { Style::new().fg(ratatui::style::Color::Red) } else { Style::new() };
        spans.push(Span::styled(format!("  │ {m}"), s));
    }
    spans.push(Span::styled("  F1 help", Style::new().fg(color(&app.config.theme.dim))));
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

/// The help overlay's lines: every binding and slash command.
pub const HELP: &[(&str, &str)] = &[
    ("Tab / Shift-Tab", "next / previous pane"),
    ("Ctrl-K", "jump to a conversation (fuzzy)"),
    ("Ctrl-G", "group info, epoch, verification code"),
    ("Ctrl-B", "show / hide the members pane"),
    ("F1, ?", "this help"),
    ("Ctrl-Q, Ctrl-C", "quit"),
    ("j/k, ↑/↓", "move in lists and the timeline"),
    ("g/G, Home/End", "first / last"),
    ("Enter", "open conversation / send message"),
    ("Alt-Enter", "new line in the composer"),
    ("Ctrl-U, Ctrl-W", "clear the draft / delete a word"),
    ("↑/↓ in composer", "recall sent lines"),
    ("Esc, i", "leave / enter the composer"),
    ("timeline: y", "copy message (OSC 52)"),
    ("timeline: r", "reply to message"),
    ("timeline: +", "react 👍"),
    ("timeline: d", "download file"),
    ("/dm <user>", "open a direct message"),
    ("/create <name>", "create a group"),
    ("/invite <user>…", "add members (admins)"),
    ("/kick <user>", "remove a member (admins, asks)"),
    ("/promote, /demote <user>", "change admins (admins)"),
    ("/rename <name>, /topic <t>", "group name and topic (admins)"),
    ("/rotate", "rotate your keys in this group"),
    ("/leave", "leave the group (asks)"),
    ("/info, /verify [user]", "group info / safety number"),
    ("/send-file <path>", "send a file (up to 50 MB)"),
    ("/download [dir]", "download the latest file (default ~/Downloads)"),
    ("/react <emoji>", "react to the selected or last message"),
    ("/edit <text>, /delete", "edit or delete your last message"),
    ("/notify all|mentions|none", "notifications for this conversation"),
    ("/quit", "quit"),
];

fn overlay(f: &mut Frame<'_>, app: &App, o: &Overlay) {
    let area = f.area();
    let (title, body, w, h): (String, Text<'_>, u16, u16) = match o {
        Overlay::Help => {
            let lines: Vec<Line<'_>> = HELP
                .iter()
                .map(|(k, v)| {
                    Line::from(vec![
                        Span::styled(format!("{k:<32}"), Style::new().bold()),
                        Span::raw(*v),
                    ])
                })
                .collect();
            let h = lines.len() as u16 + 2;
            (" Help (Esc to close) ".into(), Text::from(lines), 84, h)
        }
        Overlay::Switcher { query, selected } => {
            let mut lines = vec![Line::from(format!("> {query}▏"))];
            for (i, idx) in app.switcher_matches(query).iter().take(10).enumerate() {
                let c: &ConvView = &app.convs[*idx];
                let l = if app.named_like_person(c) {
                    Line::from(vec![Span::raw(label(c)), Span::styled(" ⚠", warning())])
                } else {
                    Line::from(label(c))
                };
                lines.push(if i == *selected { l.reversed() } else { l });
            }
            (" Jump to ".into(), Text::from(lines), 40, 13)
        }
        Overlay::Confirm { prompt, .. } => (
            " Confirm ".into(),
            Text::from(vec![
                Line::from(prompt.clone()),
                Line::from(""),
                Line::from("y = yes, any other key = no").bold(),
            ]),
            50,
            5,
        ),
        Overlay::Info(info) => {
            let mut lines = vec![
                Line::from(format!("name    {}", info.name)),
                Line::from(format!("topic   {}", info.topic)),
                Line::from(format!("epoch   {}", info.epoch)),
                Line::from(format!("verify  {}", info.code)),
                Line::from("members").bold(),
            ];
            for (n, admin) in &info.members {
                lines.push(Line::from(format!("  {}{n}", if *admin { "★ " } else { "  " })));
            }
            lines.push(Line::from(""));
            lines.push(
                Line::from("Every member sees the same verification code in the same epoch.")
                    .italic(),
            );
            let h = lines.len() as u16 + 2;
            (" Group info ".into(), Text::from(lines), 60, h)
        }
        Overlay::Safety { user, number, verified } => (
            format!(" Safety number with {user} "),
            Text::from(vec![
                Line::from(number.clone()).bold(),
                Line::from(""),
                if *verified {
                    Line::from("✓ verified: you compared it with them.")
                } else {
                    Line::from("Compare it with them in person or on a call.")
                },
                Line::from(if *verified {
                    "m: forget that  Esc: close"
                } else {
                    "m: it matches, mark verified  Esc: close"
                })
                .italic(),
            ]),
            60,
            8,
        ),
        Overlay::Alert { title, text } => {
            let lines = vec![
                Line::from(title.clone()).style(warning().bold()),
                Line::from(""),
                Line::from(text.clone()),
                Line::from(""),
                Line::from("Enter or Esc: I understand").italic(),
            ];
            (" ⚠ WARNING ".into(), Text::from(lines), 70, 14)
        }
    };
    let rect = centered(area, w, h);
    f.render_widget(Clear, rect);
    f.render_widget(
        Paragraph::new(body).wrap(Wrap { trim: false }).block(block(title, true, app)),
        rect,
    );
}

/// A `w` x `h` rectangle in the middle of `area` (clipped to it), for overlays and forms.
pub fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let (w, h) = (w.min(area.width), h.min(area.height));
    Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    }
}

/// The style of a warning marker: a group named like a person.
fn warning() -> Style {
    Style::new().fg(ratatui::style::Color::Yellow).bold()
}

fn time(ms: u64) -> String {
    let secs = ms / 1000;
    format!("{:02}:{:02}", (secs / 3600) % 24, (secs / 60) % 60)
}

/// A civil date (UTC) from ms since the epoch.
fn date(ms: u64) -> String {
    let days = (ms / 86_400_000) as i64;
    // Howard Hinnant's days-from-civil inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    let today = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
        / 86_400_000;
    if ms / 86_400_000 == today { "today".into() } else { format!("{y:04}-{m:02}-{d:02}") }
}

fn size(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MB", n as f64 / (1 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

#[cfg(test)]
mod tests;
