//! `migrator watch`: live per-connection counters for the people watching
//! a move. It reads the pinned flow table a migration uses (so it can
//! watch a move made by another `migrator` process), adds the connections
//! it is asked to follow in observe mode, counts our own retransmits with
//! the tcp_retransmit_skb tracepoint (BTF, else tracefs), and shows
//! everything as a live table, plain tables, JSON lines or Prometheus
//! metrics. While the live table owns the terminal, messages go to its
//! status line and are printed in full when it closes (`console`).

pub mod model;
pub mod render;
mod tui;

use std::{collections::BTreeSet, io::Write as _, net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    console,
    dataplane::{self, AttachMode, Dataplane, FlowTable, RetransmitCounter, spec::FlowSpec},
    net::{address::Netlink, discover},
    system::boottime_ns,
};
pub use model::{Row, RowMode, Selection, Snapshot, Watcher};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Live, refreshing table (a terminal).
    Tui,
    /// One table per interval, no escape codes.
    Plain,
    /// JSON lines, one object per connection per interval.
    Json,
    /// Nothing on stdout (metrics only).
    None,
}

pub struct WatchOptions {
    pub selection: Selection,
    pub pid: Option<i32>,
    pub iface: Option<String>,
    pub interval: Duration,
    pub output: Output,
    pub once: bool,
    pub metrics_addr: Option<SocketAddr>,
    /// Metrics per connection (`local`, `remote` labels), or summed.
    pub connection_labels: bool,
}

/// Where a running migration publishes its current phase, per network
/// namespace (a plain file: bpffs takes no regular files).
pub fn phase_file(pin_root: &std::path::Path) -> PathBuf {
    let name = pin_root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    PathBuf::from("/run/migrator").join(format!("{name}.phase"))
}

/// The phase of the migration running in the network namespace of
/// `pin_root`, if one runs: a file left by a `migrate` that was killed
/// (its PID gone, or taken by another program) is no migration.
pub fn current_phase(pin_root: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(phase_file(pin_root)).ok()?;
    let mut lines = text.lines();
    let phase = lines.next()?.trim().to_owned();
    let writer: u32 = lines.next()?.trim().parse().ok()?;
    let alive = std::fs::read_to_string(format!("/proc/{writer}/comm"))
        .is_ok_and(|comm| comm.trim() == "migrator");
    (alive && !phase.is_empty()).then_some(phase)
}

/// The connections this watcher added (observe mode), to remove on exit.
struct Followed {
    added: BTreeSet<FlowSpec>,
}

struct State {
    root: PathBuf,
    /// Inode of the FLOWS pin our table came from: when a migration
    /// detaches and another attaches, the pins are new maps and the old
    /// ones would show stale numbers.
    opened_pin: Option<u64>,
    /// Kept alive: it holds the tracepoint link (our own retransmits).
    dataplane: Option<Dataplane>,
    /// The kernel programs' messages, shown like ours (status line, log).
    logs: Option<dataplane::logs::LogForwarder>,
    table: Option<FlowTable>,
    followed: Followed,
    warned_no_connections: bool,
    /// How our own retransmits are counted, or why they are not (as of
    /// the latest open).
    retransmit_counter: Option<Result<RetransmitCounter, String>>,
}

