//! `completions` and `man`: shell completions and manual pages generated from the command
//! definitions themselves (clap's own generators), so they can never drift from `--help`.

use super::{exit, CliError, EXIT_STATUS_HELP};
use crate::config::VARIABLES;
use clap::Args;
use roff::{bold, roman, Roff};
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Args)]
pub struct ManArgs {
    /// Write pat-rotator.1 and one page per command (pat-rotator-run.1, ...) into DIR
    /// instead of printing pat-rotator.1 to stdout.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

pub fn completions(args: CompletionsArgs) -> Result<i32, CliError> {
    let mut out = std::io::stdout().lock();
    clap_complete::generate(args.shell, &mut super::command(), "pat-rotator", &mut out);
    out.flush().map_err(write_failed)?;
    Ok(exit::OK)
}

pub(crate) fn man(args: ManArgs) -> Result<i32, CliError> {
    let mut root = man_command();
    // Sets each subcommand's display name (`pat-rotator-run`), as clap_mangen expects.
    root.build();
    match args.out_dir {
        Some(dir) => {
            let write_all = || -> std::io::Result<()> {
                std::fs::create_dir_all(&dir)?;
                for cmd in std::iter::once(&root)
                    .chain(root.get_subcommands().filter(|c| !c.is_hide_set()))
                {
                    let page = clap_mangen::Man::new(cmd.clone());
                    let mut file = std::fs::File::create(dir.join(page.get_filename()))?;
                    render(cmd, &mut file)?;
                    file.flush()?;
                }
                Ok(())
            };
            write_all().map_err(|e| {
                CliError::new(
                    exit::FAILURE,
                    format!(
                        "cannot write the manual pages into {}: {e} (pick a directory you can write)",
                        dir.display()
                    ),
                )
            })?;
        }
        None => {
            let mut out = std::io::stdout().lock();
            render(&root, &mut out)
                .and_then(|()| out.flush())
                .map_err(write_failed)?;
        }
    }
    Ok(exit::OK)
}

/// The command line without the plain-text environment table of `--help`: the pages carry it
/// as proper ENVIRONMENT and EXIT STATUS sections instead.
fn man_command() -> clap::Command {
    super::command()
        .disable_help_subcommand(true)
        .after_help(None::<&str>)
        .mut_subcommand("run", |run| run.after_help(None::<&str>))
}

/// One page: clap_mangen's sections, then (for the top page and `run`, which read them)
/// the environment variables and the exit statuses.
fn render(cmd: &clap::Command, w: &mut dyn Write) -> std::io::Result<()> {
    clap_mangen::Man::new(cmd.clone()).render(w)?;
    let name = cmd.get_name();
    if name != "pat-rotator" && name != "run" {
        return Ok(());
    }
    let mut page = Roff::new();
    page.control("SH", ["ENVIRONMENT"]);
    page.text([roman("Durations are whole seconds.")]);
    for v in VARIABLES {
        page.control("TP", [] as [&str; 0]);
        page.text([bold(v.name)]);
        page.text([roman(match v.default {
            "(none)" => v.meaning.to_string(),
            default => format!("{} (default: {default})", v.meaning),
        })]);
    }
    page.control("SH", ["EXIT STATUS"]);
    page.text([roman(EXIT_STATUS_HELP)]);
    page.to_writer(w)
}

fn write_failed(e: std::io::Error) -> CliError {
    CliError::new(exit::FAILURE, format!("cannot write to stdout: {e}"))
}
