//! Standard output that a closed pipe ends quietly (`slipway events RUN | head`): a read
//! command exits 0 at the first write that finds its reader gone, where `println!` would panic.
//! The commands that own child processes (`up`, `demo`, `bench`, `soak`) call
//! [`keep_running_on_closed_pipe`]: they stop printing and go on, so their services are still
//! stopped as they should be.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

static KEEP_RUNNING: AtomicBool = AtomicBool::new(false);
static CLOSED: AtomicBool = AtomicBool::new(false);

/// A closed standard output stops the printing, not the command.
pub fn keep_running_on_closed_pipe() {
    KEEP_RUNNING.store(true, Ordering::Relaxed);
}

/// Writes to standard output (what [`outln!`] expands to).
pub fn write(args: std::fmt::Arguments<'_>) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) else {
        return;
    };
    if e.kind() != std::io::ErrorKind::BrokenPipe {
        eprintln!("slipway: cannot write to standard output: {e}");
        std::process::exit(2);
    }
    if !KEEP_RUNNING.load(Ordering::Relaxed) {
        std::process::exit(0);
    }
    CLOSED.store(true, Ordering::Relaxed);
}

/// `println!` through [`write`].
macro_rules! outln {
    () => {
        $crate::out::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;
