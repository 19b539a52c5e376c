//! Man pages and shell completions, generated from the command line's own
//! definition so that they cannot drift from `--help` (packagers run these;
//! `make deb` puts the results into the package).

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use super::Cli;
use super::output;

/// Prints the completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "ldapsync", &mut script);
    output::write(format_args!("{}", String::from_utf8_lossy(&script)));
    Ok(())
}

/// Writes `ldapsync.1` and one page per subcommand (`ldapsync-account-add.1`, …)
/// into `dir`.
pub fn man_pages(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir).with_context(|| format!("writing man pages into {}", dir.display()))
}
