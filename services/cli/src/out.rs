//! The CLI's standard output. `println!` panics when the reader has gone (`baton runs events X |
//! head`); the CLI's `println!` and `print!` (macros in `main.rs`) write here instead, and a reader
//! that has gone ends the command quietly with success, as it does for `cat` or `grep`.

use std::io::Write;

/// Writes `args` to standard output. A closed pipe exits the process with status 0: the reader
/// has what it wanted. Any other failure (a full disk) exits with status 1 and says so.
pub fn write(args: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = stdout.write_fmt(args) {
        drop(stdout);
        std::process::exit(exit_code(&error));
    }
}

/// The exit status after a failed write of the output.
fn exit_code(error: &std::io::Error) -> i32 {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        return 0;
    }
    // Standard error may be a closed pipe too: ignore a failure to report.
    let _ = writeln!(std::io::stderr(), "error: cannot write the output: {error}");
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_that_went_away_is_a_clean_exit() {
        let gone = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert_eq!(exit_code(&gone), 0);
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        assert_eq!(exit_code(&full), 1);
    }
}
