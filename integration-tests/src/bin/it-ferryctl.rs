//! The `ferryctl` binary, built inside this package so its tests can spawn it.

fn main() -> std::process::ExitCode {
    ferryctl::cli::main()
}
