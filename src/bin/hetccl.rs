//! `hetccl`: the command-line front end. `main` only dispatches on the subcommand; each
//! subcommand lives in its own library module.

use std::ffi::OsString;

const USAGE: &str = "\
usage: hetccl <command> [ARGS...]

commands:
  run    start N local ranks of a program (hetccl run --help)";

fn main() {
    let args: Vec<OsString> = std::env::args_os().collect();
    let rest = args.get(2..).unwrap_or_default();
    let code = match args.get(1).and_then(|a| a.to_str()) {
        Some("run") => hetccl::launcher::cli(rest),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            0
        }
        Some(other) => {
            eprintln!("hetccl: unknown command {other:?}\n\n{USAGE}");
            2
        }
        None => {
            eprintln!("{USAGE}");
            2
        }
    };
    std::process::exit(code);
}