impl State {
    /// Open the pinned table (loading the programs to attach the
    /// tracepoint), attaching to interfaces when there are connections to
    /// observe. Quiet when nothing is attached yet: a migration may start.
    fn ensure_open(&mut self, ifaces: &BTreeSet<String>) -> anyhow::Result<()> {
        let attached = dataplane::attached_interfaces(&self.root);
        let missing: Vec<&String> = ifaces.iter().filter(|i| !attached.contains(i)).collect();
        let pin = self.flows_pin_inode();
        if self.table.is_some() && missing.is_empty() && pin.is_some() && pin == self.opened_pin {
            return Ok(());
        }
        if attached.is_empty() && ifaces.is_empty() {
            // Nothing to read and nothing to attach: wait for a migration.
            self.table = None;
            self.dataplane = None;
            self.logs = None;
            return Ok(());
        }
        let mut dp = Dataplane::load_pinned(&self.root)?;
        for iface in missing {
            dp.attach(iface, AttachMode::Auto)?;
        }
        let counter = dp
            .attach_retransmit_counter()
            .map_err(|err| format!("{err}; {}", err.fix()));
        if let Err(why) = &counter
            && !matches!(self.retransmit_counter, Some(Err(_)))
        {
            console::say(format!("migrator watch: {why}"));
        }
        self.retransmit_counter = Some(counter);
        self.logs = dp.forward_logs();
        self.table = Some(dp.take_table()?);
        self.dataplane = Some(dp);
        self.opened_pin = self.flows_pin_inode();
        Ok(())
    }

    fn flows_pin_inode(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(dataplane::maps_dir(&self.root).join(dataplane::table::FLOWS_MAP))
            .ok()
            .map(|meta| meta.ino())
    }

    /// Observe new connections of the followed set; forget the ones that
    /// closed (only those we added and nobody froze since).
    fn follow(&mut self, current: &BTreeSet<FlowSpec>) -> anyhow::Result<()> {
        let Some(table) = self.table.as_mut() else {
            return Ok(());
        };
        let new: Vec<_> = current
            .difference(&self.followed.added)
            .filter(|flow| table.flow_stats(&flow.key()).ok().flatten().is_none())
            .copied()
            .collect();
        if !new.is_empty() {
            let keys: Vec<_> = new.iter().map(FlowSpec::key).collect();
            table.set_flows(&keys, migrator_common::FlowPolicy::observe())?;
            self.followed.added.extend(new);
        }
        let gone: Vec<FlowSpec> = self.followed.added.difference(current).copied().collect();
        forget_observed(table, &gone);
        for flow in gone {
            self.followed.added.remove(&flow);
        }
        Ok(())
    }

    /// Leave nothing behind: our observed flows, and the attachment once
    /// nothing is tracked any more.
    fn close(mut self) {
        if let Some(table) = self.table.as_mut() {
            let added: Vec<_> = self.followed.added.iter().copied().collect();
            forget_observed(table, &added);
            dataplane::detach_if_unused(&self.root, table);
        }
    }
}

/// Forget flows, except ones someone has frozen meanwhile (a migration
/// started on them): those are not ours to remove.
fn forget_observed(table: &mut FlowTable, flows: &[FlowSpec]) {
    if flows.is_empty() {
        return;
    }
    let now = boottime_ns();
    let entries = table.flows().unwrap_or_default();
    let keys: Vec<_> = flows
        .iter()
        .map(FlowSpec::key)
        .filter(|key| {
            entries.iter().any(|e| {
                e.key == *key && e.policy.effective_mode(now) == migrator_common::FlowMode::Observe
            })
        })
        .collect();
    let _ = table.forget_flows(&keys);
}

/// The connections to follow now: `--flow`s, plus the process tree's.
fn wanted(options: &WatchOptions, warned: &mut bool) -> anyhow::Result<BTreeSet<FlowSpec>> {
    let mut flows: BTreeSet<FlowSpec> = options.selection.flows.iter().copied().collect();
    if let Some(pid) = options.pid {
        match discover::discover(pid) {
            Ok(network) => {
                if network.connections.is_empty() && !*warned {
                    console::say(format!(
                        "process {pid} has no TCP connections yet; watching for new ones"
                    ));
                    *warned = true;
                }
                flows.extend(network.connections);
            }
            Err(discover::DiscoverError::NoSuchProcess(_)) if flows.is_empty() => {
                anyhow::bail!(
                    "process {pid} does not exist (any more): nothing to follow (see `ps -p {pid}`)"
                );
            }
            Err(_) => {}
        }
    }
    Ok(flows)
}

