//! `egressctl top`: sessions and their latest denials, live. A full-screen view on a terminal;
//! a plain table printed every interval otherwise (a pipe, a log, a test).

use std::{
    collections::VecDeque,
    io::{self, IsTerminal as _, Write as _},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::bail;
use egressd_common::protocol::{Denial, Op, Reply, SessionView};
use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEventKind},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Cell, List, ListItem, Paragraph, Row, Table, TableState},
    DefaultTerminal, Frame,
};

use crate::client::Client;

/// Denials kept on screen (newest first).
const SHOWN: usize = 200;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Sort {
    Started,
    Denied,
    Allowed,
}

impl Sort {
    fn next(self) -> Sort {
        match self {
            Sort::Started => Sort::Denied,
            Sort::Denied => Sort::Allowed,
            Sort::Allowed => Sort::Started,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Sort::Started => "newest",
            Sort::Denied => "denied",
            Sort::Allowed => "allowed",
        }
    }
}

struct View {
    sessions: Vec<SessionView>,
    denials: VecDeque<Denial>,
    last_id: u64,
    sort: Sort,
    filter: Option<String>,
    selected: usize,
    error: Option<String>,
}

impl View {
    fn new(filter: Option<String>) -> View {
        View {
            sessions: Vec::new(),
            denials: VecDeque::new(),
            last_id: 0,
            sort: Sort::Started,
            filter,
            selected: 0,
            error: None,
        }
    }

    /// One round trip for the sessions, one for the denials since the last.
    fn refresh(&mut self, socket: &Path) {
        let got = Client::connect_timeout(socket, Duration::from_secs(2)).and_then(|mut c| {
            let Reply::Sessions(s) = c.call(Op::Ps)? else {
                bail!("unexpected reply from egressd");
            };
            let Reply::Denials(d) = c.call(Op::Denials {
                after: self.last_id,
            })?
            else {
                bail!("unexpected reply from egressd (an egressd older than this egressctl?)");
            };
            Ok((s, d))
        });
        match got {
            Ok((sessions, denials)) => {
                self.error = None;
                self.sessions = sessions;
                for d in denials {
                    self.last_id = self.last_id.max(d.id);
                    self.denials.push_front(d);
                }
                self.denials.truncate(SHOWN);
            }
            Err(e) => self.error = Some(format!("{e:#}")),
        }
        match self.sort {
            Sort::Started => self.sessions.sort_by_key(|s| std::cmp::Reverse(s.started)),
            Sort::Denied => self.sessions.sort_by_key(|s| {
                std::cmp::Reverse(s.counters.denied + s.counters.sockets_refused + s.dns_denied)
            }),
            Sort::Allowed => self
                .sessions
                .sort_by_key(|s| std::cmp::Reverse(s.counters.allowed)),
        }
        self.selected = self.selected.min(self.sessions.len().saturating_sub(1));
    }

    fn visible_sessions(&self) -> impl Iterator<Item = &SessionView> {
        self.sessions
            .iter()
            .filter(|s| self.filter.as_ref().is_none_or(|f| &s.id == f))
    }

    fn visible_denials(&self) -> impl Iterator<Item = &Denial> {
        self.denials
            .iter()
            .filter(|d| self.filter.as_ref().is_none_or(|f| &d.session == f))
    }
}

pub fn top(
    socket: &Path,
    session: Option<String>,
    interval_ms: u64,
    rounds: Option<u64>,
) -> anyhow::Result<()> {
    let interval = Duration::from_millis(interval_ms.max(50));
    let mut view = View::new(session);
    if !io::stdout().is_terminal() {
        return plain(socket, &mut view, interval, rounds);
    }
    let mut terminal = ratatui::init();
    let result = live(socket, &mut terminal, &mut view, interval);
    ratatui::restore();
    result
}

/// Full screen: redraws every interval and on each key.
fn live(
    socket: &Path,
    terminal: &mut DefaultTerminal,
    view: &mut View,
    interval: Duration,
) -> anyhow::Result<()> {
    let mut next = Instant::now();
    loop {
        if Instant::now() >= next {
            view.refresh(socket);
            next = Instant::now() + interval;
        }
        terminal.draw(|f| draw(f, view))?;
        let wait = next.saturating_duration_since(Instant::now());
        if !event::poll(wait)? {
            continue;
        }
        let Event::Key(key) = event::read()? else {
            continue;
        };
        if key.kind != KeyEventKind::Press {
            continue;
        }
        let shown = view.visible_sessions().count();
        match key.code {
            KeyCode::Char('q') => return Ok(()),
            KeyCode::Esc if view.filter.is_some() => view.filter = None,
            KeyCode::Esc => return Ok(()),
            KeyCode::Char('s') => {
                view.sort = view.sort.next();
                next = Instant::now();
            }
            KeyCode::Down | KeyCode::Char('j') => {
                view.selected = (view.selected + 1).min(shown.saturating_sub(1))
            }
            KeyCode::Up | KeyCode::Char('k') => view.selected = view.selected.saturating_sub(1),
            KeyCode::Enter | KeyCode::Char('f') => {
                view.filter = match view.filter {
                    Some(_) => None,
                    None => view
                        .visible_sessions()
                        .nth(view.selected)
                        .map(|s| s.id.clone()),
                };
                view.selected = 0;
            }
            _ => {}
        }
    }
}

