//! `thrctl`: parses flags and hands over to [`thrctl::run`].

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = thrctl::Cli::parse();
    match thrctl::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("thrctl: {}", err.message);
            ExitCode::from(err.code)
        }
    }
}
