//! `hetccl`: the command-line front end. `main` only dispatches on the subcommand; each
//! subcommand lives in its own module of this package's library.

use std::ffi::OsString;
use std::io::Write;

const USAGE: &str = "\
usage: hetccl <command> [ARGS...]

commands:
  run       start N local ranks of a program (hetccl run --help)
  doctor    preflight checks, run as a job: hetccl run -n N -- hetccl doctor
  simulate  predict a training step on a described cluster (hetccl simulate --help)
  trace     trace merge OUT FILE...: every rank's HETCCL_TRACE file on one timeline";

fn main() {
    let args: Vec<OsString> = std::env::args_os().collect();
    let rest = args.get(2..).unwrap_or_default();
    let code = match args.get(1).and_then(|a| a.to_str()) {
        Some("run") => hetccl_tools::launcher::cli(rest),
        Some("doctor") => hetccl_tools::doctor::cli(rest),
        Some("trace") => hetccl_tools::trace_merge::cli(rest),
        Some("simulate") => hetccl_tools::simulate::cli(rest),
        // Messages go through writers that drop them on a closed stream instead of panicking.
        Some("-h" | "--help" | "help") => {
            let _ = writeln!(hetccl::log::stdout(), "{USAGE}");
            0
        }
        Some(other) => {
            let _ = writeln!(
                hetccl::log::stderr(),
                "hetccl: unknown command {other:?}\n\n{USAGE}"
            );
            2
        }
        None => {
            let _ = writeln!(hetccl::log::stderr(), "{USAGE}");
            2
        }
    };
    std::process::exit(code);
}
