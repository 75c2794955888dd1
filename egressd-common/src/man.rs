//! Man pages rendered from a binary's own clap definition. `egressd man DIR` and `egressctl man DIR`
//! (hidden subcommands) call [`write_pages`], and `cargo xtask package` runs those on the binaries it
//! packages: the pages describe exactly the options and subcommands the shipped binaries parse, and
//! there is no second copy of the CLI to keep in step.

use std::{
    borrow::ToOwned,
    format, io,
    io::Write as _,
    path::{Path, PathBuf},
    string::String,
    vec::Vec,
};

use clap_mangen::roff::{bold, roman, Roff};

/// The project's pages, for every page's SEE ALSO.
pub const PAGES: [&str; 3] = ["egressd(8)", "egressctl(1)", "egressd.toml(5)"];

/// What a top page says beyond its CLI.
pub struct Extra<'a> {
    /// (path, what it is) for the FILES section of the top page.
    pub files: &'a [(&'a str, &'a str)],
    /// Related pages, e.g. `egressd.toml(5)`, for every page's SEE ALSO.
    pub see_also: &'a [&'a str],
}

/// Writes `NAME.SECTION` for `cmd` and `NAME-SUB.SECTION` for each visible subcommand, at every
/// depth (`egressctl-audit-tail.1`), into `dir`; returns the files written. Hidden subcommands
/// (internal helpers) get no page.
pub fn write_pages(
    cmd: clap::Command,
    section: &str,
    extra: &Extra<'_>,
    dir: &Path,
) -> io::Result<Vec<PathBuf>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    write_tree(&cmd, None, section, extra, dir, &mut written)?;
    Ok(written)
}

fn write_tree(
    cmd: &clap::Command,
    parent: Option<&str>,
    section: &str,
    extra: &Extra<'_>,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let name = display_name(cmd);
    let path = dir.join(format!("{name}.{section}"));
    std::fs::write(&path, render(cmd, parent, section, extra)?)?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_tree(sub, Some(&name), section, extra, dir, written)?;
    }
    Ok(())
}

fn display_name(cmd: &clap::Command) -> String {
    cmd.get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_owned()
}

/// One page: clap_mangen's NAME, SYNOPSIS, DESCRIPTION, OPTIONS, SUBCOMMANDS (each naming its own
/// page) and VERSION, then FILES (top page only) and SEE ALSO.
pub fn render(
    cmd: &clap::Command,
    parent: Option<&str>,
    section: &str,
    extra: &Extra<'_>,
) -> io::Result<Vec<u8>> {
    let name = display_name(cmd);
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section(section)
        .render(&mut page)?;
    // clap_mangen writes an empty date as nothing at all, which shifts the source and manual
    // into the wrong fields of `.TH`: write that line with every field quoted. No date, so the
    // same binary always writes the same pages.
    let page = String::from_utf8(page).map_err(io::Error::other)?;
    let mut out = Vec::new();
    for line in page.split_inclusive('\n') {
        if line.starts_with(".TH ") {
            writeln!(
                out,
                ".TH {name} {section} \"\" \"egressd {}\" \"egressd manual\"",
                env!("CARGO_PKG_VERSION")
            )?;
        } else {
            out.extend_from_slice(line.as_bytes());
        }
    }
    let mut roff = Roff::new();
    if parent.is_none() && !extra.files.is_empty() {
        roff.control("SH", ["FILES"]);
        for (path, what) in extra.files {
            roff.control("TP", []);
            roff.text([bold(*path)]);
            roff.text([roman(*what)]);
        }
    }
    let own = format!("{name}({section})");
    let mut pages: Vec<String> = parent
        .map(|p| format!("{p}({section})"))
        .into_iter()
        .collect();
    for page in extra.see_also {
        if *page != own && !pages.iter().any(|p| p == page) {
            pages.push((*page).to_owned());
        }
    }
    if !pages.is_empty() {
        roff.control("SH", ["SEE ALSO"]);
        let mut inlines = Vec::new();
        for (i, page) in pages.iter().enumerate() {
            let (name, rest) = page.split_once('(').unwrap_or((page, ""));
            if i > 0 {
                inlines.push(roman(", "));
            }
            inlines.push(bold(name));
            if !rest.is_empty() {
                inlines.push(roman(format!("({rest}")));
            }
        }
        roff.text(inlines);
    }
    roff.to_writer(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn cli() -> Command {
        Command::new("tool")
            .version("1.0")
            .about("Does things")
            .arg(Arg::new("socket").long("socket").help("The socket."))
            .subcommand(
                Command::new("run")
                    .about("Run it")
                    .subcommand(Command::new("fast").about("Quickly")),
            )
            .subcommand(Command::new("secret").hide(true))
    }

    #[test]
    fn one_page_per_visible_subcommand_with_see_also_and_files() {
        let dir = std::env::temp_dir().join(format!("egressd-man-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let extra = Extra {
            files: &[("/etc/tool.toml", "The policy.")],
            see_also: &["tool(8)", "tool.toml(5)"],
        };
        let written = write_pages(cli(), "8", &extra, &dir).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["tool.8", "tool-run.8", "tool-run-fast.8"]);
        let top = std::fs::read_to_string(dir.join("tool.8")).unwrap();
        assert!(top.contains("\n.TH tool 8 \"\" \"egressd "), "{top}");
        assert!(top.contains("tool\\-run(8)"), "{top}");
        assert!(!top.contains("secret"), "{top}");
        assert!(!top.contains("tool\\-help"), "{top}");
        assert!(
            top.contains(".SH FILES\n.TP\n\\fB/etc/tool.toml\\fR"),
            "{top}"
        );
        // Its own page is not its own SEE ALSO.
        assert!(
            top.contains(".SH \"SEE ALSO\"\n\\fBtool.toml\\fR(5)\n"),
            "{top}"
        );
        let run = std::fs::read_to_string(dir.join("tool-run.8")).unwrap();
        // The parent first, once.
        assert!(
            run.contains("\\fBtool\\fR(8), \\fBtool.toml\\fR(5)\n"),
            "{run}"
        );
        assert!(!run.contains(".SH FILES"), "{run}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
