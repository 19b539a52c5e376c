fn main() -> std::process::ExitCode {
    ldapsync::cli::main()
}
