//! `hetccl`: the command-line front end (launcher, perf tool).

fn main() {
    eprintln!("usage: hetccl run -n N -- PROGRAM [ARGS...]");
    std::process::exit(2);
}
