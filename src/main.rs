//! The `litefleet` binary; everything lives in the library (see `lib.rs`).

fn main() -> std::process::ExitCode {
    // Before any thread starts or anything opens a database (see their docs).
    litefleet::daemon::scheduler::configure_allocator();
    litefleet::capture::sqlite_statistics_off();
    litefleet::capture::configure_sqlite();
    litefleet::cli::main()
}
