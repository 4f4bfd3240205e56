//! The network lock by hand: `attach`, `detach`, `freeze`, `release`,
//! `status`.

use std::{process::ExitCode, time::Duration};

use anyhow::bail;
use clap::Args;
use migrator::{
    dataplane::{
        self, AttachMode, Dataplane, FlowTable,
        spec::{FlowSpec, parse_duration},
        status::Snapshot,
    },
    system,
};
use migrator_common::FlowPolicy;

use serde_json::json;

use super::{IfaceArg, JsonArg, Targets, not_attached, require_privileges, tell};

#[derive(Args)]
pub struct AttachArgs {
    #[command(flatten)]
    iface: IfaceArg,
    /// tcx (kernel >= 6.6), clsact (any kernel), or auto.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    mode: AttachMode,
    #[command(flatten)]
    json: JsonArg,
}

pub fn run_attach(args: AttachArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let AttachArgs { iface, mode, json } = args;
    let root = dataplane::default_pin_root();
    require_privileges()?;
    let mut dp = Dataplane::load_pinned(&root)?;
    let (how, new) = dp.attach(&iface.name, mode)?;
    let how = format!("{how:?}").to_lowercase();
    let done = json!({ "interface": iface.name, "mode": how, "newly_attached": new });
    tell(json.json, quiet, &done, || {
        if new {
            format!("attached to {} ({how})", iface.name)
        } else {
            format!("{} was already attached ({how})", iface.name)
        }
    });
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct DetachArgs {
    #[command(flatten)]
    iface: IfaceArg,
    #[command(flatten)]
    json: JsonArg,
}

pub fn run_detach(args: DetachArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let DetachArgs { iface, json } = args;
    let root = dataplane::default_pin_root();
    require_privileges()?;
    if !dataplane::detach(&root, &iface.name)? {
        return Err(not_attached(&iface.name));
    }
    let done = json!({ "interface": iface.name, "detached": true });
    tell(json.json, quiet, &done, || {
        format!("detached from {}", iface.name)
    });
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct FreezeArgs {
    #[command(flatten)]
    iface: IfaceArg,
    #[command(flatten)]
    targets: Targets,
    /// Keep incoming packets of the locked flows for later delivery
    /// instead of only dropping them.
    #[arg(long)]
    hold: bool,
    /// Fail-open deadline: after this the lock lifts by itself.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    deadline: Duration,
    #[command(flatten)]
    json: JsonArg,
}

pub fn run_freeze(args: FreezeArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let FreezeArgs {
        iface,
        targets,
        hold,
        deadline,
        json,
    } = args;
    let root = dataplane::default_pin_root();
    require_privileges()?;
    if targets.flows.is_empty() && targets.services.is_empty() {
        bail!("nothing to freeze: give --flow LOCAL=REMOTE and/or --ip IP[:PORT]");
    }
    let mut dp = Dataplane::load_pinned(&root)?;
    let (_, newly_attached) = dp.attach(&iface.name, AttachMode::Auto)?;
    if newly_attached && !quiet && !json.json {
        eprintln!("attached to {}", iface.name);
    }
    // The maps just loaded are the pinned ones: no need to reopen them.
    let mut table = dp.take_table()?;
    let deadline_ns = system::deadline_ns(deadline);
    let policy = if hold {
        FlowPolicy::hold(deadline_ns)
    } else {
        FlowPolicy::freeze(deadline_ns)
    };
    let keys: Vec<_> = targets.flows.iter().map(FlowSpec::key).collect();
    table.set_flows(&keys, policy)?;
    for service in &targets.services {
        table.set_service(service.key(), policy)?;
    }
    let done = json!({
        "interface": iface.name,
        "newly_attached": newly_attached,
        "policy": if hold { "hold" } else { "drop" },
        "flows": keys.len(),
        "service_rules": targets.services.len(),
        "deadline_seconds": deadline.as_secs_f64(),
    });
    tell(json.json, quiet, &done, || {
        format!(
            "{} {} flow(s) and {} service rule(s); fails open in {:.1}s unless released",
            if hold { "holding" } else { "froze" },
            keys.len(),
            targets.services.len(),
            deadline.as_secs_f64()
        )
    });
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    iface: IfaceArg,
    #[command(flatten)]
    targets: Targets,
    /// Release every flow and service rule.
    #[arg(long, conflicts_with_all = ["flows", "services"])]
    all: bool,
    #[command(flatten)]
    json: JsonArg,
}

pub fn run_release(args: ReleaseArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let ReleaseArgs {
        iface,
        targets,
        all,
        json,
    } = args;
    let root = dataplane::default_pin_root();
    require_privileges()?;
    if dataplane::attached_interfaces(&root)
        .iter()
        .all(|name| *name != iface.name)
    {
        return Err(not_attached(&iface.name));
    }
    let mut table = FlowTable::open_pinned(&root)?;
    let (flows, services, unknown) = if all {
        let (flows, services) = table.release_all()?;
        (flows, services, Vec::new())
    } else {
        if targets.flows.is_empty() && targets.services.is_empty() {
            bail!("nothing to release: give --flow, --ip or --all");
        }
        let mut unknown = Vec::new();
        let (mut flows, mut services) = (0, 0);
        for flow in &targets.flows {
            if table.release_flow(&flow.key())? {
                flows += 1;
            } else {
                unknown.push(flow.to_string());
            }
        }
        for service in &targets.services {
            if table.release_service(&service.key())? {
                services += 1;
            } else {
                unknown.push(service.to_string());
            }
        }
        (flows, services, unknown)
    };
    let done = json!({
        "interface": iface.name,
        "flows_released": flows,
        "service_rules_released": services,
        "not_tracked": unknown,
    });
    tell(json.json, quiet, &done, || {
        format!("released {flows} flow(s) and {services} service rule(s)")
    });
    if !unknown.is_empty() {
        bail!("not tracked, nothing done for: {}", unknown.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct StatusArgs {
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

pub fn run_status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let StatusArgs { json } = args;
    let root = dataplane::default_pin_root();
    require_privileges()?;
    let snapshot = match FlowTable::open_pinned(&root) {
        Ok(table) => Snapshot::read(&root, &table)?,
        Err(dataplane::DataplaneError::NotAttached { .. }) => Snapshot {
            interfaces: Vec::new(),
            flows: Vec::new(),
            services: Vec::new(),
        },
        Err(err) => return Err(err.into()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&snapshot)?);
    } else {
        print!("{}", snapshot.render());
    }
    Ok(ExitCode::SUCCESS)
}
