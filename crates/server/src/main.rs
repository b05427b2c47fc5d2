//! The `batchd` binary; everything it does lives in the library.

fn main() -> std::process::ExitCode {
    batchd::run_cli()
}
