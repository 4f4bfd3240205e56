//! The conventions operators expect from the command line, on the real
//! binary: completions and man pages for every command, RUST_LOG, no
//! colour off a terminal, --quiet, and --json on the commands that say
//! what they did.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::{Command, Output};

use migrator_tests::{
    TempDir, migrator_bin,
    netns::{Netns, veth},
    require_root,
};
use serde_json::Value;

fn migrator(args: &[&str]) -> Output {
    Command::new(migrator_bin()).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The subcommands `migrator --help` lists.
fn subcommands() -> Vec<String> {
    let help = text(&migrator(&["--help"]).stdout);
    let listed: Vec<String> = help
        .lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect();
    assert!(listed.len() >= 12, "{help}");
    listed
}

#[test]
fn completions_and_man_pages_name_every_subcommand() {
    let commands = subcommands();
    for shell in ["bash", "zsh", "fish"] {
        let out = migrator(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for command in &commands {
            assert!(script.contains(command.as_str()), "{shell} lacks {command}");
        }
    }
    let page = text(&migrator(&["man"]).stdout);
    assert!(page.contains(".TH migrator 1"), "{page}");
    let dir = TempDir::new("man");
    let out = migrator(&["man", "--dir", dir.0.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for command in &commands {
        assert!(
            page.contains(&format!("migrator\\-{command}(1)")),
            "migrator(1) does not list {command}"
        );
        let own = std::fs::read_to_string(dir.0.join(format!("migrator-{command}.1")))
            .unwrap_or_else(|e| panic!("no page for {command}: {e}"));
        assert!(own.contains(&format!(".TH migrator-{command} 1")), "{own}");
    }
    // The exit statuses are in migrate's page.
    let migrate = std::fs::read_to_string(dir.0.join("migrator-migrate.1")).unwrap();
    assert!(migrate.contains("in doubt") && migrate.contains("rolled back"));
}

#[test]
fn rust_log_shows_debug_lines_and_nothing_is_coloured_off_a_terminal() {
    require_root();
    let run = |env: Option<&str>| {
        let mut command = Command::new(migrator_bin());
        command.args(["doctor", "--json"]).env_remove("RUST_LOG");
        if let Some(filter) = env {
            command.env("RUST_LOG", filter);
        }
        text(&command.output().unwrap().stderr)
    };
    let debug = run(Some("debug"));
    assert!(
        debug
            .lines()
            .any(|l| l.contains("DEBUG") && l.contains("CRIU at")),
        "{debug}"
    );
    assert!(!debug.contains('\x1b'), "colour on a pipe: {debug:?}");
    let quiet = run(None);
    assert!(!quiet.contains("DEBUG"), "{quiet}");
}

#[test]
fn lock_commands_say_what_they_did_in_json_or_not_at_all_with_quiet() {
    require_root();
    let local = Netns::new("cli-l");
    let peer = Netns::new("cli-p");
    veth(
        &local,
        "cv",
        &["198.18.9.1/24"],
        &peer,
        "pv",
        &["198.18.9.2/24"],
    );
    let run = |args: &[&str]| {
        let out = local
            .command(migrator_bin().to_str().unwrap())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        out
    };
    let json = |args: &[&str]| -> Value {
        let out = run(args);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", text(&out.stdout)))
    };
    let attached = json(&["attach", "--iface", "cv", "--json"]);
    assert_eq!(attached["interface"], "cv");
    assert_eq!(attached["newly_attached"], true);
    let flow = "198.18.9.1:5000=198.18.9.2:6000";
    let frozen = json(&[
        "freeze",
        "--iface",
        "cv",
        "--flow",
        flow,
        "--ip",
        "198.18.9.1:7000",
        "--json",
    ]);
    assert_eq!(frozen["flows"], 1);
    assert_eq!(frozen["service_rules"], 1);
    assert_eq!(frozen["policy"], "drop");
    assert_eq!(frozen["newly_attached"], false);
    let released = json(&["release", "--iface", "cv", "--all", "--json"]);
    assert_eq!(released["flows_released"], 1);
    assert_eq!(released["service_rules_released"], 1);
    // --quiet: nothing on either stream.
    let quiet = run(&["--quiet", "freeze", "--iface", "cv", "--flow", flow]);
    assert!(
        quiet.stdout.is_empty() && quiet.stderr.is_empty(),
        "{quiet:?}"
    );
    let quiet = run(&["release", "--iface", "cv", "--all", "-q"]);
    assert!(
        quiet.stdout.is_empty() && quiet.stderr.is_empty(),
        "{quiet:?}"
    );
    let detached = json(&["detach", "--iface", "cv", "--json"]);
    assert_eq!(detached["detached"], true);
    assert!(!local.pin_root().exists(), "pins left after detach");
}
