//! `ferryctl`: see [`ferryctl::cli`].

fn main() -> std::process::ExitCode {
    ferryctl::cli::main()
}