fn draw(f: &mut Frame, view: &View) {
    let [head, table, denials] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Percentage(45),
        Constraint::Min(4),
    ])
    .areas(f.area());
    let status = match (&view.error, &view.filter) {
        (Some(e), _) => format!("egressd top: {e}"),
        (None, Some(id)) => format!(
            "egressd top: session {id} (f/Enter: all sessions)   sort: {}   s: sort  ↑↓: select  q: quit",
            view.sort.name()
        ),
        (None, None) => format!(
            "egressd top: {} session(s)   sort: {}   s: sort  ↑↓: select  f/Enter: only the selected  q: quit",
            view.sessions.len(),
            view.sort.name()
        ),
    };
    f.render_widget(
        Paragraph::new(status).style(Style::new().add_modifier(Modifier::REVERSED)),
        head,
    );

    let header = Row::new(
        [
            "SESSION", "PROFILE", "UID", "AGE", "ALLOWED", "DENIED", "DNS-DENY", "LOST", "COMMAND",
        ]
        .map(Cell::from),
    )
    .style(Style::new().add_modifier(Modifier::BOLD));
    let rows: Vec<Row> = view
        .visible_sessions()
        .map(|s| {
            Row::new([
                s.id.clone(),
                s.profile.clone(),
                s.uid.to_string(),
                age(s.started),
                s.counters.allowed.to_string(),
                (s.counters.denied + s.counters.sockets_refused).to_string(),
                s.dns_names_denied.to_string(),
                s.audit_lost.to_string(),
                s.argv.join(" "),
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(9),
        Constraint::Length(12),
        Constraint::Length(6),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(5),
        Constraint::Min(10),
    ];
    let mut state = TableState::default().with_selected(Some(view.selected));
    f.render_stateful_widget(
        Table::new(rows, widths)
            .header(header)
            .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
            .block(Block::default().borders(Borders::ALL).title(" sessions ")),
        table,
        &mut state,
    );

    let items: Vec<ListItem> = view
        .visible_denials()
        .map(|d| ListItem::new(Line::from(denial_line(d))))
        .collect();
    f.render_widget(
        List::new(items).block(
            Block::default()
                .borders(Borders::ALL)
                .title(" latest denials (newest first) "),
        ),
        denials,
    );
}

/// `05:01:02 3f2a9c1e curl -> 198.18.6.2:8080 (connect4, default deny)`.
fn denial_line(d: &Denial) -> String {
    let clock = d.time.get(11..19).unwrap_or(&d.time);
    let times = if d.count > 1 {
        format!(" x{}", d.count)
    } else {
        String::new()
    };
    format!(
        "{clock} {} {} -> {} ({}, {}){times}",
        d.session,
        d.comm.as_deref().unwrap_or("?"),
        d.what,
        d.hook,
        d.reason
    )
}

/// Not a terminal: the table and the new denials, every interval (`--rounds N` then stops).
fn plain(
    socket: &Path,
    view: &mut View,
    interval: Duration,
    rounds: Option<u64>,
) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    let mut round = 0;
    loop {
        let before = view.last_id;
        view.refresh(socket);
        if let Some(e) = &view.error {
            writeln!(out, "egressctl top: {e}")?;
        }
        writeln!(
            out,
            "{:<9} {:<12} {:>6} {:>7} {:>8} {:>7} {:>8} {:>5}  COMMAND",
            "SESSION", "PROFILE", "UID", "AGE", "ALLOWED", "DENIED", "DNS-DENY", "LOST"
        )?;
        for s in view.visible_sessions() {
            writeln!(
                out,
                "{:<9} {:<12} {:>6} {:>7} {:>8} {:>7} {:>8} {:>5}  {}",
                s.id,
                s.profile,
                s.uid,
                age(s.started),
                s.counters.allowed,
                s.counters.denied + s.counters.sockets_refused,
                s.dns_names_denied,
                s.audit_lost,
                s.argv.join(" ")
            )?;
        }
        let new: Vec<&Denial> = view.visible_denials().filter(|d| d.id > before).collect();
        for d in new.iter().rev() {
            writeln!(out, "denied: {}", denial_line(d))?;
        }
        writeln!(out)?;
        out.flush()?;
        round += 1;
        if rounds.is_some_and(|r| round >= r) {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}

fn age(started: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let s = now.saturating_sub(started);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denial_reads_as_a_sentence() {
        let d = Denial {
            id: 1,
            time: "2026-12-06T05:01:02.123456789Z".into(),
            session: "3f2a9c1e".into(),
            comm: Some("curl".into()),
            hook: "connect4".into(),
            what: "198.18.6.2:8080".into(),
            reason: "default deny".into(),
            count: 3,
        };
        assert_eq!(
            denial_line(&d),
            "05:01:02 3f2a9c1e curl -> 198.18.6.2:8080 (connect4, default deny) x3"
        );
    }
}
