//! `thrctl top`: queues, rates, latency percentiles, saturated quotas and
//! daemons, refreshed every second (q or Esc to quit).

use std::time::Duration;

use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::widgets::{Block, Borders, Row, Table};
use thr_broker::redis::inspect::{DaemonInfo, QueueOverview, QuotaUsage};

use crate::commands::{QUEUE_COLUMNS, overviews, queue_cells, saturated};
use crate::table::age;
use crate::{Context, Failure};

/// What one frame shows.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every queue.
    pub queues: Vec<QueueOverview>,
    /// Quotas at their maximum.
    pub saturated: Vec<QuotaUsage>,
    /// Live daemons.
    pub daemons: Vec<DaemonInfo>,
}

/// Reads a snapshot from Redis.
pub async fn snapshot(cx: &Context) -> Result<Snapshot, Failure> {
    Ok(Snapshot {
        queues: overviews(cx).await?,
        saturated: saturated(cx.config.as_ref(), &cx.broker.quota_usage().await?),
        daemons: cx.broker.daemons().await?,
    })
}

/// Draws a snapshot.
pub fn draw(frame: &mut Frame<'_>, s: &Snapshot) {
    let areas = Layout::vertical([
        Constraint::Length(s.queues.len() as u16 + 3),
        Constraint::Length(s.saturated.len().max(1) as u16 + 3),
        Constraint::Min(3),
    ])
    .split(frame.area());
    let bold = Style::default().add_modifier(Modifier::BOLD);

    let rows = s.queues.iter().map(|q| Row::new(queue_cells(q)));
    let widths = [
        Constraint::Percentage(22),
        Constraint::Percentage(11),
        Constraint::Percentage(11),
        Constraint::Percentage(11),
        Constraint::Percentage(11),
        Constraint::Percentage(24),
        Constraint::Percentage(10),
    ];
    frame.render_widget(
        Table::new(rows, widths)
            .header(Row::new(QUEUE_COLUMNS).style(bold))
            .block(
                Block::default()
                    .borders(Borders::ALL)
                    .title(" thr: queues "),
            ),
        areas[0],
    );

    let quota_rows: Vec<Row> = if s.saturated.is_empty() {
        vec![Row::new(vec!["none".to_string()])]
    } else {
        s.saturated
            .iter()
            .map(|q| {
                Row::new(vec![
                    format!("{}={}", q.limit, q.value),
                    q.running.to_string(),
                    q.waiting.to_string(),
                ])
            })
            .collect()
    };
    frame.render_widget(
        Table::new(
            quota_rows,
            [
                Constraint::Percentage(60),
                Constraint::Percentage(20),
                Constraint::Percentage(20),
            ],
        )
        .header(Row::new(vec!["QUOTA", "RUNNING", "WAITING"]).style(bold))
        .block(
            Block::default()
                .borders(Borders::ALL)
                .title(" saturated quotas "),
        ),
        areas[1],
    );

    let daemon_rows = s.daemons.iter().map(|d| {
        let load = if d.kind == "http2redis" {
            format!(
                "{} waiting",
                d.info.get("waiting").cloned().unwrap_or_default()
            )
        } else {
            format!(
                "{} running",
                d.info.get("inflight").cloned().unwrap_or_default()
            )
        };
        Row::new(vec![
            d.kind.clone(),
            d.id[..d.id.len().min(12)].to_string(),
            load,
            age(d.seen_ms_ago),
        ])
    });
    frame.render_widget(
        Table::new(
            daemon_rows,
            [
                Constraint::Percentage(25),
                Constraint::Percentage(30),
                Constraint::Percentage(25),
                Constraint::Percentage(20),
            ],
        )
        .header(Row::new(vec!["DAEMON", "ID", "LOAD", "SEEN"]).style(bold))
        .block(
            Block::default()
                .borders(Borders::ALL)
                .title(" fronts and workers (q: quit) "),
        ),
        areas[2],
    );
}

/// The live view.
pub async fn run(cx: &Context) -> Result<(), Failure> {
    let mut terminal = ratatui::init();
    let result = async {
        loop {
            let s = snapshot(cx).await?;
            terminal.draw(|f| draw(f, &s)).map_err(|e| Failure {
                message: e.to_string(),
                code: 1,
            })?;
            let deadline = std::time::Instant::now() + Duration::from_secs(1);
            while std::time::Instant::now() < deadline {
                if event::poll(Duration::from_millis(100)).unwrap_or(false)
                    && let Ok(Event::Key(key)) = event::read()
                    && matches!(key.code, KeyCode::Char('q') | KeyCode::Esc)
                {
                    return Ok(());
                }
            }
        }
    }
    .await;
    ratatui::restore();
    result
}
