//! What the command-line tools share about the terminal: log output on stderr at the
//! verbosity of `-v` flags, and an RAII guard holding a full-screen terminal.

use std::io::{self, Stdout};

use ratatui::{
    Terminal,
    backend::CrosstermBackend,
    crossterm::{
        execute,
        terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
    },
};

/// Logs (including the eBPF programs' aya-log records) to stderr: warnings by default, `-v`
/// info, `-vv` debug.
pub fn init_logging(verbose: u8) {
    use tracing_subscriber::{
        Layer, filter::Targets, layer::SubscriberExt, util::SubscriberInitExt,
    };
    let level = match verbose {
        0 => tracing::Level::WARN,
        1 => tracing::Level::INFO,
        _ => tracing::Level::DEBUG,
    };
    // tarpc warns about every peer that hangs up without a TLS close_notify and every
    // dropped connection; our own messages say what matters. -v shows them again.
    let tarpc = if verbose == 0 {
        tracing::Level::ERROR
    } else {
        level
    };
    let filter = Targets::new()
        .with_default(level)
        .with_target("tarpc", tarpc);
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(io::stderr)
                // Colours on a terminal only: a daemon's log file stays plain text.
                .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
                .with_filter(filter),
        )
        .try_init();
}

/// Lets a command-line tool end quietly when its reader goes away (`| head`), as Unix tools
/// do. Rust ignores SIGPIPE, so printing to a closed pipe would panic instead. Not for
/// daemons, which must outlive a peer that hangs up.
pub fn end_quietly_on_closed_pipe() {
    // SAFETY: restoring a signal's default disposition touches no memory; called at start,
    // before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Holds the terminal in raw mode on the alternate screen; gives it back on drop, and before a
/// panic message is printed.
pub struct TerminalGuard {
    pub terminal: Terminal<CrosstermBackend<Stdout>>,
}

fn restore() {
    let _ = disable_raw_mode();
    let _ = execute!(
        io::stdout(),
        LeaveAlternateScreen,
        ratatui::crossterm::cursor::Show
    );
}

impl TerminalGuard {
    pub fn new() -> io::Result<Self> {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        enable_raw_mode()?;
        execute!(io::stdout(), EnterAlternateScreen)?;
        Ok(Self {
            terminal: Terminal::new(CrosstermBackend::new(io::stdout()))?,
        })
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}
