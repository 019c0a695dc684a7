//! The `pat-rotator` binary: parse the command line and hand it to the library.

use clap::FromArgMatches;
use pat_rotator::cli::{self, Cli};

fn main() {
    let matches = cli::command().get_matches();
    let parsed = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    std::process::exit(cli::execute(parsed));
}
