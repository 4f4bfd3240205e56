//! The live table on a terminal (ratatui + crossterm): sorted by peer
//! retransmits, frozen and held rows coloured, redrawn on resize, `q`
//! (or Esc, Ctrl-C) quits and puts the terminal back as it was.

use std::{io::Stdout, time::Duration};

use crossterm::{
    event::{self, Event, KeyCode, KeyModifiers},
    execute,
    terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
};
use ratatui::{
    Terminal as RatatuiTerminal,
    backend::CrosstermBackend,
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Block, Paragraph, Row as TableRow, Table},
};
use tokio::sync::mpsc;

use super::{
    model::{RowMode, Snapshot},
    render,
};

pub struct Terminal {
    terminal: RatatuiTerminal<CrosstermBackend<Stdout>>,
    events: mpsc::UnboundedReceiver<Event>,
    last: Option<Snapshot>,
    /// Messages kept while the table is up: how many, and the latest.
    messages: Option<(usize, String)>,
}

impl Terminal {
    pub fn enter() -> anyhow::Result<Self> {
        enable_raw_mode()?;
        let mut stdout = std::io::stdout();
        if let Err(err) = execute!(stdout, EnterAlternateScreen) {
            let _ = disable_raw_mode();
            return Err(err.into());
        }
        let terminal = RatatuiTerminal::new(CrosstermBackend::new(stdout))?;
        // Keys and resizes are read on a thread of their own, so none is
        // lost when a tick wins the race against a read.
        let (tx, events) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            loop {
                match event::poll(Duration::from_millis(100)) {
                    Ok(true) => match event::read() {
                        Ok(event) => {
                            if tx.send(event).is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    },
                    Ok(false) => {
                        if tx.is_closed() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(Self {
            terminal,
            events,
            last: None,
            messages: None,
        })
    }

    /// `messages`: how many were kept while the table is up, and the
    /// latest (all of them are printed when the terminal is restored).
    pub fn draw(
        &mut self,
        snapshot: &Snapshot,
        messages: Option<(usize, String)>,
    ) -> anyhow::Result<()> {
        self.last = Some(snapshot.clone());
        self.messages = messages;
        self.redraw()
    }

    fn redraw(&mut self) -> anyhow::Result<()> {
        let Some(snapshot) = self.last.as_ref() else {
            return Ok(());
        };
        // NO_COLOR: the same screen, without colour.
        let colour = crate::console::colour_allowed(&std::io::stdout());
        let fg = move |c: Color| {
            if colour {
                Style::default().fg(c)
            } else {
                Style::default()
            }
        };
        let dim = fg(Color::DarkGray);
        let mut top_lines = vec![Line::from(render::header(snapshot))];
        if let Some(why) = &snapshot.local_retransmits_uncounted {
            top_lines.push(Line::from(why.clone()).style(fg(Color::Yellow)));
        }
        top_lines.push(match &self.messages {
            Some((count, last)) => Line::from(format!(
                "q quits | {count} message{} (all shown on exit), latest: {last}",
                if *count == 1 { "" } else { "s" }
            ))
            .style(dim),
            None => Line::from("q quits").style(dim),
        });
        self.terminal.draw(|frame| {
            let [top, body] = Layout::vertical([
                Constraint::Length(top_lines.len() as u16),
                Constraint::Min(1),
            ])
            .areas(frame.area());
            let header = Paragraph::new(top_lines);
            frame.render_widget(header, top);
            let rows: Vec<TableRow> = snapshot
                .rows
                .iter()
                .map(|row| {
                    let style = match row.mode {
                        RowMode::Frozen => fg(Color::Red),
                        RowMode::Held => fg(Color::Magenta),
                        RowMode::Released => fg(Color::Green),
                        RowMode::Observe => Style::default(),
                    };
                    TableRow::new(render::cells(row).to_vec()).style(style)
                })
                .collect();
            let widths = [
                Constraint::Min(22),
                Constraint::Min(22),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(6),
                Constraint::Length(8),
                Constraint::Length(9),
                Constraint::Length(8),
                Constraint::Length(6),
                Constraint::Length(7),
                Constraint::Length(7),
                Constraint::Min(13),
            ];
            let table = Table::new(rows, widths)
                .header(
                    TableRow::new(render::COLUMNS.to_vec())
                        .style(Style::default().add_modifier(Modifier::BOLD)),
                )
                .block(Block::bordered().title(" migrator watch "));
            frame.render_widget(table, body);
        })?;
        Ok(())
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = disable_raw_mode();
        let _ = execute!(self.terminal.backend_mut(), LeaveAlternateScreen);
        let _ = self.terminal.show_cursor();
    }
}

/// Resolves true when the user asked to quit; false after a resize (the
/// table is redrawn) or another key. Never resolves without a terminal.
pub async fn wait_for_quit(tui: Option<&mut Terminal>) -> bool {
    let Some(tui) = tui else {
        return std::future::pending().await;
    };
    match tui.events.recv().await {
        Some(Event::Key(key)) => {
            matches!(key.code, KeyCode::Char('q') | KeyCode::Esc)
                || (key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL))
        }
        Some(Event::Resize(..)) => {
            let _ = tui.terminal.autoresize();
            let _ = tui.redraw();
            false
        }
        Some(_) => false,
        None => true,
    }
}
