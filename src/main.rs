//! The `litefleet` binary; everything lives in the library (see `lib.rs`).

fn main() -> std::process::ExitCode {
    // Before anything opens a database (see its docs).
    litefleet::capture::configure_sqlite();
    litefleet::cli::main()
}