/// Interfaces the wanted connections use: `--iface`, or the one holding
/// each connection's local address.
async fn interfaces(
    options: &WatchOptions,
    flows: &BTreeSet<FlowSpec>,
    netlink: &Netlink,
) -> anyhow::Result<BTreeSet<String>> {
    if let Some(iface) = &options.iface {
        return Ok(BTreeSet::from([iface.clone()]));
    }
    let locals = flows.iter().map(|flow| flow.local.ip()).collect();
    let mut ifaces = netlink.interfaces_holding(&locals).await?;
    ifaces.remove("lo");
    Ok(ifaces)
}

pub async fn run(options: WatchOptions) -> anyhow::Result<()> {
    let root = dataplane::default_pin_root();
    let netlink = Netlink::connect()?;
    let mut state = State {
        root: root.clone(),
        opened_pin: None,
        dataplane: None,
        logs: None,
        table: None,
        followed: Followed {
            added: BTreeSet::new(),
        },
        warned_no_connections: false,
        retransmit_counter: None,
    };
    // Kept for the scrapes only when there are scrapes to serve.
    let mut latest = None;
    if let Some(addr) = options.metrics_addr {
        let shared = latest.insert(crate::metrics::connections::Latest::default());
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(crate::metrics::connections::Connections::new(
            shared.clone(),
            options.connection_labels,
        )));
        crate::metrics::spawn_server(addr, registry)
            .await
            .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: {e}"))?;
        console::say(format!(
            "serving Prometheus metrics on http://{addr}/metrics"
        ));
    }
    // Taken before the terminal and dropped after it: messages kept
    // while the table is up are printed once the screen is restored.
    let hold = matches!(options.output, Output::Tui).then(console::Hold::begin);
    let mut tui = match options.output {
        Output::Tui => Some(tui::Terminal::enter()?),
        _ => None,
    };
    let mut watcher = Watcher::default();
    let mut ticker = tokio::time::interval(options.interval);
    // SIGTERM (a service manager, `timeout`) ends the watch as cleanly as q.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = terminate.recv() => break Ok(()),
            quit = tui::wait_for_quit(tui.as_mut()) => {
                if quit { break Ok(()); }
                continue;
            }
        }
        let step: anyhow::Result<Snapshot> = async {
            let flows = wanted(&options, &mut state.warned_no_connections)?;
            let ifaces = if flows.is_empty() {
                BTreeSet::new()
            } else {
                interfaces(&options, &flows, &netlink).await?
            };
            state.ensure_open(&ifaces)?;
            state.follow(&flows)?;
            let (entries, services) = match state.table.as_ref() {
                Some(table) => (table.flows()?, table.services()?),
                None => (Vec::new(), Vec::new()),
            };
            let phase = current_phase(&root);
            // Following a process: its connections are the selection.
            let mut selection = options.selection.clone();
            if options.pid.is_some() {
                selection.flows.extend(flows.iter().copied());
                selection.only_listed = true;
            }
            let snapshot = watcher.snapshot(
                &entries,
                &services,
                &selection,
                boottime_ns(),
                crate::system::unix_ms(),
                phase,
            );
            Ok(match &state.retransmit_counter {
                Some(Err(why)) => snapshot.without_local_retransmits(why),
                _ => snapshot,
            })
        }
        .await;
        let snapshot = match step {
            Ok(snapshot) => snapshot,
            Err(err) => break Err(err),
        };
        if let Some(latest) = &latest {
            latest.set(&snapshot);
        }
        let mut stdout = std::io::stdout().lock();
        match options.output {
            Output::Tui => {
                if let Some(tui) = tui.as_mut() {
                    tui.draw(&snapshot, hold.as_ref().and_then(console::Hold::status))?;
                }
            }
            Output::Plain => {
                stdout.write_all(render::plain(&snapshot).as_bytes())?;
                stdout.write_all(b"\n")?;
            }
            Output::Json => stdout.write_all(render::json_lines(&snapshot).as_bytes())?,
            Output::None => {}
        }
        stdout.flush()?;
        drop(stdout);
        if options.once {
            break Ok(());
        }
    };
    drop(tui);
    state.close();
    drop(hold);
    result
}
