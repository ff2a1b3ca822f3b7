//! Where hetccl's log lines and its tools' messages go: writing them never takes a
//! process down.
//!
//! A rank's stdout and stderr are usually pipes to its launcher. Once the launcher is gone
//! (killed, or its own output piped into `head`), every write fails with EPIPE, and
//! `println!`, `eprintln!` and tracing-subscriber's report of a failed write (itself an
//! `eprintln!`) panic. A panic there turns a clear error into a crash, or into a hang when
//! it happens on the thread that was going to complete someone's collective. A line that
//! cannot be written is dropped: there is nowhere left to report it.

use std::io::{self, Write};

/// A writer that reports every write as done, whether or not it reached `W`.
#[derive(Debug)]
pub struct Lossy<W>(pub W);

impl<W: Write> Write for Lossy<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.write(buf) {
            // `write_all` retries an interrupted write; everything else drops the rest.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(_) => Ok(buf.len()),
            Ok(n) => Ok(n),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

/// Locked stderr for one message or log event (a `MakeWriter` for tracing-subscriber:
/// `.with_writer(hetccl::log::stderr)`).
pub fn stderr() -> Lossy<io::StderrLock<'static>> {
    Lossy(io::stderr().lock())
}

/// Locked stdout for one message.
pub fn stdout() -> Lossy<io::StdoutLock<'static>> {
    Lossy(io::stdout().lock())
}

/// `println!` that drops the line when stdout is closed (the launcher is gone, or the
/// output went into `head`) rather than panic; for the command-line tools.
#[macro_export]
macro_rules! outln {
    ($($a:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!($crate::log::stdout(), $($a)*);
    }};
}

/// `eprintln!` that drops the line when stderr is closed rather than panic.
#[macro_export]
macro_rules! errln {
    ($($a:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!($crate::log::stderr(), $($a)*);
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts `room` bytes, then fails like a pipe whose reader is gone.
    struct Pipe {
        got: Vec<u8>,
        room: usize,
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::from_raw_os_error(libc::EPIPE));
            }
            let n = buf.len().min(self.room);
            self.got.extend_from_slice(&buf[..n]);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EPIPE))
        }
    }

    #[test]
    fn a_closed_stream_swallows_the_rest_of_the_line() {
        let mut w = Lossy(Pipe {
            got: Vec::new(),
            room: 4,
        });
        writeln!(w, "rank 1: peer 0 is gone").unwrap();
        writeln!(w, "second line").unwrap();
        w.flush().unwrap();
        assert_eq!(w.0.got, b"rank");
    }

    #[test]
    fn an_interrupted_write_is_retried() {
        struct Once(bool, Vec<u8>);
        impl Write for Once {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if !self.0 {
                    self.0 = true;
                    return Err(io::ErrorKind::Interrupted.into());
                }
                self.1.extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = Lossy(Once(false, Vec::new()));
        w.write_all(b"whole").unwrap();
        assert_eq!(w.0 .1, b"whole");
    }
}
