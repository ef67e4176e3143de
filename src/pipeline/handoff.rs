//! Two threads for one stream: the thread that decodes (decrypts, decompresses) keeps doing
//! that while another consumes what it produced (hashes it, extracts it, compares it with
//! what is on disk). A restore of one large object (a stream-format `base.tar`) otherwise
//! runs every stage on one core.
//!
//! The bytes cross in pieces of [`PIECE`] through a channel of [`DEPTH`] pieces, and the
//! pieces go back to be refilled: memory is `(DEPTH + 2) × PIECE` per stream, whatever its
//! size. The producer reads ahead at most that far; the consumer sees exactly the bytes
//! `src` gives, in order, and an error of `src` where it happened.

use std::io::{self, Read};
use std::sync::mpsc::{self, Receiver, SyncSender};

/// Bytes handed over at once.
pub const PIECE: usize = 1 << 20;
/// Pieces in flight between the threads.
pub const DEPTH: usize = 4;

/// Runs `consume` on a new thread, reading what this thread reads from `src`; returns what
/// `consume` returned. If `consume` returns early (done or failed), reading `src` stops.
/// If `src` fails, `consume` gets that error at the point the bytes stop.
pub fn pipelined<T, F>(src: &mut dyn Read, consume: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce(&mut dyn Read) -> io::Result<T> + Send,
{
    let (full_tx, full_rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(DEPTH);
    let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(DEPTH + 2);
    std::thread::scope(|s| {
        let consumer = std::thread::Builder::new()
            .name("restore-consume".into())
            .spawn_scoped(s, move || {
                let mut r = Pieces {
                    full: full_rx,
                    empty: empty_tx,
                    cur: Vec::new(),
                    at: 0,
                    done: false,
                    failed: false,
                };
                consume(&mut r)
            })?;
        produce(src, &full_tx, &empty_rx);
        // The consumer sees the end of the stream when the sender is gone.
        drop(full_tx);
        consumer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the restore's consuming thread panicked")))
    })
}

/// Fills pieces from `src` and sends them until the end, an error (sent after the bytes
/// read before it), or the consumer is gone.
fn produce(src: &mut dyn Read, full: &SyncSender<io::Result<Vec<u8>>>, empty: &Receiver<Vec<u8>>) {
    let mut made = 0;
    loop {
        // A returned piece if there is one; a new one while fewer than the bound exist;
        // else wait for one to come back.
        let mut buf = match empty.try_recv() {
            Ok(b) => b,
            Err(_) if made < DEPTH + 2 => {
                made += 1;
                Vec::with_capacity(PIECE)
            }
            Err(_) => match empty.recv() {
                Ok(b) => b,
                // The consumer is gone.
                Err(_) => return,
            },
        };
        let error = fill(src, &mut buf);
        let len = buf.len();
        if len > 0 && full.send(Ok(buf)).is_err() {
            return;
        }
        if let Some(e) = error {
            let _ = full.send(Err(e));
            return;
        }
        if len < PIECE {
            return;
        }
    }
}

/// Reads into `buf` until it holds [`PIECE`] bytes or `src` ends; an error stops it, with
/// the bytes read before it in `buf`.
fn fill(src: &mut dyn Read, buf: &mut Vec<u8>) -> Option<io::Error> {
    buf.resize(PIECE, 0);
    let mut n = 0;
    let mut error = None;
    while n < PIECE {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    buf.truncate(n);
    error
}

/// The consuming side: a reader over the pieces as they arrive.
struct Pieces {
    full: Receiver<io::Result<Vec<u8>>>,
    empty: SyncSender<Vec<u8>>,
    cur: Vec<u8>,
    at: usize,
    /// The producer is finished: the end of the stream.
    done: bool,
    /// An error was handed out: every later read fails too.
    failed: bool,
}

impl Pieces {
    /// Makes the next piece current; false at the end of the stream.
    fn next_piece(&mut self) -> io::Result<bool> {
        if self.failed {
            return Err(io::Error::other("read after the stream failed"));
        }
        if self.done {
            return Ok(false);
        }
        let next = match self.full.recv() {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                self.failed = true;
                return Err(e);
            }
            Err(_) => {
                self.done = true;
                return Ok(false);
            }
        };
        let old = std::mem::replace(&mut self.cur, next);
        self.at = 0;
        if old.capacity() > 0 {
            // The producer may have finished already: then nobody needs it back.
            let _ = self.empty.try_send(old);
        }
        Ok(true)
    }
}

impl Read for Pieces {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.at == self.cur.len() {
            if !self.next_piece()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.cur.len() - self.at);
        buf[..n].copy_from_slice(&self.cur[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads in pieces of a size that cycles, so piece and read boundaries never line up.
    struct Ragged<'a> {
        data: &'a [u8],
        step: usize,
        fail_at: Option<usize>,
        read: usize,
    }

    impl Read for Ragged<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.fail_at.is_some_and(|f| self.read >= f) {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "bad chunk"));
            }
            self.step = self.step % 70_001 + 4_099;
            let mut n = buf.len().min(self.step).min(self.data.len());
            if let Some(f) = self.fail_at {
                n = n.min(f - self.read);
            }
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            self.read += n;
            Ok(n)
        }
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn the_consumer_sees_every_byte_in_order() {
        for len in [0, 1, PIECE - 1, PIECE, PIECE + 1, 9 * PIECE + 12_345] {
            let d = data(len);
            let mut src = Ragged {
                data: &d,
                step: 1,
                fail_at: None,
                read: 0,
            };
            let got = pipelined(&mut src, |r| {
                let mut out = Vec::new();
                let mut b = vec![0u8; 8191];
                loop {
                    match r.read(&mut b)? {
                        0 => return Ok(out),
                        n => out.extend_from_slice(&b[..n]),
                    }
                }
            })
            .unwrap();
            assert!(got == d, "len {len}");
        }
    }

    /// An error of the source reaches the consumer after exactly the bytes before it, and
    /// the consumer cannot mistake it for the end of the stream by reading again.
    #[test]
    fn an_error_comes_after_the_bytes_before_it() {
        let d = data(3 * PIECE);
        let fail_at = PIECE + 5000;
        let mut src = Ragged {
            data: &d,
            step: 1,
            fail_at: Some(fail_at),
            read: 0,
        };
        let (n, err, again) = pipelined(&mut src, |r| {
            let mut out = Vec::new();
            let err = loop {
                let mut b = vec![0u8; 10_000];
                match r.read(&mut b) {
                    Ok(0) => panic!("the failure looked like the end"),
                    Ok(n) => out.extend_from_slice(&b[..n]),
                    Err(e) => break e,
                }
            };
            assert!(out == d[..fail_at]);
            let again = r.read(&mut [0u8; 10]).is_err();
            Ok((out.len(), err, again))
        })
        .unwrap();
        assert_eq!(n, fail_at);
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("bad chunk"), "{err}");
        assert!(again);
    }

    /// A consumer that stops early (failed, or has what it needs) stops the producer: no hang,
    /// and the source is not read to its end.
    #[test]
    fn a_consumer_that_stops_early_stops_the_reading() {
        let d = data(64 * PIECE);
        let mut src = Ragged {
            data: &d,
            step: 1,
            fail_at: None,
            read: 0,
        };
        let err = pipelined(&mut src, |r| -> io::Result<()> {
            let mut b = vec![0u8; 100];
            r.read_exact(&mut b)?;
            Err(io::Error::other("extract failed"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("extract failed"));
        assert!(
            src.read <= (DEPTH + 3) * PIECE,
            "read {} bytes ahead",
            src.read
        );
    }
}
