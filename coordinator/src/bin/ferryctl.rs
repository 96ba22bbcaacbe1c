//! `ferryctl`: see [`ferry_coordinator::cli::ferryctl`].

fn main() -> std::process::ExitCode {
    ferry_coordinator::cli::ferryctl::main()
}
