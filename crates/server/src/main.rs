//! The `batchd` binary; everything it does lives in the library.

// Every item passes through many small allocations (JSON values, bound SQL parameters,
// rows); mimalloc serves them for a fraction of glibc malloc's cost (`batchd bench`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    batchd::run_cli()
}
