//! session-bench: what resumable host sessions cost in vsockd, over the
//! virtual VMM: throughput of one resumable session against one raw
//! hybrid stream each way, and the time to reattach (see
//! `vsockd_tests::bench::sessions`). Prints a Markdown table.
//!
//! ```text
//! session-bench [--rounds 5] [--mib 512] [--reattaches 200] [--kills 20]
//! ```
//!
//! Binary: `$VSOCKD_BIN` (default target/release/vsockd).

use std::process::ExitCode;

use clap::Parser;
use vsockd_tests::bench::{sessions, Settings};
use vsockd_tests::qemu::temp_dir;

#[derive(Parser, Debug)]
#[command(
    name = "session-bench",
    about = "Measure vsockd's resumable sessions against raw streams"
)]
struct Args {
    /// Rounds, each on a fresh vsockd and virtual VM.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    rounds: u64,
    /// MiB moved by each throughput measurement.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=65536))]
    mib: u64,
    /// `stop()`/`start()` reattaches timed per round.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    reattaches: u64,
    /// Worker SIGKILLs timed per round (kill to the session attached again).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    kills: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let settings = Settings {
        stream_bytes: args.mib << 20,
        ..Settings::default()
    };
    let mut rounds = Vec::new();
    for r in 0..args.rounds {
        let dir = match temp_dir(&format!("session-bench-{r}")) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("session-bench: {e}");
                return ExitCode::FAILURE;
            }
        };
        match sessions::run_round(
            &settings,
            args.reattaches as usize,
            args.kills as usize,
            &dir,
        ) {
            Ok(round) => {
                eprintln!(
                    "session-bench: round {} of {}: {:?}",
                    r + 1,
                    args.rounds,
                    round.rates
                );
                let _ = std::fs::remove_dir_all(&dir);
                rounds.push(round);
            }
            Err(e) => {
                eprintln!("session-bench: round {}: {e:?}", r + 1);
                return ExitCode::FAILURE;
            }
        }
    }
    print!("{}", sessions::table(&rounds));
    ExitCode::SUCCESS
}
